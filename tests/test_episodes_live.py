"""Episodes end to end: real gunicorn servers (two workers; two instances sharing a store), the
real client and runner. Pinned requests across updates on every worker, the runner's episode
across a mid-episode update and a retirement, 409 once the retention window closed, canary
shares the same on every worker and instance, outcome counters, promotion and rollback.

Every action of the tiny model equals its weights' tag (tests/tiny_model.py): the test
publishes tag v-1 as version v, so each answer proves which version computed it.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from policy_server.inputs.episodes import canary_share
from request_tools import ChunkRunner, PolicyClient, PolicyServerError
from tests.support.fakes import fake_observation
from tests.support.serving import run_server
from tests.support.tiny_model import tiny_weights, write_tiny_model
from tests.support.wait import eventually

pytestmark = pytest.mark.integration

RETAIN_S = 1.5
RATE_HZ = 50.0


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "models"
    write_tiny_model(root / "tiny", tag=0.0)
    return root


def store_server(tmp_path, root, store, workers, *extra):
    return run_server(
        tmp_path, workers=workers,
        args=("--model-path", str(root / "tiny"), "--model-root", str(root), "--store-poll-ms", "50",
              "--retain-previous-s", str(RETAIN_S), *extra),
        env={"POLICY_SERVER_MODEL_STORE": str(store)},
    )


def tag(version: str) -> float:
    return float(version) - 1.0


def fresh(base_url: str, *, version=None, episode_id=None) -> tuple[str, float]:
    """One request on a new connection (any worker may take it): (version, action value)."""
    with PolicyClient(base_url, retries=3, check_spec=False) as client:
        action = client.infer(fake_observation(1), version=version, episode_id=episode_id)["action"]
        return client.last_model_version, float(action.flat[0])


def held(base_url: str) -> dict[str, list[str]]:
    """The versions of the default model each worker holds."""
    listing = requests.get(base_url + "/models", timeout=10).json()["held_by_worker"]
    return {pid: models.get("default", []) for pid, models in listing.items()}


def run_episode(runner: ChunkRunner, steps: int, actions: list[float]) -> None:
    for _ in range(steps):
        actions.append(float(runner.act(fake_observation(2))[0]))
        time.sleep(1 / RATE_HZ)


def test_pinned_episodes_across_updates_on_every_worker_then_409_after_the_window(tmp_path, root):
    with store_server(tmp_path, root, tmp_path / "store", 2) as server, \
            PolicyClient(server.base_url, timeout_s=30) as admin:
        fallback = np.full(7, -1.0, np.float32)
        with ChunkRunner(PolicyClient(server.base_url), rate_hz=RATE_HZ, fallback=fallback) as runner:
            runner.reset()
            actions: list[float] = []
            episode = threading.Thread(target=run_episode, args=(runner, 120, actions))
            episode.start()
            eventually(lambda: runner.episode_version, 10, "the episode's first chunk")
            answer = admin.update_model(weights=tiny_weights(tag("2")), wait_s=10)  # mid-episode
            assert (answer["version"], answer["retained"]["version"], answer["all_workers"]) == (2, 1, True)
            with ThreadPoolExecutor(8) as pool:  # new connections, spread over the workers
                pinned = list(pool.map(lambda _: fresh(server.base_url, version=1), range(24)))
                unpinned = list(pool.map(lambda _: fresh(server.base_url), range(8)))
            assert set(pinned) == {("1", 0.0)} and set(unpinned) == {("2", 1.0)}
            assert all(v == ["2", "1"] for v in held(server.base_url).values()) and len(held(server.base_url)) == 2
            episode.join(30)
            assert runner.episode_version == "1" and runner.stats.versions == {"1": runner.stats.chunks}
            assert set(actions) <= {0.0, -1.0} and actions.count(0.0) > 60  # version 1 all along

            runner.reset()  # a new episode: the new version; then it is retired under it
            actions = []
            run_episode(runner, 20, actions)
            assert runner.episode_version == "2"
            admin.update_model(weights=tiny_weights(tag("3")), wait_s=10)  # 2 retained
            run_episode(runner, 10, actions)
            assert admin.update_model(weights=tiny_weights(tag("4")), wait_s=10)["retained"]["version"] == 3
            run_episode(runner, 40, actions)  # 2 is retired: stop at the end of its last chunk
            assert runner.stopped is not None and runner.stopped.version == "2", runner.stats.errors
            assert "4" in runner.stopped.served and runner.stats.episodes_stopped == 1
            assert set(actions) <= {1.0, -1.0} and actions[-1] == -1.0  # never version 3 or 4

        with pytest.raises(PolicyServerError) as unknown:
            fresh(server.base_url, version=99)
        assert unknown.value.status == 409 and unknown.value.version_retired
        assert (unknown.value.body["version"], unknown.value.body["served_versions"]) == ("99", ["4", "3"])
        assert fresh(server.base_url, version=3) == ("3", 2.0)
        last_pinned = time.monotonic()
        # No request pinned to 3 since (a probe would keep it): gone a window after the last one.
        eventually(lambda: all(v == ["4"] for v in held(server.base_url).values()), 15, "every worker unloaded 3")
        assert time.monotonic() - last_pinned >= RETAIN_S * 0.9
        with pytest.raises(PolicyServerError) as gone:
            fresh(server.base_url, version=3)
        assert gone.value.version_retired and gone.value.body["served_versions"] == ["4"]
        bad = requests.post(server.base_url + "/infer", data=b"", headers={"X-Episode-Id": "no spaces"}, timeout=10)
        assert bad.status_code == 400 and "X-Episode-Id" in bad.json()["detail"]


def outcome_counts(base_url: str) -> dict[tuple[str, str], float]:
    """``policy_episode_outcomes_total`` by (version, outcome), summed over the workers."""
    counts: dict[tuple[str, str], float] = {}
    text = requests.get(base_url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "policy_episode_outcomes_total" and sample.labels.get("model") == "default":
                key = (sample.labels["version"], sample.labels["outcome"])
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def test_a_canary_assigns_each_episode_alike_on_every_worker_and_instance_then_promote_and_roll_back(
        tmp_path, root):
    store = tmp_path / "shared-store"
    with store_server(tmp_path / "a", root, store, 2) as a, store_server(tmp_path / "b", root, store, 1) as b, \
            PolicyClient(a.base_url, timeout_s=30) as admin_a, PolicyClient(b.base_url, timeout_s=30) as admin_b:
        answer = admin_a.update_model(weights=tiny_weights(tag("2")), canary=0.3, wait_s=10)
        assert (answer["version"], answer["canary"], answer["all_workers"]) == (1, {"version": 2, "fraction": 0.3},
                                                                                True)
        eventually(lambda: all(v == ["1", "2"] for v in held(b.base_url).values()), 15, "instance B holds 2")
        assert admin_b.model_info()["canary"]["version"] == "2"

        ids = [f"robot-{i % 7}:ep-{i}" for i in range(300)]
        answered: dict[str, set[tuple[str, float]]] = {}
        with PolicyClient(a.base_url) as a1, PolicyClient(a.base_url) as a2, PolicyClient(b.base_url) as b1:
            for episode_id in ids:
                for client in (a1, a2, b1):
                    value = float(client.infer(fake_observation(3), episode_id=episode_id)["action"].flat[0])
                    answered.setdefault(episode_id, set()).add((client.last_model_version, value))
        assert all(len(answers) == 1 for answers in answered.values()), "an episode answered differently"
        candidates = {e for e, answers in answered.items() if answers == {("2", 1.0)}}
        assert candidates == {e for e in ids if canary_share("default", "2", e) < 0.3}
        assert all(answered[e] == {("1", 0.0)} for e in set(ids) - candidates)
        assert abs(len(candidates) / len(ids) - 0.3) < 0.08, len(candidates)

        before = outcome_counts(a.base_url)
        expected: dict[tuple[str, str], int] = {}
        with PolicyClient(a.base_url) as reporter:
            for i, episode_id in enumerate(ids[:60]):
                version = "2" if episode_id in candidates else "1"
                success = i % 3 != 0 if version == "1" else i % 3 == 0
                reporter.report_outcome(episode_id, version, success, episode_return=float(success))
                key = (version, "success" if success else "failure")
                expected[key] = expected.get(key, 0) + 1
        after = outcome_counts(a.base_url)
        assert {k: after.get(k, 0.0) - before.get(k, 0.0) for k in expected} == expected

        promoted = admin_b.update_model(version=2, wait_s=10)  # promote, from the other instance
        assert (promoted["version"], promoted["previous"], promoted["canary"], promoted["retained"]["version"]) == \
            (2, 1, None, 1)
        eventually(lambda: all(v == ["2", "1"] for v in held(a.base_url).values()), 15, "instance A promoted")
        assert fresh(a.base_url) == ("2", 1.0) and fresh(b.base_url, version=1) == ("1", 0.0)
        rolled = admin_a.update_model(version=1, wait_s=10)  # and back
        assert (rolled["version"], rolled["retained"]["version"]) == (1, 2)
        eventually(lambda: all(v == ["1", "2"] for v in held(b.base_url).values()), 15, "instance B rolled back")
        assert fresh(b.base_url) == ("1", 0.0) and fresh(a.base_url, version=2) == ("2", 1.0)
