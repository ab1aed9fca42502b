"""A server under test in the serving benchmarks: its command line, a process group started
on a 127.0.0.1 port and warmed up, stopped with it, and its CPU time read from /proc.
Re-exported by ``benchmarks/bench_serving.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Target:
    name: str
    command: list[str]
    env: dict[str, str]
    make_client: Callable[[int], Callable[[], int]]
    port: int
    real_client: Callable[[int], Callable[[], int]] | None = None
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    results: list[dict] = field(default_factory=list)

    def start(self, log_dir: Path) -> None:
        self.log_path = log_dir / f"{self.name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("POLICY_SERVER_")}
        env.update(self.env)
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(
                self.command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                call = self.make_client(self.port)
                for _ in range(20):  # reach every worker past its warm-up
                    call()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)

    def cpu_seconds(self) -> float:
        """User + system CPU of the server's process group (master and workers)."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.process.pid:  # process group id
                total += (int(fields[11]) + int(fields[12])) / ticks
        return total
