"""When a ``ChunkRunner`` asks for the next action chunk: the delay estimate and the ask point.

Pure functions of the runner's measurements, in control steps: ``delay`` d is the steps from
an observation to its answer (high estimate), ``horizon`` H the rows of a chunk.

With d the slowest of the last 20 requests (until 10 are measured, at least half the
horizon), a request goes out when the plan, counting the chunks still in flight, has d or
fewer actions left after this step: at most one per step and at most ``max_in_flight`` at
once, and while ``2 * d < H`` only one (its answer comes in time to ask again). So latency
past half the horizon keeps several requests in flight (a new one about every ``H - d``
steps), up to about ``0.85 x H``. A request in flight stops counting once it is overdue
(older than one step more than any recent answer took), so a late answer is hedged by
another request.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["LATENCY_WINDOW", "WARMUP_REQUESTS", "delay_estimate_steps", "rtc_request_ahead", "should_ask"]

LATENCY_WINDOW = 20  # requests the delay estimate looks back over
WARMUP_REQUESTS = 10  # until this many latencies are known, the delay is assumed long


def delay_estimate_steps(
    latencies_s: Sequence[float], rate_hz: float, horizon: int | None, *, measured_only: bool = False
) -> int:
    """Steps from an observation to its answer, high estimate: the slowest of the last 20
    ``latencies_s`` at ``rate_hz`` (until 10 are measured, at least half the ``horizon``
    unless ``measured_only`` or the horizon is not known yet)."""
    recent = list(latencies_s)[-LATENCY_WINDOW:]
    measured = math.ceil(max(recent, default=0.0) * rate_hz - 1e-9)
    if len(recent) < WARMUP_REQUESTS and horizon is not None and not measured_only:
        # The tail is unknown yet: plan as if answers took at least half the horizon.
        return max(measured, horizon // 2)
    return measured


def rtc_request_ahead(delay: int, horizon: int) -> int:
    """Planned actions left at which a real-time chunking runner asks (steps; ``delay`` d and
    ``horizon`` H in steps): ``d + max(2, (H - d) // 2)``, capped at ``H - d``, never below d.

    Asking only when about d actions are left sends a prefix of about d + 1 rows, so the
    server has one row after the delay to blend over and the seam is nearly a plain replace.
    Asking earlier is the paper's execution horizon s (Black et al. 2025, "Real-Time Execution of
    Action Chunking Flow Policies", section 4: replan every s steps with d <= s <= H - d): asking with ``ahead`` left is
    s = H - ahead, so the cap at H - d keeps s >= d (about one request in flight, no more
    requests per step than before), and from d >= H / 2 on there is no such s and the
    runner asks at d left, as it does without real-time chunking.
    """
    return max(delay, min(delay + max(2, (horizon - delay) // 2), horizon - delay))


def should_ask(
    t: int,
    *,
    horizon: int,
    plan_end: int,
    live_steps: Iterable[int],
    delay: int,
    overdue: int,
    request_ahead: int | None,
    rtc: bool,
) -> bool:
    """Whether to send a request at step ``t`` (after playing its action).

    ``plan_end``: the first step the received chunks do not cover; ``live_steps``: the
    observation steps of the requests in flight whose chunk would still cover a coming
    step; ``overdue``: steps after which a request in flight stops counting (another one
    hedges it); ``request_ahead``: a fixed ask point (None: from ``delay``; with ``rtc``,
    :func:`rtc_request_ahead`). Asks when the plan, counting the requests in flight, has
    the ask point's number of actions or fewer left after this step; while ``2 * delay <
    horizon`` and a request is in flight, never (its answer comes in time to ask again).
    """
    # A request counts towards the plan until it is overdue; then another one hedges it.
    expected = [step + horizon for step in live_steps if t - step <= overdue]
    if expected and request_ahead is None and 2 * delay < horizon:
        return False  # the answer in flight arrives in time to ask again: one request is enough
    covered = max([plan_end, *expected])
    if request_ahead is not None:
        ahead = request_ahead
    elif rtc:
        ahead = rtc_request_ahead(delay, horizon)
    else:
        ahead = delay
    return covered - (t + 1) <= ahead
