"""Admission: everything one worker counts to decide whether it can take one more request.

One object owns the counts, and the poller and the request threads tell it what happened:

- a request is *held* from its first byte to its answer (:meth:`Admission.begin`,
  :meth:`Admission.end`); a WebSocket message likewise, and a WebSocket's first frame while
  a thread sends it;
- while its head and body arrive it is also *reading*, per worker and per client address
  (bounded by ``max_reading_per_worker`` and ``max_reading_per_client``), and its body's
  bytes are taken from the worker's :class:`ByteBudget` (``max_reading_bytes``; images
  being decoded take from it too) until :meth:`Admission.stop_reading`;
- once complete it is *handed off* to the request threads' pool and then *taken* by a thread;
  :meth:`Admission.overloaded` sheds new requests when too many are held, when the oldest one
  still waiting for a thread has waited too long, or when the budget has no room.

Poller-thread methods are called only by the poller; :meth:`Admission.taken` and
:meth:`Admission.served` by request threads (under a lock).
"""

from __future__ import annotations

import collections
import threading
import time

from policy_server.front_door.http import Refusal
from policy_server.wsgi_keys import ByteBudget

SERVICE_EWMA = 0.05  # weight of the newest request in the mean service time


class Admission:
    """The counts of one worker (``settings``: its ServerConfig; ``threads``: its request threads)."""

    def __init__(self, settings, threads: int) -> None:
        self.settings = settings
        self.threads = threads
        self.held = 0  # requests from first byte to answer
        self.reading = 0  # requests whose head or body is still arriving ...
        self.reading_by_addr: dict[str, int] = {}  # ... and by client address
        self.budget = ByteBudget(settings.max_reading_bytes)  # bodies being read, images being decoded
        self.handed_off = 0  # requests given to the request threads' pool ...
        self.taken = 0  # ... and taken by a thread (counted by the thread, under _lock)
        self.service_s = 0.0  # moving average of a request thread's time per request
        self.waiting: collections.deque = collections.deque()  # (conn, request number), oldest first
        self._lock = threading.Lock()

    # -- the poller ------------------------------------------------------------------

    def begin(self, conn) -> Refusal | None:
        """A request's first byte (``conn.state`` is READING): held and reading from now. Returns
        the refusal it gets unless its head shows a probe, when a reading cap is passed."""
        s = self.settings
        self.held += 1
        self.reading += 1
        self.reading_by_addr[conn.addr] = self.reading_by_addr.get(conn.addr, 0) + 1
        if self.reading > s.max_reading_per_worker:
            return Refusal(503, "overloaded", "too many requests being sent to this worker", "too_many_readers",
                           retry=True)
        if self.reading_by_addr[conn.addr] > s.max_reading_per_client:
            return Refusal(503, "overloaded", "too many requests being sent from this address",
                           "too_many_readers_per_client", retry=True)
        return None

    def stop_reading(self, conn) -> None:
        """Its head and body are in, or it was refused: no longer reading; its body's bytes go back."""
        self.reading -= 1
        self.budget.give(conn.reserved)
        conn.reserved = 0
        left = self.reading_by_addr[conn.addr] - 1
        if left:
            self.reading_by_addr[conn.addr] = left
        else:
            del self.reading_by_addr[conn.addr]

    def hold(self) -> None:
        """Hold one more request that is not read as a request head and body (a WebSocket
        message, from its first byte; a WebSocket's first frame while a thread sends it)."""
        self.held += 1

    def end(self) -> None:
        """A held request is over: answered, refused or gone."""
        self.held -= 1

    def overloaded(self, length: int) -> str | None:
        """Why a new request with a body of ``length`` bytes cannot be admitted now, or None;
        when it is admitted its body's bytes are taken from the budget (``conn.reserved``
        gives them back through :meth:`stop_reading`).

        Three bounds: the requests held (``admission_limit``), how long the requests waiting
        for a thread will wait (their count times the mean service time, and the oldest one's
        wait so far, against ``shed_wait_ms``: past it the worker cannot answer what it holds
        within their deadlines, so it sheds new ones), and the bytes of request data held
        (``max_reading_bytes``; one body alone always fits).
        """
        s = self.settings
        if self.held > s.admission_limit:
            return f"{self.held - 1} requests held by this worker"
        queued = self.handed_off - self.taken  # waiting for a request thread
        expected_ms = 1e3 * queued * self.service_s / self.threads
        if expected_ms > s.shed_wait_ms:
            return f"{queued} requests wait for a thread here (about {expected_ms:.0f} ms)"
        waiting = self.waiting
        while waiting and (waiting[0][0].nreq != waiting[0][1] or waiting[0][0].taken):
            waiting.popleft()
        if waiting:
            waited_ms = 1e3 * (time.monotonic() - waiting[0][0].arrived)
            if waited_ms > s.shed_wait_ms:
                return f"this worker's oldest waiting request arrived {waited_ms:.0f} ms ago"
        if not self.budget.take(length):
            return f"{self.budget.used} bytes of request data held by this worker"
        return None

    def hand_off(self, conn) -> None:
        """``conn``'s request goes to the request threads' pool (not the probe lane)."""
        conn.taken = False
        self.waiting.append((conn, conn.nreq))
        self.handed_off += 1

    # -- request threads ---------------------------------------------------------------

    def take(self, conn, counted: bool) -> None:
        """A thread takes ``conn``'s request; ``counted``: it came through :meth:`hand_off`."""
        conn.taken = True  # no longer waiting for a thread (read by overloaded)
        if counted:
            with self._lock:
                self.taken += 1

    def served(self, took_s: float) -> None:
        """A request thread spent ``took_s`` on one request (the mean feeds :meth:`overloaded`)."""
        with self._lock:
            mean = self.service_s
            self.service_s = took_s if not mean else mean + SERVICE_EWMA * (took_s - mean)
