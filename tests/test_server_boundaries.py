"""What the gunicorn master imports: never torch (a CUDA context or an OpenMP pool in the
master breaks the workers it forks). Checked in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from policy_server.launcher import ROOT


def test_loading_gunicorn_conf_and_the_server_imports_no_torch(tmp_path):
    code = textwrap.dedent("""
        import runpy
        import sys

        conf = runpy.run_path("gunicorn.conf.py")
        conf["on_starting"](None)  # as the master does before it forks
        import server

        server.create_app()  # what each worker builds before post_worker_init loads the model
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        assert not loaded, loaded
        print("no torch")
    """)
    env = {
        **os.environ,
        "POLICY_SERVER_RUN_DIR": str(tmp_path / "run"),
        "POLICY_SERVER_MODEL_STORE": str(tmp_path / "store"),
        "POLICY_SERVER_LOG_DIR": str(tmp_path / "logs"),
    }
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("no torch")
