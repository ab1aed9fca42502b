"""The robot loop, as older code imports it: ``from robot_loop import ChunkRunner, LoopClock``.

A compatibility face: everything lives in the :mod:`policy_client` package (import it from
there in new code). :class:`ChunkRunner` plays action chunks at a fixed rate while the next
ones are computed elsewhere, merging overlapping chunks with a :class:`MergeStrategy`
(``replace``, ``blend``, ``temporal_ensembling``, ``rtc``); see
``policy_client.chunk_runner``.
"""

from __future__ import annotations

from policy_client import (
    MERGE_STRATEGIES,
    RTC_INPUTS,
    BlendMerge,
    Chunk,
    ChunkPolicy,
    ChunkRunner,
    EpisodeStopped,
    LoopClock,
    MergeStrategy,
    RealTimeChunking,
    ReplaceMerge,
    RunnerStats,
    TemporalEnsembling,
    merge_strategy,
)
from policy_client.chunk_runner import BACKOFF_S, MAX_THREADS  # noqa: F401 - importable from here as before
from policy_client.chunk_schedule import LATENCY_WINDOW, WARMUP_REQUESTS, rtc_request_ahead  # noqa: F401
from policy_client.episode_pin import ON_VERSION_RETIRED  # noqa: F401
from policy_client.history_windows import HISTORY_PADS  # noqa: F401
from policy_client.runner_stats import HISTORY_LEN  # noqa: F401

__all__ = [
    "MERGE_STRATEGIES",
    "RTC_INPUTS",
    "BlendMerge",
    "Chunk",
    "ChunkPolicy",
    "ChunkRunner",
    "EpisodeStopped",
    "LoopClock",
    "MergeStrategy",
    "RealTimeChunking",
    "ReplaceMerge",
    "RunnerStats",
    "TemporalEnsembling",
    "merge_strategy",
]
