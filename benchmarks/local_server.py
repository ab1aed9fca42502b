"""Start ``python server.py`` on 127.0.0.1 for a benchmark, wait until it answers, stop it after."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_server(
    args: list[str], workers: int = 1, timeout_s: float = 180.0, tls_ca: str | None = None
) -> Iterator[tuple[str, Path]]:
    """Yield (base URL, scratch directory) of a fresh server with a private store; SIGTERM after.

    ``tls_ca``: the server serves HTTPS (``--certfile``/``--keyfile`` in ``args``); the URL is
    https and the readiness check trusts this CA bundle."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("POLICY_SERVER_")}
        env["POLICY_SERVER_MODEL_STORE"] = str(Path(tmp) / "store")
        log = open(Path(tmp) / "server.log", "wb")
        process = subprocess.Popen(
            [sys.executable, "server.py", "--port", str(port), "--workers", str(workers), *args],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        url = f"{'https' if tls_ca else 'http'}://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if process.poll() is not None:
                    raise RuntimeError((Path(tmp) / "server.log").read_text()[-3000:])
                try:
                    if requests.get(url + "/ready", timeout=2, verify=tls_ca or True).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("server not ready")
                time.sleep(0.5)
            yield url, Path(tmp)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
            log.close()
