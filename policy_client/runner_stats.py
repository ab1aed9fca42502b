"""What a :class:`~policy_client.chunk_runner.ChunkRunner` did: counts, and latency, delay and
staleness histories bounded to the last ``HISTORY_LEN`` samples, JSON-ready (numpy only)."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["HISTORY_LEN", "RunnerStats"]

HISTORY_LEN = 1000  # samples kept of each per-request / per-step history in RunnerStats


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else 0.0


@dataclass
class RunnerStats:
    """What a ``ChunkRunner`` did. Histories keep the last ``HISTORY_LEN`` samples."""

    steps: int = 0  # actions handed out by act()
    requests: int = 0  # chunk requests sent
    chunks: int = 0  # chunks received and merged into the plan
    failures: int = 0  # requests that failed (error, timeout, deadline): the runner retried
    starved_steps: int = 0  # steps with no planned action: the fallback was played
    stale_chunks: int = 0  # chunks that arrived after their last action's step: dropped
    out_of_order: int = 0  # answers older than a chunk already received: dropped
    skipped_actions: int = 0  # leading rows of received chunks whose step had passed
    stale_prefixes: int = 0  # rtc answers whose prefix was no longer the plan: anchored to it
    in_flight: int = 0  # requests out now
    max_in_flight: int = 0  # the most requests out at once
    delay_steps: int = 0  # the delay the runner plans with now: steps from observation to answer (high estimate)
    version_switches: int = 0  # episodes moved to another model version (on_version_retired="continue")
    episodes_stopped: int = 0  # episodes stopped because their version was retired (on_version_retired="stop")
    latencies_s: deque = field(default_factory=lambda: deque(maxlen=HISTORY_LEN))  # successful requests
    delays_steps: deque = field(default_factory=lambda: deque(maxlen=HISTORY_LEN))  # measured, per answer
    staleness_steps: deque = field(default_factory=lambda: deque(maxlen=HISTORY_LEN))  # per played action
    versions: dict[str, int] = field(default_factory=dict)  # model version -> chunks received
    errors: list[str] = field(default_factory=list)  # the last few failure messages

    def to_dict(self) -> dict[str, Any]:
        """Counts, latency p50/p99 (ms) and delay/staleness summaries (steps), JSON-ready."""
        out: dict[str, Any] = {k: getattr(self, k) for k in (
            "steps", "requests", "chunks", "failures", "starved_steps", "stale_chunks", "out_of_order",
            "skipped_actions", "stale_prefixes", "in_flight", "max_in_flight", "delay_steps", "version_switches",
            "episodes_stopped")}
        out["latency_ms_p50"] = _percentile(self.latencies_s, 50) * 1e3
        out["latency_ms_p99"] = _percentile(self.latencies_s, 99) * 1e3
        out["delay_steps_p50"] = _percentile(self.delays_steps, 50)
        out["delay_steps_max"] = max(self.delays_steps, default=0)
        out["staleness_steps_p50"] = _percentile(self.staleness_steps, 50)
        out["staleness_steps_max"] = max(self.staleness_steps, default=0)
        out["versions"] = dict(self.versions)
        out["errors"] = list(self.errors)
        return out

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)
