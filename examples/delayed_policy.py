"""A chunk policy behind an injected round-trip delay (the sim loop's ``--latency-ms`` and
``--jitter-ms``). Re-exported by ``examples/sim_loop.py``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np


class DelayedPolicy:
    """A chunk policy behind an injected round-trip delay: ``latency_s`` plus uniform
    ``[0, jitter_s)`` (seeded), half before the request and half after. Thread-safe: each
    calling thread gets its own client from ``make_client`` (a runner may keep several
    requests in flight). The observation dict is forwarded whole (history windows and the
    real-time chunking inputs included); ``model_info()`` and ``last_model_version`` are the
    wrapped client's, so it is a ``robot_loop.ChunkPolicy`` like the client itself."""

    def __init__(self, make_client: Callable[[], Any], latency_s: float, jitter_s: float = 0.0, seed: int = 0) -> None:
        self.make_client = make_client
        self.latency_s = latency_s
        self.jitter_s = jitter_s
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._info: Mapping[str, Any] | None = None

    def _policy(self) -> Any:
        policy = getattr(self._local, "policy", None)
        if policy is None:
            policy = self._local.policy = self.make_client()
        return policy

    def __call__(self, obs: Mapping[str, Any]) -> Mapping[str, Any]:
        with self._lock:
            delay = self.latency_s + self.jitter_s * float(self._rng.random())
        policy = self._policy()
        time.sleep(delay / 2)
        try:
            return policy.infer(obs) if hasattr(policy, "infer") else policy(obs)
        finally:
            time.sleep(delay / 2)

    def model_info(self) -> Mapping[str, Any]:
        """The wrapped policy's ``/model_info`` (read once, without the injected delay);
        ``{}`` for a policy without one."""
        if self._info is None:
            policy = self._policy()
            self._info = policy.model_info() if callable(getattr(policy, "model_info", None)) else {}
        return self._info

    @property
    def last_model_version(self) -> Any:
        """The model version of this thread's last answer (None before one)."""
        return getattr(getattr(self._local, "policy", None), "last_model_version", None)
