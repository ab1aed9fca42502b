"""Hot reload end to end: real gunicorn servers sharing a model store, the real client.

Every action of the tiny model equals its weights' tag, so each answer proves which
version computed it (tests/support/tiny_model.py).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import pytest
import urllib3.connection

from request_tools import PolicyClient, PolicyServerError
from tests.support.fakes import fake_observation
from tests.support.serving import run_server
from tests.support.tiny_model import tiny_weights, write_tiny_model
from tests.support.wait import eventually

log = logging.getLogger(__name__)

pytestmark = pytest.mark.integration

# The bound on "every worker serves the new version after the 200"; a slower CI
# machine can widen it without editing the test.
SWITCH_BOUND_S = float(os.environ.get("POLICY_TEST_SWITCH_BOUND_S", "1.0"))
UPDATES = 50
CLIENTS = 16


def store_server(tmp_path, root, store, workers, *extra):
    return run_server(
        tmp_path, workers=workers,
        args=("--model-path", str(root / "tiny"), "--model-root", str(root), "--store-poll-ms", "50",
              "--threads", "8", *extra),
        env={"POLICY_SERVER_MODEL_STORE": str(store)},
    )


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "models"
    write_tiny_model(root / "tiny", tag=0.0)
    return root


def tag_of(version: str) -> float:
    return float(version) - 1.0  # the test publishes tag v-1 as version v


@pytest.fixture
def connects(monkeypatch):
    """Connections opened per thread: an answer's count says which keep-alive connection it came on."""
    counts: dict[str, int] = {}
    connect = urllib3.connection.HTTPConnection.connect

    def counting(self):
        name = threading.current_thread().name
        counts[name] = counts.get(name, 0) + 1
        return connect(self)

    monkeypatch.setattr(urllib3.connection.HTTPConnection, "connect", counting)
    return counts


def test_fifty_updates_under_sixteen_clients_and_four_workers(tmp_path, root, connects):
    with store_server(tmp_path, root, tmp_path / "store", 4) as server:
        stop = threading.Event()
        results: list[list[tuple[str, float, int]]] = [[] for _ in range(CLIENTS)]
        failures: list[str] = []

        def robot(i: int) -> None:
            obs = fake_observation(i)
            with PolicyClient(server.base_url, retries=0) as client:
                while not stop.is_set():
                    try:
                        action = client.infer(obs)["action"]
                    except Exception as exc:  # noqa: BLE001 (any failure is recorded; the test asserts none)
                        failures.append(f"client {i}: {exc!r}")
                        return
                    connection = connects[threading.current_thread().name]
                    results[i].append((client.last_model_version, float(action.flat[0]), connection))

        threads = [threading.Thread(target=robot, args=(i,), daemon=True, name=f"robot-{i}") for i in range(CLIENTS)]
        for t in threads:
            t.start()
        switch_times, answers = [], []
        try:
            with PolicyClient(server.base_url, timeout_s=30) as admin:
                for n in range(2, UPDATES + 2):
                    answer = admin.update_model(weights=tiny_weights(tag_of(str(n))), wait_s=10)
                    answers.append(answer)
                    switch_times.append(answer["switch_s"])
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert failures == []
        assert [a["version"] for a in answers] == list(range(2, UPDATES + 2))
        for answer in answers:
            assert answer["all_workers"], answer
            assert len(answer["workers"]) == 4 and {w["version"] for w in answer["workers"]} == {str(answer["version"])}
        assert max(switch_times) <= SWITCH_BOUND_S, sorted(switch_times)[-5:]
        total, reconnects = 0, 0
        for i, per_client in enumerate(results):
            # A keep-alive connection stays with one worker, and a worker never swaps back to an
            # older version. (On a new connection, another worker may still be mid-switch.)
            for connection in sorted({c for _, _, c in per_client}):
                versions = [int(v) for v, _, c in per_client if c == connection]
                assert versions == sorted(versions), f"client {i} saw versions go backwards on one connection"
            assert all(value == tag_of(v) for v, value, _ in per_client), "an answer mixed versions"
            total += len(per_client)
            reconnects += per_client[-1][2] - per_client[0][2] if per_client else 0
        seen = {v for per_client in results for v, _, _ in per_client}
        assert len(seen) > UPDATES // 2  # the clients really ran across the updates
        log.info(f"{total} requests, {reconnects} reconnects, switch p50 "
                 f"{sorted(switch_times)[len(switch_times) // 2]:.3f} s max {max(switch_times):.3f} s")


