"""locustfile.py: a short, bounded headless run against a local server with zero failures."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from tests.support.serving import ROOT, run_server
from tests.support.tiny_model import write_tiny_model

pytestmark = pytest.mark.integration


def test_headless_locust_run_has_no_failures(tmp_path):
    root = tmp_path / "models"
    write_tiny_model(root / "tiny", tag=0.0)
    with run_server(
        tmp_path, workers=2, args=("--model-path", str(root / "tiny"), "--model-root", str(root))
    ) as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("POLICY_")}
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "locust",
                "-f",
                str(ROOT / "locustfile.py"),
                "--headless",
                "-u",
                "4",
                "-r",
                "4",
                "-t",
                "4s",
                "--stop-timeout",
                "5",
                "--host",
                server.base_url,
                "--csv",
                str(tmp_path / "run"),
                "--only-summary",
                "--exit-code-on-error",
                "1",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    with open(tmp_path / "run_stats.csv") as fh:
        rows = {row["Name"]: row for row in csv.DictReader(fh)}
    infer = rows["/infer"]
    assert infer["Type"] == "POST" and int(infer["Request Count"]) > 20
    assert int(infer["Failure Count"]) == 0
    assert float(infer["Average Content Size"]) > 280  # the encoded (10, 7) float32 action
    assert float(infer["Median Response Time"]) > 0
