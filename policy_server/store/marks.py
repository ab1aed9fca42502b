"""A model's pinned-use mark (its ``PINNED`` file): when a worker last served a request
pinned to the model's retained version.

Every worker sharing the store keeps a retained version while any of them serves episodes
pinned to it (see :mod:`policy_server.serving.store_follower`). The mark is one small JSON file,
replaced atomically without the model's lock: concurrent marks all say "recently".
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

PINNED = "PINNED"


def mark_pinned_use(model_dir: str, version: int, at: float) -> None:
    """Record a request pinned to ``version`` served at ``at`` (wall-clock) in ``model_dir``
    (the model's directory in the store). OSError when it cannot be written."""
    data = json.dumps({"version": version, "at": at}).encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{PINNED}-", dir=model_dir)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, os.path.join(model_dir, PINNED))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def pinned_use(model_dir: str, version: int) -> float | None:
    """When a worker last marked a request pinned to ``version`` in ``model_dir``, or None
    (no mark, another version's, or an unreadable one)."""
    try:
        with open(os.path.join(model_dir, PINNED), "rb") as fh:
            mark = json.loads(fh.read())
        return float(mark["at"]) if mark.get("version") == version else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
