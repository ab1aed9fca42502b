"""Start a real gunicorn policy server on a free loopback port for integration tests."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

from tests.support.wait import eventually

ROOT = Path(__file__).resolve().parents[2]
READY_LINE = re.compile(r"worker (\d+) ready")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    process: subprocess.Popen
    port: int
    log_path: Path
    scheme: str = "http"

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready_workers(self) -> set[int]:
        return {int(pid) for pid in READY_LINE.findall(self.log())}


@contextlib.contextmanager
def run_server(
    tmp_path: Path,
    *,
    workers: int = 2,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    command: list[str] | None = None,
    startup_timeout_s: float = 90.0,
    port: int | None = None,
    tcp: bool = True,
    tls_ca: str | None = None,
) -> Iterator[RunningServer]:
    """Start ``python server.py`` (or ``command``), wait until every worker is ready, stop it after.

    ``port`` (default: a free one) lets a test bring a server back where a client expects it.
    ``tcp=False``: the server binds no TCP port (``--uds-only``), so no /health check over TCP.
    ``tls_ca``: the server serves HTTPS (pass ``--certfile``/``--keyfile`` in ``args``);
    ``base_url`` is https and the /health check trusts this CA bundle.

    Readiness is read from the log: each worker logs "worker PID ready" once warmed up.
    """
    port = port or free_port()
    tmp_path.mkdir(parents=True, exist_ok=True)
    log_path = tmp_path / f"server-{port}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("POLICY_SERVER_")}
    full_env["POLICY_SERVER_MODEL_STORE"] = str(tmp_path / f"store-{port}")  # never the repo's
    full_env.update(env or {})
    full_env["PYTHONUNBUFFERED"] = "1"
    if command is None:
        command = [
            sys.executable, "server.py", "--port", str(port), "--workers", str(workers),
            "--threads", "4", *args,
        ]
    else:
        full_env["POLICY_SERVER_PORT"] = str(port)
        full_env.setdefault("POLICY_SERVER_WORKERS", str(workers))
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command, cwd=ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = RunningServer(process, port, log_path, "https" if tls_ca else "http")

    def all_ready() -> bool:  # a server that exited is not waited for
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        return len(server.ready_workers()) >= workers

    try:
        eventually(all_ready, startup_timeout_s, f"{workers} workers ready", every_s=0.1, context=server.log)
        if tcp:
            requests.get(server.base_url + "/health", timeout=5, verify=tls_ca or True).raise_for_status()
        yield server
    finally:
        stop(process)


def stop(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def errors_in(log: str) -> list[str]:
    """Lines logged at ERROR (ours or gunicorn's) and tracebacks."""
    return [line for line in log.splitlines() if " ERROR " in line or "[ERROR]" in line or "Traceback" in line]
