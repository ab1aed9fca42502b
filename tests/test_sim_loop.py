"""examples/sim_loop.py end to end: the shipped policies close the reacher's loop over a
real server (the transformer and the history model loaded next to the default) and
in-process, the runner keeping the history model's windows on every path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests

from examples import sim_loop
from policy_client.chunk_merge import rtc_shift
from request_tools import PolicyClient
from tests.support.serving import run_server

EPISODES = 3


@pytest.mark.integration
def test_the_policies_close_the_loop_over_the_server_as_in_process(tmp_path):
    out = tmp_path / "sim.json"
    models = ("default", "transformer", "history")
    with run_server(tmp_path, workers=2, args=("--model-path", "models/default")) as server:
        result = sim_loop.main([
            "--url", server.base_url, "--models", ",".join(models), "--episodes", str(EPISODES),
            "--json", str(out),
        ])
        served = {m["name"]: m["state"] for m in requests.get(server.base_url + "/models").json()["models"]}
    assert served == dict.fromkeys(models, "serving")  # all at once
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    reports = {(r["model"], r["path"]): r for r in result["reports"]}
    assert set(reports) == {(m, p) for m in models for p in ("server", "in-process")}
    for (_model, path), report in reports.items():
        assert report["episodes"] == EPISODES and report["steps"] > 0, report
        assert report["failures"] == 0 and report["chunks"] >= EPISODES, report
        assert report["successes"] >= EPISODES - 1, report  # the shipped policies reach >= 90%
        assert report["latency_ms_p50"] > 0, report
        if path == "server":
            assert report["versions"] == {"1": report["chunks"]}, report  # every chunk says its version
        else:
            assert report["versions"] == {}, report
    for model in models:
        assert abs(reports[model, "server"]["successes"] - reports[model, "in-process"]["successes"]) <= 1
    assert result["attention"]["default"] is None  # the CNN has no optional outputs
    attention = result["attention"]["transformer"]
    assert len(attention["shape"]) >= 2 and abs(attention["row_sums"] - 1.0) < 1e-3


@pytest.mark.integration
def test_the_canary_demo_counts_success_per_version_on_the_server_as_the_runner_saw_it(tmp_path):
    out = tmp_path / "canary.json"
    with run_server(tmp_path, workers=2, args=("--model-path", "models/default")) as server:
        result = sim_loop.main(["--url", server.base_url, "--canary", "0.5", "--episodes", "4", "--json", str(out)])
        after = requests.get(server.base_url + "/models/default", timeout=10).json()
    canary = result["canary"]
    assert json.loads(out.read_text())["canary"] == json.loads(json.dumps(canary))
    assert (canary["stable"], canary["candidate"]) == ("1", "2")
    server_counts = {v: {"episodes": r["episodes"], "successes": r["successes"]}
                     for v, r in canary["per_version"].items()}
    assert server_counts == canary["runner_per_version"]  # every episode counted once, on its own version
    assert sum(r["episodes"] for r in server_counts.values()) == 4 and set(server_counts) <= {"1", "2"}
    assert canary["version_switches"] == 0
    assert (after["stable_version"], after["canary"], after["retained"]["version"]) == ("1", None, "2")  # ended


def test_delayed_policy_adds_the_latency_and_seeded_jitter():
    import time

    calls = []
    policy = sim_loop.DelayedPolicy(lambda: (lambda obs: calls.append(obs) or {"action": obs}), 0.06, 0.02, seed=3)
    start = time.perf_counter()
    assert policy("x") == {"action": "x"}
    assert 0.06 <= time.perf_counter() - start < 0.5 and calls == ["x"]
    assert policy.model_info() == {}  # a wrapped policy without declarations


HORIZON = 10
RTC = ["action_prefix", "prefix_length", "inference_delay"]


class FakePolicy:
    """An in-process chunk policy with declarations: a 2-frame ``state`` window and,
    optionally, the real-time chunking inputs. Records every request it gets."""

    def __init__(self, rtc: bool) -> None:
        self.requests: list[dict] = []
        self.info = {
            "inputs": [
                {"name": "state", "dtype": "float32", "shape": [2, 6], "history": {"steps": 2, "pad": "repeat_first"}},
                {"name": "image", "dtype": "uint8", "shape": [480, 640, 3]},
            ],
            "optional_inputs": RTC if rtc else [],
        }
        if rtc:
            self.info["inputs"] += [
                {"name": "action_prefix", "dtype": "float32", "shape": [HORIZON, 7], "optional": True},
                {"name": "prefix_length", "dtype": "int32", "shape": [1], "optional": True},
                {"name": "inference_delay", "dtype": "int32", "shape": [1], "optional": True},
            ]

    def infer(self, obs):
        self.requests.append({k: np.array(v) for k, v in obs.items()})
        return {"action": np.full((HORIZON, 7), 0.01 * len(self.requests), np.float32)}

    def model_info(self):
        return self.info


@pytest.mark.parametrize("merge,rtc", [("rtc", True), ("rtc", False), ("temporal_ensembling", True)])
def test_run_episodes_lets_the_runner_window_history_and_send_rtc_inputs_through_the_delayed_policy(
        monkeypatch, merge, rtc):
    """The loop passes each step's observation; the runner (told the model_info the delayed
    wrapper forwards) sends the 2-frame window, and the real-time chunking inputs only for
    ``rtc`` with a model that declares them."""
    monkeypatch.setattr(sim_loop.ReacherEnv, "max_steps", 12)
    fake = FakePolicy(rtc)
    delayed = sim_loop.DelayedPolicy(lambda: fake, 0.0)
    assert delayed.model_info() is fake.info
    report = sim_loop.run_episodes(delayed, [1, 2], sim_loop.PathReport("fake", "server", merge),
                                   model_info=delayed.model_info())
    assert report.episodes == 2 and report.steps == 24 and report.failures == 0, report
    assert report.rtc is (merge == "rtc" and rtc)
    first = fake.requests[0]
    assert first["state"].shape == (2, 6) and np.array_equal(first["state"][0], first["state"][1])  # padded
    assert first["image"].shape == (480, 640, 3)
    assert any(not np.array_equal(r["state"][0], r["state"][1]) for r in fake.requests)  # a real window
    with_prefix = [r for r in fake.requests if "action_prefix" in r]
    if report.rtc:
        assert len(with_prefix) == len(fake.requests)
        later = [r for r in with_prefix if r["prefix_length"][0] > 0]
        assert later, "no request carried the plan's not-yet-executed actions"
        r = later[0]
        n = int(r["prefix_length"][0])
        assert 1 <= r["inference_delay"][0] <= n and r["action_prefix"].shape == (HORIZON, 7)
        assert np.all(r["action_prefix"][n:] == 0)
    else:
        assert with_prefix == []
    assert report.seams >= 1 and report.seam_jerk >= report.seam_jerk_mean >= 0.0


@pytest.mark.integration
def test_latency_sweep_table_and_vectorized_lockstep_evaluation_of_the_history_model(tmp_path):
    """The history model (loaded beside the default) gets its two-frame windows from the
    runner behind the injected delay (a 422 would count as failures), the vectorized run
    from its own windows; ``--merge rtc`` reaches the transformer, which keeps the prefix."""
    with run_server(tmp_path, workers=1, args=("--model-path", "models/default")) as server:
        result = sim_loop.main([
            "--url", server.base_url, "--models", "history,transformer", "--episodes", "2", "--moving-target",
            "--latency-ms", "0,150", "--jitter-ms", "20", "--merge", "replace,rtc", "--skip-in-process",
            "--vectorized", "4",
        ])
        # The delayed wrapper forwards the real-time chunking inputs whole to the transformer.
        delayed = sim_loop.DelayedPolicy(lambda: PolicyClient(server.base_url, model="transformer"), 0.01)
        assert "action_prefix" in delayed.model_info()["optional_inputs"]
        obs = sim_loop.ReacherEnv(5, moving_target=True).reset()
        prefix = np.linspace(-1, 1, HORIZON * 7, dtype=np.float32).reshape(HORIZON, 7)
        chunk = delayed({**obs, "action_prefix": prefix, "prefix_length": np.array([6], np.int32),
                         "inference_delay": np.array([3], np.int32)})["action"]
        plain = delayed(obs)["action"]
        assert delayed.last_model_version == "1"
    np.testing.assert_array_equal(chunk[:3], prefix[:3])  # rows [0, d) are the prefix exactly
    # after them the fresh chunk shifted by the offset at the last committed row (k = 2),
    # fading as fast as the fresh chunk's own largest step allows
    shift = rtc_shift(plain, prefix[2].astype(np.float64) - plain[2], 2)
    np.testing.assert_allclose(chunk[3:], plain[3:] + shift[3:], rtol=1e-5, atol=1e-5)
    assert np.abs(np.diff(chunk[2:], axis=0)).max() <= np.abs(np.diff(plain, axis=0)).max() + 1e-5
    assert not np.allclose(plain[:3], prefix[:3])
    assert result["moving_target"] is True
    reports = result["reports"]
    assert [(r["model"], r["merge"], r["latency_ms"], r["jitter_ms"]) for r in reports] == [
        (m, merge, latency, 20.0) for m in ("history", "transformer") for merge in ("replace", "rtc")
        for latency in (0.0, 150.0)]
    for report in reports:
        assert report["path"] == "server" and report["episodes"] == 2, report
        assert report["failures"] == 0 and report["chunks"] >= 2, report
        assert report["seam_jerk"] >= report["seam_jerk_mean"] >= 0.0 and report["moving_target"], report
        assert report["rtc"] is (report["model"] == "transformer" and report["merge"] == "rtc"), report
        if report["latency_ms"]:
            assert report["latency_ms_p50"] >= 150.0  # the injected delay is in every round trip
    vectorized = result["vectorized"]["history"]
    assert vectorized["environments"] == 4 and vectorized["requests"] >= 1
    assert vectorized["rows"] == vectorized["env_steps"]  # one action per row, one row per live env per step
    assert vectorized["success_rate"] >= 0.75  # lockstep, no timing: the history model reaches moving targets
