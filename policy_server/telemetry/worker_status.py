"""Per-worker JSON documents of one server instance, readable by its sibling workers.

What each worker serves: every worker writes ``<run_dir>/workers/<pid>.json`` (atomically) whenever its set of
served models changes; the worker that took an ``/update_model`` reads them all to tell
when every worker serves the new version. Files of dead workers are ignored and removed.
The same mechanism carries each worker's request statistics (``kind="stats"``).
Without a run directory (one in-process app, as in tests) only this worker is known.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from typing import Any


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkerStatusBoard:
    """Per-worker status documents under ``run_dir`` (or in memory when it is None)."""

    def __init__(self, run_dir: str | None, kind: str = "workers", prune_dead: bool = True) -> None:
        self.directory = os.path.join(run_dir, kind) if run_dir else None
        self.prune_dead = prune_dead  # else a dead worker's last document stays (final statistics)
        self.expected = 1  # how many workers the instance runs (set when the worker starts)
        self._own: dict[str, Any] | None = None
        self._lock = threading.Lock()
        if self.directory:
            os.makedirs(self.directory, exist_ok=True)

    def _path(self, pid: int) -> str:
        return os.path.join(self.directory, f"{pid}.json")

    def publish(self, status: dict[str, Any]) -> None:
        """Replace this worker's document."""
        with self._lock:
            self._write(status)

    def update(self, **parts: Any) -> None:
        """Replace some top-level fields of this worker's document, keeping the others (each
        owner publishes its own parts: the runtime its models, the store follower its
        problems and acted-on generations)."""
        with self._lock:
            self._write({**(self._own or {}), **parts})

    def _write(self, status: dict[str, Any]) -> None:
        self._own = status
        if self.directory:
            fd, tmp = tempfile.mkstemp(prefix=".worker-", dir=self.directory)
            with os.fdopen(fd, "w") as fh:
                json.dump(status, fh)
            os.replace(tmp, self._path(os.getpid()))

    def read(self, include_dead: bool = False) -> dict[int, dict[str, Any]]:
        """Documents of the live workers (or of every worker that wrote one), by pid."""
        if not self.directory:
            return {os.getpid(): self._own} if self._own is not None else {}
        found = {}
        for entry in os.listdir(self.directory):
            stem, ext = os.path.splitext(entry)
            if ext != ".json" or not stem.isdigit():
                continue
            pid = int(stem)
            if not include_dead and not process_alive(pid):
                if self.prune_dead:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self.directory, entry))
                continue
            with contextlib.suppress(FileNotFoundError, ValueError):
                with open(os.path.join(self.directory, entry)) as fh:
                    found[pid] = json.load(fh)
        return found

    def remove(self) -> None:
        """Forget this worker (on exit)."""
        if self.directory and self.prune_dead:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(os.getpid()))
