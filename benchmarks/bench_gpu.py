"""GPU benchmark: host-to-device bandwidth through the staging buffers against a plain pinned
copy of the same bytes, and batch 1/8/32 latency and throughput of the pipelined executor.

Usage: python benchmarks/bench_gpu.py [--iters 50] [--json out.json]
Needs CUDA; without it, says so and exits 0. Times with CUDA events after warm-up and
reports medians. Target (throughput issue): staging H2D >= 80% of the plain pinned copy.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.timing import time_executor  # noqa: E402
from policy_server.inputs.tensors import sample_inputs  # noqa: E402
from policy_server.model.loader import load_model_dir  # noqa: E402
from policy_server.serving.batcher import Batcher  # noqa: E402
from policy_server.serving.executor import BatchExecutor  # noqa: E402
from policy_server.serving.served import Served  # noqa: E402

log = logging.getLogger("bench_gpu")
MODEL = str(ROOT / "models" / "default")
BATCHES = (1, 8, 32)


def observations(spec, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    sample = sample_inputs(spec, batch=n, seed=seed)
    return [{k: v[i] for k, v in sample.items()} for i in range(n)]


def event_ms(fn, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def h2d(model, executor: BatchExecutor, batch: int, iters: int) -> dict:
    """Device copies out of the pinned staging buffers, as launch() makes them (non-blocking,
    on the copy stream), against a plain pinned tensor of the same bytes; and, beside it,
    the staged path including its host copy (np.stack into staging) by wall clock."""
    obs = observations(model.input_spec, batch)
    slot = executor.slots[0]
    nbytes = sum(t[:batch].numel() * t.element_size() for t in slot.host_in.values())
    executor._stage(slot, obs)

    def from_staging():
        with torch.cuda.stream(executor.copy_stream):
            for t in slot.host_in.values():
                t[:batch].to(executor.device, non_blocking=True)
        torch.cuda.current_stream().wait_stream(executor.copy_stream)

    plain_src = [torch.empty_like(t[:batch]).pin_memory() for t in slot.host_in.values()]

    def plain():
        for t in plain_src:
            t.to(executor.device, non_blocking=True)

    def with_host_copy():
        executor._stage(slot, obs)
        from_staging()
        torch.cuda.synchronize()

    for fn in (from_staging, plain, with_host_copy):
        for _ in range(5):
            fn()
    staged_ms = event_ms(from_staging, iters)
    plain_ms = event_ms(plain, iters)
    walls = []
    for _ in range(iters):
        t0 = time.perf_counter()
        with_host_copy()
        walls.append(time.perf_counter() - t0)
    return {
        "bytes": nbytes,
        "staged_GBps": nbytes / staged_ms / 1e6,
        "plain_pinned_GBps": nbytes / plain_ms / 1e6,
        "ratio": plain_ms / staged_ms,
        "with_host_copy_GBps": nbytes / (float(np.median(walls)) * 1e3) / 1e6,
    }


def executor_latency(model, executor: BatchExecutor, batch: int, iters: int) -> dict:
    ms = time_executor(executor, observations(model.input_spec, batch, seed=1), iters, warmup=5) * 1e3
    return {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
            "samples_per_s": batch / (float(np.median(ms)) / 1e3)}


def pipelined_throughput(model, batch: int, seconds: float = 3.0) -> dict:
    """The real batcher with 4*batch producer threads: batches overlap copy and compute."""
    import threading

    served = Served(model, BatchExecutor(model, max_batch_size=batch), since=time.time())
    batcher = Batcher(served, max_batch_size=batch, queue_size=4096)
    batcher.start()
    obs = observations(model.input_spec, 64, seed=2)
    done, stop_at = [0], time.monotonic() + seconds

    def producer(i: int) -> None:
        k = i
        while time.monotonic() < stop_at:
            request = batcher.submit(obs[k % len(obs)], time.monotonic() + 30)
            batcher.wait(request)
            done[0] += 1
            k += 1

    threads = [threading.Thread(target=producer, args=(i,)) for i in range(4 * batch)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    batcher.stop(10)
    return {"samples_per_s": done[0] / elapsed, "mean_batch": batcher.requests / max(1, batcher.batches)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--json", default=str(ROOT / "bench-results" / "gpu.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        log.info("no CUDA device: nothing to measure (run this on a GPU machine)")
        return
    model = load_model_dir(MODEL, "cuda:0")
    executor = BatchExecutor(model, max_batch_size=max(BATCHES))
    result = {"device": torch.cuda.get_device_name(0), "h2d": {}, "executor": {}, "pipelined": {}}
    for batch in BATCHES:
        result["h2d"][batch] = h2d(model, executor, batch, args.iters)
        result["executor"][batch] = executor_latency(model, executor, batch, args.iters)
        result["pipelined"][batch] = pipelined_throughput(model, batch)
    log.info("%s", result["device"])
    log.info("%6s %8s %12s %12s %6s %10s | %8s %8s %10s | %12s %6s", "batch", "MB", "staged GB/s", "pinned GB/s",
             "ratio", "+host GB/s", "p50 ms", "p99 ms", "samples/s", "pipelined/s", "batch")
    for batch in BATCHES:
        h, e, p = result["h2d"][batch], result["executor"][batch], result["pipelined"][batch]
        log.info(
            "%6d %8.2f %12.2f %12.2f %6.2f %10.2f | %8.3f %8.3f %10.0f | %12.0f %6.2f",
            batch,
            h["bytes"] / 1e6,
            h["staged_GBps"],
            h["plain_pinned_GBps"],
            h["ratio"],
            h["with_host_copy_GBps"],
            e["p50_ms"],
            e["p99_ms"],
            e["samples_per_s"],
            p["samples_per_s"],
            p["mean_batch"],
        )
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=2)
    log.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