def test_two_instances_sharing_a_store_both_switch(tmp_path, root):
    store = tmp_path / "shared-store"
    with store_server(tmp_path / "a", root, store, 1) as a, store_server(tmp_path / "b", root, store, 1) as b:
        with PolicyClient(a.base_url) as client_a, PolicyClient(b.base_url) as client_b:
            client_b.infer(fake_observation(0))
            assert client_b.last_model_version == "1"
            answer = client_a.update_model(weights=tiny_weights(41.0), wait_s=10)
            assert answer["version"] == 2 and answer["all_workers"]
            eventually(lambda: client_b.model_info()["version"] == "2", 10, "instance B following the store")
            assert float(client_b.infer(fake_observation(0))["action"].flat[0]) == 41.0
            assert client_b.last_model_version == "2"
            rolled = client_b.update_model(version=1, wait_s=10)
            assert rolled["version"] == 1 and rolled["all_workers"]
            eventually(lambda: client_a.model_info()["version"] == "1", 10, "instance A following the rollback")


def test_a_worker_killed_while_loading_comes_back_serving_the_current_version(tmp_path, root):
    write_tiny_model(root / "slow", tag=1.0, load_delay_s=2.0)  # published as version 2
    with store_server(tmp_path, root, tmp_path / "store", 2) as server, PolicyClient(server.base_url) as client:
        answer = client.update_model(model_path="slow", wait_s=0)  # returns once validated and published
        assert answer["version"] == 2
        workers = client._call("GET", "/models").json()["workers"]
        loading = [int(pid) for pid, models in workers.items() if models.get("default") != "2"]
        assert loading, f"every worker already switched: {workers}"
        os.kill(loading[0], signal.SIGKILL)

        def listing() -> dict:
            return client._call("GET", "/models").json()["workers"]

        def both_on_version_2() -> dict | None:
            workers = listing()
            return workers if len(workers) == 2 and all(m.get("default") == "2" for m in workers.values()) else None

        workers = eventually(both_on_version_2, 60, "both workers back on version 2", every_s=0.2, context=listing)
        assert str(loading[0]) not in workers
        for i in range(10):
            with PolicyClient(server.base_url) as fresh:  # a new connection each time
                assert float(fresh.infer(fake_observation(i))["action"].flat[0]) == 1.0
                assert fresh.last_model_version == "2"


def test_several_models_served_at_once_through_the_client(tmp_path, root):
    write_tiny_model(root / "second", tag=70.0)
    admin_key = "admin-key-for-tests"
    with store_server(tmp_path, root, tmp_path / "store", 2, "--admin-key", admin_key) as server:
        with PolicyClient(server.base_url, admin_key=admin_key) as client:
            with pytest.raises(PolicyServerError) as refused:
                PolicyClient(server.base_url).load_model("second", model_path="second")
            assert refused.value.status == 401
            answer = client.load_model("second", model_path="second", wait_s=10)
            assert (answer["model"], answer["version"], answer["all_workers"]) == ("second", 1, True)
            assert {m["name"]: m["state"] for m in client.models()} == {"default": "serving", "second": "serving"}
            for i in range(6):
                with PolicyClient(server.base_url, model="second") as robot:  # a fresh connection each time
                    assert float(robot.infer(fake_observation(i))["action"].flat[0]) == 70.0
                    assert robot.model_info()["name"] == "second"
                assert float(client.infer(fake_observation(i))["action"].flat[0]) == 0.0
            assert client.unload_model("second", wait_s=10)["all_workers"]
            with pytest.raises(PolicyServerError) as gone:
                client.infer(fake_observation(0), model="second")
            assert gone.value.status == 404
