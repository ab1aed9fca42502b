"""``LoopClock``: paces a control loop at a fixed rate and records how it kept up (stdlib only)."""

from __future__ import annotations

import time
from collections import deque

__all__ = ["LoopClock"]

PERIODS_KEPT = 10_000  # the last periods recorded (a loop may run for hours)


class LoopClock:
    """Paces a control loop at ``rate_hz`` (absolute schedule, so sleep jitter does not
    accumulate) and records how it kept up: ``tick()`` once per step, after the step's work."""

    def __init__(self, rate_hz: float) -> None:
        self.period_s = 1.0 / rate_hz
        self.start = self._next = time.perf_counter()
        self.ticks = 0
        self.overruns = 0  # steps whose work took longer than the period
        self.periods_s: deque[float] = deque(maxlen=PERIODS_KEPT)  # the last step periods, seconds
        self._last = self.start

    def tick(self) -> None:
        self.ticks += 1
        self._next += self.period_s
        now = time.perf_counter()
        if now > self._next:
            self.overruns += 1
            self._next = now  # late: start the next period now rather than sprint to catch up
        else:
            time.sleep(self._next - now)
        now = time.perf_counter()
        self.periods_s.append(now - self._last)
        self._last = now

    @property
    def achieved_hz(self) -> float:
        elapsed = self._last - self.start
        return self.ticks / elapsed if elapsed > 0 else 0.0
