"""Shared by the benchmark scripts: timing, and writing their results as JSON."""

from __future__ import annotations

import json
import time
from pathlib import Path

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


def timed_calls(call, n: int, warmup: int = 10) -> np.ndarray:
    """Milliseconds of each of ``n`` sequential ``call()``s, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    times = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        call()
        times[i] = time.perf_counter() - t0
    return times * 1e3


def latency_table(samples: dict[tuple[str, str], list[np.ndarray]], kind: str, log) -> list[dict]:
    """Rows ``{kind, call, p50_ms, p90_ms, p99_ms, run_p50s_ms}`` over all runs of each
    ``(variant, call)`` in ``samples`` (ms per call, one array per run), logged as a table."""
    rows = []
    log.info(f"{kind:9} {'call':16} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}  (p50 per run)")
    for (variant, call), runs in samples.items():
        all_ms = np.concatenate(runs)
        row = {
            kind: variant,
            "call": call,
            "p50_ms": float(np.median(all_ms)),
            "p90_ms": float(np.percentile(all_ms, 90)),
            "p99_ms": float(np.percentile(all_ms, 99)),
            "run_p50s_ms": [round(float(np.median(r)), 3) for r in runs],
        }
        rows.append(row)
        log.info(f"{variant:9} {call:16} {row['p50_ms']:8.3f} {row['p90_ms']:8.3f} {row['p99_ms']:8.3f}  "
                 f"{row['run_p50s_ms']}")
    return rows


def write_json(path: str | Path, data, **dumps) -> None:
    """Write ``data`` as JSON to ``path``, creating its directory (``dumps``: json.dumps options)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, **dumps))
