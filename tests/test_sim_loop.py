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
