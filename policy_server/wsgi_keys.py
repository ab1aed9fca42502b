"""What the front door and the app tell each other about one request, through its WSGI environ.

The front door (:mod:`policy_server.front_door.worker`) sets the first three before the app runs;
the app sets :data:`DEADLINE` once it knows the request's deadline, and :data:`UPGRADE` when
it answers a WebSocket upgrade. Outside the front door
(a test client, plain gthread) none is set, and the app falls back as each reader says.
"""

from __future__ import annotations

import threading

ARRIVED = "policy_server.arrived"  # time.monotonic() of the request's first byte
DEFERRED = "policy_server.deferred"  # a list: counting appended by the app, called once the answer was written
BUDGET = "policy_server.byte_budget"  # the worker's ByteBudget: request bodies being read, images being decoded
DEADLINE = "policy_server.deadline"  # set by the app: time.monotonic() past which a 200 is answered 504 instead
UPGRADE = "policy_server.upgrade"  # None from the front door (it can upgrade); the app's WebSocket session with a 101


class ByteBudget:
    """Bytes of request data one worker holds at once: bodies being received (the front
    door's poller) and encoded images being decoded (request threads), against one limit
    (``max_reading_bytes``). Thread-safe.

    :meth:`take` admits ``n`` bytes when they fit, or when nothing else is held (one request
    alone always fits: its own size limit bounds it).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, n: int, *, force: bool = False) -> bool:
        """Hold ``n`` more bytes; False (nothing held) when they do not fit now, unless ``force``."""
        with self._lock:
            if n and self.used and self.used + n > self.limit and not force:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        """Release ``n`` bytes taken before."""
        with self._lock:
            self.used -= n
