"""What an interrupted store write leaves behind, and how it is found: staged candidates of
processes that died mid-update, and temp files of writers that died before their rename.

Called by :class:`policy_server.store.model_store.ModelStore` (its ``stage`` and ``recover``); no lock
is taken here, the callers hold what they need.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time

from policy_server.telemetry.worker_status import process_alive

STALE_STAGING_S = 3600.0
HOST = socket.gethostname().replace("-", "_")[:64] or "host"


def clean_stale(staging: str) -> list[str]:
    """Candidates left by a process that died mid-update: of a dead process on this host,
    or older than an hour (another host's). Returns the removed paths."""
    cutoff = time.time() - STALE_STAGING_S
    removed = []
    for entry in os.scandir(staging):
        owner = entry.name.partition("-")[2].rpartition("-")[0]
        pid, _, host = owner.partition("@")
        with contextlib.suppress(OSError):
            dead = host == HOST and pid.isdigit() and not process_alive(int(pid))
            if dead or entry.stat(follow_symlinks=False).st_mtime < cutoff:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
                removed.append(entry.path)
    return removed


def remove_temps(model_dir: str, prefixes: tuple[str, ...]) -> list[str]:
    """Temp files (names starting with one of ``prefixes``) of writers that died before their
    rename. Call while no writer of them is live (under the model's lock for the pointer)."""
    removed = []
    for entry in os.listdir(model_dir):
        if entry.startswith(prefixes):
            path = os.path.join(model_dir, entry)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
    return removed
