"""examples/sim_loop.py end to end: both shipped policies close the reacher's loop over a
real server (the transformer loaded next to the default) and in-process."""

from __future__ import annotations

import json

import pytest
import requests

from examples import sim_loop
from tests.serving import run_server

EPISODES = 3


@pytest.mark.integration
def test_both_policies_close_the_loop_over_the_server_as_in_process(tmp_path):
    out = tmp_path / "sim.json"
    with run_server(tmp_path, workers=2, args=("--model-path", "models/default")) as server:
        result = sim_loop.main([
            "--url", server.base_url, "--models", "default,transformer", "--episodes", str(EPISODES),
            "--json", str(out),
        ])
        served = {m["name"]: m["state"] for m in requests.get(server.base_url + "/models").json()["models"]}
    assert served == {"default": "serving", "transformer": "serving"}  # both at once
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    reports = {(r["model"], r["path"]): r for r in result["reports"]}
    assert set(reports) == {(m, p) for m in ("default", "transformer") for p in ("server", "in-process")}
    for (model, path), report in reports.items():
        assert report["episodes"] == EPISODES and report["steps"] > 0, report
        assert report["failures"] == 0 and report["chunks"] >= EPISODES, report
        assert report["successes"] >= EPISODES - 1, report  # the shipped policies reach >= 90%
        assert report["latency_ms_p50"] > 0, report
        if path == "server":
            assert report["versions"] == {"1": report["chunks"]}, report  # every chunk says its version
        else:
            assert report["versions"] == {}, report
    for model in ("default", "transformer"):
        assert abs(reports[model, "server"]["successes"] - reports[model, "in-process"]["successes"]) <= 1
    assert result["attention"]["default"] is None  # the CNN has no optional outputs
    attention = result["attention"]["transformer"]
    assert len(attention["shape"]) >= 2 and abs(attention["row_sums"] - 1.0) < 1e-3


def test_delayed_policy_adds_the_latency_and_seeded_jitter():
    import time

    calls = []
    policy = sim_loop.DelayedPolicy(lambda: (lambda obs: calls.append(obs) or {"action": obs}), 0.06, 0.02, seed=3)
    start = time.perf_counter()
    assert policy("x") == {"action": "x"}
    assert 0.06 <= time.perf_counter() - start < 0.5 and calls == ["x"]


@pytest.mark.integration
def test_latency_sweep_table_and_vectorized_lockstep_evaluation_of_the_history_model(tmp_path):
    """The history model (loaded beside the default) gets its two-frame windows: a 422 would
    count as failures and stop the vectorized run."""
    with run_server(tmp_path, workers=1, args=("--model-path", "models/default")) as server:
        result = sim_loop.main([
            "--url", server.base_url, "--models", "history", "--episodes", "2", "--moving-target",
            "--latency-ms", "0,150", "--jitter-ms", "20", "--skip-in-process", "--vectorized", "4",
        ])
    assert result["moving_target"] is True
    reports = result["reports"]
    assert [(r["path"], r["merge"], r["latency_ms"], r["jitter_ms"]) for r in reports] == [
        ("server", "replace", 0.0, 20.0), ("server", "replace", 150.0, 20.0)]
    for report in reports:
        assert report["episodes"] == 2 and report["failures"] == 0 and report["chunks"] >= 2, report
        assert report["seam_jerk"] >= report["seam_jerk_mean"] >= 0.0 and report["moving_target"], report
    assert reports[1]["latency_ms_p50"] >= 150.0  # the injected delay is in every round trip
    vectorized = result["vectorized"]["history"]
    assert vectorized["environments"] == 4 and vectorized["requests"] >= 1
    assert vectorized["rows"] == vectorized["env_steps"]  # one action per row, one row per live env per step
    assert vectorized["success_rate"] >= 0.75  # lockstep, no timing: the history model reaches moving targets
