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
  is anchored to the plan it replaces, the offset faded as fast as the chunk's own
  largest step allows (:func:`rtc_shift`).

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
    "rtc_shift",
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


def rtc_shift(actions: np.ndarray, offset: np.ndarray, anchor: int, limit: float | None = None) -> np.ndarray:
    """The shift real-time chunking adds to each row of a chunk ``actions`` [H, *shape] to
    continue from a plan that differs by ``offset`` [*shape] at row ``anchor``: [H, *shape]
    float64. Rows up to the anchor keep the whole offset; after it the shift falls towards 0
    as fast as the chunk's own motion allows: with ``L`` the chunk's largest step-to-step
    change (max over rows and dims of ``|actions[i] - actions[i - 1]|``, the seam-jerk norm of
    ``examples/sim_loop.py``), each row's shift is the value nearest 0 that keeps the played
    step within ``L`` in every dim, so no played step exceeds the chunk's own largest step and
    the old plan's pull ends as soon as that allows. A chunk that does not move (L = 0) keeps
    the whole offset. ``limit`` overrides ``L``. The server's inpainting does the same in
    torch (``policy_server.torch_policy.rtc_shift``)."""
    actions = np.asarray(actions, np.float64)
    steps = np.diff(actions, axis=0)
    if limit is None:
        limit = float(np.abs(steps).max()) if len(steps) else 0.0
    shift = np.broadcast_to(np.asarray(offset, np.float64), actions.shape[1:]).copy()
    out = np.empty_like(actions)
    for i in range(len(actions)):
        if i > anchor:
            moved = shift - steps[i - 1]
            shift = np.minimum(np.maximum(0.0, moved - limit), moved + limit)
        out[i] = shift
    return out


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
    shift``, the offset faded by :func:`rtc_shift` (as fast as the answer's own largest
    step over the rows it plays allows, so no played step exceeds it; a later chunk anchors to this one, so it need
    not be gone by the chunk's end), or with ``steps`` linearly, ``offset * max(0, 1 - (step
    - a) / steps)``. Every other answer replaces the plan from its arrival. Keeps each
    stale chunk's shift from its first use (by identity, for the chunks still passed in), so
    a strategy object belongs to one runner.
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
        shift = self._shift(chunks, i)
        if shift is None:
            return new
        return (new + shift[step - chunk.step]).astype(new.dtype, copy=False)

    def _shift(self, chunks: Sequence[Chunk], i: int) -> np.ndarray | None:
        """The per-row shift [H, *shape] anchoring a stale chunk to the plan: ``offset =
        old(a) - new(a)`` at the arrival step a (when the old plan ends just before a,
        ``old(a - 1) - new(a - 1)``: the answer then goes on from the last played action),
        then faded by :func:`rtc_shift` (or linearly over ``steps`` when given); None when
        nothing was played to anchor to (a starved step)."""
        chunk = chunks[i]
        known = self._offsets.get(id(chunk))
        if known is not None and known[0] is chunk:
            return known[1]
        shift = None
        for at in (chunk.arrived, chunk.arrived - 1):
            old = self._at(at, chunks, i) if chunk.covers(at) else None
            if old is not None:
                offset = np.asarray(old, np.float64) - chunk.at(at)
                anchor = at - chunk.step
                if self.steps is None:  # the answer's own largest step over the rows it plays
                    own = np.abs(np.diff(np.asarray(chunk.actions[anchor:], np.float64), axis=0))
                    shift = rtc_shift(chunk.actions, offset, anchor, float(own.max()) if own.size else 0.0)
                else:
                    rows = np.arange(len(chunk.actions)) - max(chunk.arrived - chunk.step, 0)
                    share = np.clip(1.0 - np.maximum(rows, 0) / self.steps, 0.0, 1.0)
                    shift = share.reshape(-1, *([1] * offset.ndim)) * offset
                break
        self._offsets[id(chunk)] = (chunk, shift)
        return shift


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
