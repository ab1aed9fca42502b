"""Unix domain sockets: --uds beside TCP or instead of it, the socket's file mode, and the
client's unix:// URLs, end to end through gunicorn."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import requests

from policy_server.config import ServerConfig
from policy_server.errors import ConfigError
from request_tools import ChunkRunner, LoopClock, PolicyClient, PolicyConnectionError, unix_socket_path
from tests.support.serving import ROOT, run_server

HORIZON_OF_DEFAULT = 10  # models/default answers 10-action chunks: ask at every step, so several are out


def test_unix_urls():
    assert unix_socket_path("unix:///tmp/policy.sock") == "/tmp/policy.sock"
    assert unix_socket_path("http://127.0.0.1:50000") is None
    with pytest.raises(ValueError):
        unix_socket_path("unix://relative.sock")


def test_config_checks_the_socket_settings():
    ServerConfig(uds="/tmp/x.sock", uds_mode="600").validate()
    assert ServerConfig(uds_mode="0660").uds_file_mode() == 0o660
    for bad in ("rw", "1777", "999"):
        with pytest.raises(ConfigError, match="uds_mode"):
            ServerConfig(uds="/tmp/x.sock", uds_mode=bad).validate()
    with pytest.raises(ConfigError, match="uds_only"):
        ServerConfig(uds_only=True).validate()


def test_the_socket_is_bound_with_its_mode_never_wider(tmp_path):
    """gunicorn binds the socket under the conf's umask: mode 600 from the bind on, before
    when_ready's chmod (a local process cannot connect in between)."""
    sock = tmp_path / "policy.sock"
    script = (
        "import logging, os, stat, runpy\n"
        "from gunicorn.config import Config\n"
        "from gunicorn import sock as gsock\n"
        "conf = runpy.run_path('gunicorn.conf.py')\n"
        "cfg = Config()\n"
        "cfg.set('bind', conf['bind'])\n"
        "cfg.set('umask', conf.get('umask', 0))\n"  # gunicorn's default: 0
        "listeners = gsock.create_sockets(cfg, logging.getLogger('t'))\n"
        f"print(oct(stat.S_IMODE(os.stat({str(sock)!r}).st_mode)))\n"
    )
    env = {**os.environ, "POLICY_SERVER_UDS": str(sock), "POLICY_SERVER_UDS_MODE": "600",
           "POLICY_SERVER_UDS_ONLY": "1", "POLICY_SERVER_RUN_DIR": str(tmp_path / "run")}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "0o600"


def test_missing_socket_is_a_connection_error(tmp_path):
    client = PolicyClient(f"unix://{tmp_path}/nobody.sock", retries=1, check_spec=False)
    assert not client.health()
    with pytest.raises(PolicyConnectionError, match="nobody.sock"):
        client.infer({"x": np.zeros(1)})


@pytest.mark.integration
def test_socket_beside_tcp_gives_the_same_answers(tmp_path):
    sock = tmp_path / "policy.sock"
    # every request waits 30 ms for company, so a round trip spans several 10 ms steps of the
    # runner below however fast the box (requests overlap: the runner must clone its client)
    args = ("--uds", str(sock), "--uds-mode", "600", "--max-batch-delay-ms", "30")
    with run_server(tmp_path, workers=1, args=args) as server:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600 and stat.S_ISSOCK(os.stat(sock).st_mode)
        from examples.reacher import ReacherEnv

        obs = ReacherEnv(seed=2).reset()
        with PolicyClient(server.base_url) as tcp, PolicyClient(f"unix://{sock}") as uds:
            assert uds.ready() and uds.model_info()["name"] == "default"
            expected = tcp.infer(obs)["action"]
            for _ in range(3):  # one keep-alive connection
                np.testing.assert_array_equal(uds.infer(obs)["action"], expected)
            np.testing.assert_allclose(uds.infer_batch([obs, obs])["action"], np.stack([expected] * 2), atol=1e-5)
            with uds.clone() as twin:  # another thread's connection: over the same socket
                assert twin.socket_path == str(sock)
                np.testing.assert_array_equal(twin.infer(obs)["action"], expected)
            # the chunk runner clones its client for each request it keeps in flight
            with ChunkRunner(uds, rate_hz=100, request_ahead=HORIZON_OF_DEFAULT, max_in_flight=3) as runner:
                clock = LoopClock(100)  # 10 ms steps
                for _ in range(60):
                    runner.act(obs)
                    clock.tick()
            assert runner.stats.max_in_flight >= 2  # clones were used
            # (its 90 ms chunk deadlines may pass on a busy box: 504s, but never a connection error)
            refused = [e for e in runner.stats.errors if "onnect" in e]
            assert runner.stats.chunks >= 2 and not refused, runner.stats.errors
        assert "Traceback" not in server.log()


@pytest.mark.integration
def test_socket_only(tmp_path):
    sock = tmp_path / "only.sock"
    with run_server(tmp_path, workers=1, args=("--uds", str(sock), "--uds-only"), tcp=False) as server:
        with PolicyClient(f"unix://{sock}") as uds:
            assert uds.health() and uds.ready()
        with pytest.raises(requests.ConnectionError):
            requests.get(server.base_url + "/health", timeout=2)
