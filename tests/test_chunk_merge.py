"""The merge strategies of the robot loop (``chunk_merge``): how overlapping action chunks
become one action per step (replace, blend, temporal ensembling, real-time chunking's
anchoring of a stale answer), on hand-made chunks; the runner that uses them is
tests/test_robot_loop.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from policy_client.chunk_merge import (
    BlendMerge,
    Chunk,
    RealTimeChunking,
    ReplaceMerge,
    TemporalEnsembling,
    merge_strategy,
)
from robot_loop import MERGE_STRATEGIES

HORIZON = 10


def chunk(step: int, arrived: int, value: float, horizon: int = HORIZON) -> Chunk:
    return Chunk(step=step, arrived=arrived, actions=np.full((horizon, 1), value, np.float32))


def test_replace_plays_the_newest_chunk_covering_the_step():
    chunks = [chunk(0, 0, 1.0), chunk(4, 6, 2.0)]
    merge = ReplaceMerge()
    assert [float(merge.action(t, chunks)[0]) for t in (3, 5, 13)] == [1.0, 2.0, 2.0]
    assert merge.action(14, chunks) is None


def test_blend_cross_fades_into_a_new_chunk_over_its_first_steps_after_arrival():
    chunks = [chunk(0, 0, 0.0), chunk(4, 6, 4.0)]  # arrives at step 6
    merge = BlendMerge(steps=3)
    played = [float(merge.action(t, chunks)[0]) for t in range(5, 11)]
    assert played == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0, 4.0])  # a = 1/4, 2/4, 3/4 from step 6
    assert float(merge.action(12, chunks)[0]) == 4.0  # past the old chunk: the new one alone


def test_temporal_ensembling_weights_every_covering_chunk_oldest_first():
    chunks = [chunk(0, 0, 0.0), chunk(2, 3, 1.0), chunk(20, 21, 9.0)]
    merge = TemporalEnsembling(m=math.log(2))  # weights 1, 1/2 for the two covering step 5
    assert float(merge.action(5, chunks)[0]) == pytest.approx(1 / 3)
    assert float(merge.action(11, chunks)[0]) == 1.0  # only the second covers step 11
    assert float(TemporalEnsembling(m=0.0).action(5, chunks)[0]) == pytest.approx(0.5)  # plain mean


def test_merge_strategies_by_name():
    assert [merge_strategy(name).name for name in MERGE_STRATEGIES] == list(MERGE_STRATEGIES)
    assert merge_strategy("ensemble").name == "temporal_ensembling"
    with pytest.raises(ValueError, match="unknown merge strategy 'average'"):
        merge_strategy("average")


def test_rtc_merge_anchors_to_the_last_played_action_when_the_old_plan_ends_at_the_arrival():
    old = Chunk(step=0, arrived=0, actions=np.arange(HORIZON, dtype=np.float64)[:, None])  # ends at step 10
    new = Chunk(step=4, arrived=10, actions=np.full((HORIZON, 1), 50.0) + np.arange(HORIZON)[:, None] * 2,
                stale_prefix=True)
    rtc = merge_strategy("rtc")
    # old plays 9 at step 9; new's own step is 2 from 9 to 10: 11, then 13: the offset (9 - 60)
    # cannot fade while new rises at its own largest step (fading would step by more than 2)
    assert [float(rtc.action(t, [old, new])[0]) for t in (10, 11)] == pytest.approx([11.0, 13.0])
    # the linear fade of before, over H steps: the offset falls by a tenth per step
    linear = RealTimeChunking(steps=HORIZON)
    assert [float(linear.action(t, [old, new])[0]) for t in (10, 11)] == pytest.approx([11.0, 64 - 0.9 * 51])


def test_rtc_merge_anchors_only_chunks_marked_stale():
    old = Chunk(step=0, arrived=0, actions=np.zeros((HORIZON, 1)))
    new = 4.0 - 0.5 * np.arange(HORIZON, dtype=np.float64)[:, None]  # falls 0.5 per step
    rtc = merge_strategy("rtc")
    fresh = [old, Chunk(step=2, arrived=3, actions=new)]
    stale = [old, Chunk(step=2, arrived=3, actions=new, stale_prefix=True)]
    assert [float(rtc.action(t, fresh)[0]) for t in range(3, 8)] == [3.5, 3, 2.5, 2, 1.5]  # from its arrival, step 3
    # anchored at its arrival to the old plan (0): offset -3.5, then each step the shift
    # falls as far as keeps the played step within new's own 0.5 (its own -0.5 plus +1):
    # the played steps are +0.5 until the shift is gone, then new's own
    assert [float(rtc.action(t, stale)[0]) for t in range(3, 9)] == pytest.approx([0, 0.5, 1.0, 1.5, 1.5, 1.0])
    # the shift is kept from its first use: dropping the old chunk does not move the plan
    assert float(rtc.action(6, stale[1:])[0]) == pytest.approx(1.5)
    assert float(merge_strategy("rtc").action(6, stale[1:])[0]) == 2.0  # never anchored: nothing to anchor to
    # with steps=H, the linear fade of before: offset -3.5 falling by a tenth per step
    linear = RealTimeChunking(steps=HORIZON)
    played = [float(linear.action(t, stale)[0]) for t in range(3, 6)]
    assert played == pytest.approx([0, 3 - 0.9 * 3.5, 2.5 - 0.8 * 3.5])
