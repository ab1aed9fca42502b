"""The sim loop's vectorized evaluation (``--vectorized N``): N reacher environments in
lockstep, one ``PolicyClient.infer_batch`` request per step for every live environment.
Re-exported by ``examples/sim_loop.py``."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from examples.reacher import ObservationWindow, ReacherEnv
from request_tools import PolicyClient


def history_windows(inputs: list[dict]) -> dict[str, tuple[int, str]]:
    """The history windows declared in ``/model_info``'s ``inputs`` (for :func:`run_vectorized`,
    which calls ``infer_batch`` without a runner and so windows the observations itself)."""
    return ObservationWindow.from_spec(inputs).windows


def run_vectorized(
    client: PolicyClient,
    seeds: list[int],
    *,
    moving_target: bool,
    execute: int,
    model: str | None = None,
    max_rows: int = 0,
    make_env: Callable[[int], ReacherEnv] | None = None,
) -> dict[str, Any]:
    """``len(seeds)`` environments in lockstep: one ``infer_batch`` request per step for every
    live environment (or per ``max_rows`` of them, to fit the server's body limit: 64 two-frame
    windows are 118 MB), ``execute`` actions of each chunk played before the next request.
    ``make_env(seed)`` builds each environment (default: the reacher; the instructed reacher's
    observations carry their ``"prompt"``, which the vectorized request sends as a list)."""
    envs = [make_env(seed) if make_env else ReacherEnv(seed, moving_target=moving_target) for seed in seeds]
    windows = history_windows(client.model_info(model)["inputs"])
    frames = [ObservationWindow(windows) for _ in envs]
    observations = [frame(env.reset()) for frame, env in zip(frames, envs, strict=False)]
    latencies, rows, start = [], 0, time.perf_counter()
    while live := [i for i, env in enumerate(envs) if not env.done]:
        parts = []
        for first in range(0, len(live), max_rows or len(live)):
            sent = time.perf_counter()
            part = live[first : first + (max_rows or len(live))]
            parts.append(client.infer_batch([observations[i] for i in part], model)["action"])
            latencies.append(time.perf_counter() - sent)
        chunks = np.concatenate(parts)
        rows += len(live)
        for chunk, i in zip(chunks, live, strict=False):
            for action in chunk[:execute]:
                observations[i] = frames[i](envs[i].step(action).obs)
                if envs[i].done:
                    break
    wall = time.perf_counter() - start
    return {
        "environments": len(envs),
        "execute": execute,
        "moving_target": moving_target,
        "success_rate": sum(env.success for env in envs) / len(envs),
        "requests": len(latencies),
        "rows": rows,
        "env_steps": sum(env.steps for env in envs),
        "wall_s": wall,
        "env_steps_per_s": sum(e.steps for e in envs) / wall,
        "latency_ms_p50": float(np.percentile(latencies, 50) * 1e3),
        "latency_ms_p99": float(np.percentile(latencies, 99) * 1e3),
    }
