"""How overlapping action chunks make one plan: the merge strategies of ``robot_loop.ChunkRunner``.

A :class:`Chunk` computed from the observation of step ``s`` holds rows for steps
``s .. s + H - 1``. When a new chunk arrives while older ones still cover the coming steps,
a :class:`MergeStrategy` says which action each step plays:

- ``replace`` (:class:`ReplaceMerge`): the newest chunk covering the step.
- ``blend`` (:class:`BlendMerge`): the newest chunk, cross-faded linearly from the plan it
  replaces over its first ``steps`` steps after arrival.
- ``temporal_ensembling`` (:class:`TemporalEnsembling`): the weighted mean of every chunk
  that covers the step, weights ``w_i = exp(-m * i)`` with ``i = 0`` the oldest chunk
  (Zhao et al. 2023, "Learning Fine-Grained Bimanual Manipulation with Low-Cost Hardware",
  ACT, section 3.3).
- ``rtc`` (:class:`RealTimeChunking`): requests carry the plan's not-yet-executed actions
  and the inference delay, the policy keeps that prefix and continues smoothly from it
  (Black et al. 2025, "Real-Time Execution of Action Chunking Flow Policies"), so its
  answer is played as it comes (replace). An answer whose prefix is
  no longer the plan (another answer was adopted while it was out: ``Chunk.stale_prefix``)
  is anchored to the plan it replaces, the offset spread over the following H steps.

numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = [
    "MERGE_STRATEGIES",
    "BlendMerge",
    "Chunk",
    "MergeStrategy",
    "RealTimeChunking",
    "ReplaceMerge",
    "TemporalEnsembling",
    "merge_strategy",
]


@dataclass(frozen=True)
class Chunk:
    """An action chunk in the plan: ``actions[i]`` is for step ``step + i``; ``arrived`` is
    the step at which the runner took it in; ``stale_prefix``: a real-time chunking answer
    conditioned on a prefix that is no longer the plan (``rtc`` anchors it to the plan)."""

    step: int
    arrived: int
    actions: np.ndarray  # [H, *action_shape]
    stale_prefix: bool = False

    @property
    def end(self) -> int:
        """The first step after the chunk."""
        return self.step + len(self.actions)

    def covers(self, step: int) -> bool:
        return self.step <= step < self.end

    def at(self, step: int) -> np.ndarray:
        return self.actions[step - self.step]


class MergeStrategy(Protocol):
    """Maps a step and the chunks received (oldest first, by observation step) to the
    action for that step, or None when no chunk covers it. ``sends_prefix``: requests carry
    the real-time chunking inputs when the model declares them."""

    name: str
    sends_prefix: bool

    def action(self, step: int, chunks: Sequence[Chunk]) -> np.ndarray | None: ...


def _newest_covering(step: int, chunks: Sequence[Chunk], below: int | None = None) -> int | None:
    for i in range(len(chunks) - 1 if below is None else below - 1, -1, -1):
        if chunks[i].covers(step):
            return i
    return None


class ReplaceMerge:
    """The newest chunk covering the step: an answer replaces the plan from its arrival."""

    name = "replace"
    sends_prefix = False

    def action(self, step: int, chunks: Sequence[Chunk]) -> np.ndarray | None:
        i = _newest_covering(step, chunks)
        return None if i is None else chunks[i].at(step)


class BlendMerge:
    """Cross-fade into each new chunk over its first ``steps`` steps after arrival.

    At ``k`` steps after a chunk arrived (k < steps) the action is ``(1 - a) * old + a * new``
    with ``a = (k + 1) / (steps + 1)``, where ``old`` is what the plan without the new chunk
    plays; from then on the new chunk alone.
    """

    name = "blend"
    sends_prefix = False

    def __init__(self, steps: int = 3) -> None:
        if steps < 1:
            raise ValueError("blend steps must be at least 1")
        self.steps = steps

    def action(self, step: int, chunks: Sequence[Chunk]) -> np.ndarray | None:
        return self._at(step, chunks, len(chunks))

    def _blends(self, chunk: Chunk) -> bool:
        return True

    def _at(self, step: int, chunks: Sequence[Chunk], below: int) -> np.ndarray | None:
        i = _newest_covering(step, chunks, below)
        if i is None:
            return None
        new = chunks[i].at(step)
        into = step - chunks[i].arrived
        if into < self.steps and self._blends(chunks[i]):
            old = self._at(step, chunks, i)
            if old is not None:
                a = (into + 1) / (self.steps + 1)
                return ((1 - a) * old + a * new).astype(new.dtype, copy=False)
        return new


class TemporalEnsembling:
    """ACT's temporal ensembling: the mean of every chunk covering the step, weighted
    ``exp(-m * i)`` with ``i = 0`` the oldest (ACT's default ``m = 0.01``; larger ``m``
    follows new chunks sooner)."""

    name = "temporal_ensembling"
    sends_prefix = False

    def __init__(self, m: float = 0.01) -> None:
        if m < 0:
            raise ValueError("temporal ensembling m must be >= 0")
        self.m = m

    def action(self, step: int, chunks: Sequence[Chunk]) -> np.ndarray | None:
        rows = [c.at(step) for c in chunks if c.covers(step)]
        if not rows:
            return None
        weights = np.array([math.exp(-self.m * i) for i in range(len(rows))])
        weights /= weights.sum()
        mean = np.tensordot(weights, np.stack(rows).astype(np.float64), axes=1)
        return mean.astype(rows[-1].dtype, copy=False)


class RealTimeChunking:
    """Real-time chunking, client side: send the prefix and the delay, play answers as-is.

    An answer marked ``stale_prefix`` (its prefix was taken from a plan that another
    answer has replaced since, as happens with several requests in flight) continued a
    motion that is no longer played, or its prefix ended before its arrival, so the rows it
    chose freely were played from other answers (the runner marks both). It is anchored to
    the plan it replaces, as the server's inpainting anchors a fresh chunk to its prefix:
    at its arrival step ``a`` it plays what the plan would have (``offset = old(a) -
    new(a)``, or ``old(a - 1) - new(a - 1)`` when the plan ends at ``a``), then ``new(step) +
    offset * max(0, 1 - (step - a) / steps)``, the offset spread evenly over ``steps``
    (default: the chunk's length H; a later chunk anchors to this one, so it need not be
    gone by the chunk's end). Every other answer replaces the plan from its arrival.
    Keeps each stale chunk's offset from its first use (by identity, for the chunks still
    passed in), so a strategy object belongs to one runner.
    """

    name = "rtc"
    sends_prefix = True

    def __init__(self, steps: int | None = None) -> None:
        if steps is not None and steps < 1:
            raise ValueError("rtc anchor steps must be at least 1")
        self.steps = steps
        self._offsets: dict[int, tuple[Chunk, np.ndarray]] = {}

    def action(self, step: int, chunks: Sequence[Chunk]) -> np.ndarray | None:
        if self._offsets:
            live = {id(c) for c in chunks}
            self._offsets = {key: value for key, value in self._offsets.items() if key in live}
        return self._at(step, chunks, len(chunks))

    def _at(self, step: int, chunks: Sequence[Chunk], below: int) -> np.ndarray | None:
        i = _newest_covering(step, chunks, below)
        if i is None:
            return None
        chunk = chunks[i]
        new = chunk.at(step)
        if not chunk.stale_prefix:
            return new
        offset = self._offset(chunks, i)
        if offset is None:
            return new
        span = self.steps or len(chunk.actions)
        share = max(0.0, 1.0 - max(step - chunk.arrived, 0) / span)
        return (new + share * offset).astype(new.dtype, copy=False)

    def _offset(self, chunks: Sequence[Chunk], i: int) -> np.ndarray | None:
        """``old(a) - new(a)`` at the arrival step a; when the old plan ends just before a,
        ``old(a - 1) - new(a - 1)`` (the answer then goes on from the last played action
        with its own step); None when nothing was played to anchor to (a starved step)."""
        chunk = chunks[i]
        known = self._offsets.get(id(chunk))
        if known is not None and known[0] is chunk:
            return known[1]
        offset = None
        for at in (chunk.arrived, chunk.arrived - 1):
            old = self._at(at, chunks, i) if chunk.covers(at) else None
            if old is not None:
                offset = np.asarray(old, np.float64) - chunk.at(at)
                break
        self._offsets[id(chunk)] = (chunk, offset)
        return offset


MERGE_STRATEGIES = ("replace", "blend", "temporal_ensembling", "rtc")
_ALIASES = {
    "replace": ReplaceMerge, "blend": BlendMerge, "temporal_ensembling": TemporalEnsembling,
    "ensemble": TemporalEnsembling, "rtc": RealTimeChunking, "real_time_chunking": RealTimeChunking,
}


def merge_strategy(merge: str | MergeStrategy) -> MergeStrategy:
    """A strategy by name (``MERGE_STRATEGIES``, or ``ensemble``/``real_time_chunking``), or
    ``merge`` itself. Raises ValueError for an unknown name."""
    if not isinstance(merge, str):
        return merge
    try:
        return _ALIASES[merge]()
    except KeyError:
        raise ValueError(f"unknown merge strategy {merge!r}; one of {MERGE_STRATEGIES}") from None
