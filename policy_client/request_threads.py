"""The request threads of a ``ChunkRunner``: requests in flight, each on a thread of its own.

A thread is started when every existing one is busy, up to :data:`MAX_THREADS`; each one
after the first calls its own ``policy.clone()`` when the policy has one (a ``PolicyClient``
is not thread-safe), else the same policy. Each request's answer (or the exception it
raised) goes to ``answers`` for the loop thread to take, with its latency and the model
version that answered.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping
from typing import Any

from policy_client.chunk_policy import Clonable, Closable, ReportsVersion
from policy_client.errors import PolicyClientError, PolicyTimeoutError
from policy_client.runner_stats import RunnerStats

__all__ = ["MAX_THREADS", "RequestThreads"]

MAX_THREADS = 32


class RequestThreads:
    """Runs each submitted request on up to :data:`MAX_THREADS` threads; counts the requests in
    flight in ``stats``. A request's answer must hold ``action_key``; ``accepts_deadline``:
    the policy takes ``deadline_s``."""

    def __init__(self, policy: Any, answers: queue.SimpleQueue, stats: RunnerStats, action_key: str,
                 accepts_deadline: bool) -> None:
        self.policy = policy
        self.answers = answers
        self.action_key = action_key
        self.accepts_deadline = accepts_deadline
        self.stats = stats
        self.busy = 0  # requests submitted and not answered
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._clones: list[Any] = []

    def submit(self, job: tuple) -> None:
        """Queue one request ``(episode, id, step, obs, deadline, pinned)`` (``deadline``: a
        ``time.monotonic()`` instant; ``pinned``: the episode keywords), starting a thread for
        it when every thread is busy. Its answer is ``(episode, id, step, outputs or exception,
        latency_s, version)``."""
        with self._lock:
            self.busy += 1
            if self.busy > len(self._threads) and len(self._threads) < MAX_THREADS:
                policy = self.policy
                if self._threads and isinstance(self.policy, Clonable):
                    policy = self.policy.clone()
                    self._clones.append(policy)
                thread = threading.Thread(target=self._serve, args=(policy,), name="chunk-runner", daemon=True)
                self._threads.append(thread)
                thread.start()
            self.stats.in_flight = self.busy
            self.stats.max_in_flight = max(self.stats.max_in_flight, self.busy)
        self._jobs.put(job)

    def _serve(self, policy: Any) -> None:
        while (job := self._jobs.get()) is not None:
            answer = self._request(policy, *job)
            with self._lock:
                self.busy -= 1
                self.stats.in_flight = self.busy
            self.answers.put(answer)

    def _request(self, policy: Any, episode: int, rid: int, step: int, obs: Any, deadline: float,
                 pinned: Mapping[str, Any]) -> tuple:
        start = time.monotonic()
        version = None
        try:
            if start >= deadline:
                raise PolicyTimeoutError("deadline passed while the request waited for a thread")
            kwargs = {"deadline_s": deadline - start} if self.accepts_deadline else {}
            result: Any = policy(obs, **kwargs, **pinned)
            version = policy.last_model_version if isinstance(policy, ReportsVersion) else None
            if not isinstance(result, Mapping) or self.action_key not in result:
                raise PolicyClientError(f"policy output has no {self.action_key!r}")
        except Exception as exc:  # noqa: BLE001 - the loop goes on; the failure is reported
            result = exc
        return episode, rid, step, result, time.monotonic() - start, version

    def close(self, timeout_s: float) -> None:
        """Stop the threads after the requests in flight (waiting at most ``timeout_s`` in all),
        and close the clones."""
        for _ in self._threads:
            self._jobs.put(None)
        give_up = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(timeout=max(0.0, give_up - time.monotonic()))
        for clone in self._clones:
            if isinstance(clone, Closable):
                clone.close()
        self._threads, self._clones = [], []
