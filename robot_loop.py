"""The robot loop: play action chunks at a fixed rate while the next ones are computed elsewhere.

:class:`ChunkRunner` makes a control loop over the network feel local. ``runner.act(obs)``
once per control step returns the action to apply now and never waits on the network once
an episode's first chunk is in. In the background it sends observations early enough, with
as many requests in flight as the measured latency needs, that a fresh action chunk
arrives before the plan runs out; every answer is stamped with the step of its
observation, so its rows land on the steps they were planned for. Overlapping chunks are
merged by a pluggable :class:`MergeStrategy`: ``replace``, ``blend``,
``temporal_ensembling`` (ACT) or ``rtc`` (real-time chunking). Inputs the model declares as
history windows are kept per episode and sent whole; the server stays stateless. Each
episode has an id and is pinned to the model version of its first answer, so a hot reload
never changes the policy under it (``on_version_retired``; :class:`EpisodeStopped`).

The runner talks to a :class:`ChunkPolicy`: any callable ``policy(obs, *, deadline_s=None)``
returning a dict with the chunk (``request_tools.PolicyClient`` is one, and so is a plain
in-process function ``policy(obs)``). Imports only numpy, the standard library and the
client's error types.

The loop lives in the ``policy_client`` package, one module per job, and is imported from
here: ``chunk_runner`` (the runner), ``chunk_policy`` (the protocol), ``chunk_schedule``
(the delay estimate and the ask point), ``rtc_inputs`` (the real-time chunking inputs),
``history_windows``, ``episode_pin``, ``request_threads``, ``runner_stats`` and ``loop_clock``; the merge strategies are
``chunk_merge``.
"""

from __future__ import annotations

from chunk_merge import (
    MERGE_STRATEGIES,
    BlendMerge,
    Chunk,
    MergeStrategy,
    RealTimeChunking,
    ReplaceMerge,
    TemporalEnsembling,
    merge_strategy,
)
from policy_client.chunk_policy import ChunkPolicy
from policy_client.chunk_runner import BACKOFF_S, MAX_THREADS, ChunkRunner  # noqa: F401 - re-exported
from policy_client.chunk_schedule import LATENCY_WINDOW, WARMUP_REQUESTS, rtc_request_ahead  # noqa: F401
from policy_client.episode_pin import ON_VERSION_RETIRED  # noqa: F401 - re-exported
from policy_client.errors import EpisodeStopped
from policy_client.history_windows import HISTORY_PADS  # noqa: F401 - re-exported
from policy_client.loop_clock import LoopClock
from policy_client.rtc_inputs import RTC_INPUTS
from policy_client.runner_stats import HISTORY_LEN, RunnerStats  # noqa: F401 - re-exported

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
