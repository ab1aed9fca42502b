"""Shared timing for the benchmark scripts."""

from __future__ import annotations

import time

import numpy as np


def time_executor(executor, observations, iters: int, warmup: int = 3) -> np.ndarray:
    """Seconds per ``launch`` + ``finish`` of one batch made of ``observations``, after warm-up."""
    for _ in range(warmup):
        executor.finish(executor.launch(observations))
    times = np.empty(iters)
    for i in range(iters):
        t0 = time.perf_counter()
        executor.finish(executor.launch(observations))
        times[i] = time.perf_counter() - t0
    return times
