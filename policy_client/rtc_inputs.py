"""Real-time chunking, the request side: the plan's not-yet-executed actions and the
inference delay a request carries, and whether the plan still plays them when the answer
comes (Black et al. 2025, "Real-Time Execution of Action Chunking Flow Policies"). numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from policy_client.chunk_merge import Chunk, MergeStrategy

__all__ = ["RTC_INPUTS", "plan_plays", "rtc_inputs"]

# The optional inputs of a policy that supports real-time chunking.
RTC_INPUTS = ("action_prefix", "prefix_length", "inference_delay")


def rtc_inputs(
    merge: MergeStrategy, chunks: Sequence[Chunk], t: int, prefix_shape: tuple[int, ...], delay: int
) -> dict[str, np.ndarray]:
    """The real-time chunking inputs of a request sent at step ``t``.

    ``action_prefix`` float32 ``prefix_shape`` (``[H, *action_shape]``): what the plan
    (``chunks`` merged by ``merge``) plays from step ``t`` on, row 0 at ``t``, zeros after
    the plan's end; ``prefix_length`` int32 ``[1]``: its rows that are real;
    ``inference_delay`` int32 ``[1]``: ``delay`` in steps, at least 1 (row 0 is played
    already) and at most the prefix length.
    """
    horizon, *action_shape = prefix_shape
    prefix = np.zeros((horizon, *action_shape), np.float32)
    length = 0
    for i in range(horizon):
        action = merge.action(t + i, chunks)
        if action is None:
            break
        prefix[i], length = action, i + 1
    return {
        "action_prefix": prefix,
        "prefix_length": np.array([length], np.int32),
        # Row 0 (this step's action) is played already: at least one row is committed.
        "inference_delay": np.array([min(max(delay, 1), length)], np.int32),
    }


def plan_plays(
    merge: MergeStrategy, chunks: Sequence[Chunk], prefix: np.ndarray, step: int, t: int, horizon: int
) -> bool:
    """Whether the plan still plays ``prefix`` (rows for steps ``step ..``) from the step
    before ``t`` on, over the answer's steps: no other answer changed it since it was
    sent, and the prefix reaches the last played step (with several requests in flight
    it may end before: the rows the answer chose then were played from other answers)."""
    for s in range(max(t - 1, step), step + horizon):
        action = merge.action(s, chunks)
        if s - step >= len(prefix):
            return action is None
        if action is None or not np.allclose(prefix[s - step], action, rtol=1e-6, atol=1e-6):
            return False
    return True
