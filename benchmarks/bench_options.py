"""The speed options, each measured on against off, in one run (in-process forward).

Usage: python benchmarks/bench_options.py [--device cpu|cuda] [--iters 40] [--json out.json]

For each option (and the baseline with none) it loads the default policy, applies the
option as the server would, and reports the median per-batch and per-sample time at
batch 1 and the device's auto batch cap, plus the relative error of the outputs against
the baseline (float32) on the same random observations.
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
from policy_server.config import ServerConfig  # noqa: E402
from policy_server.inputs.tensors import sample_inputs  # noqa: E402
from policy_server.model.loader import load_model_dir  # noqa: E402
from policy_server.serving.executor import BatchExecutor  # noqa: E402
from policy_server.serving.served import SpeedOptions, apply_speed_options  # noqa: E402

log = logging.getLogger("bench_options")
MODEL = str(ROOT / "models" / "default")


def measure(options: SpeedOptions, device: str, batches: list[int], iters: int, observations) -> dict:
    model = load_model_dir(MODEL, device)
    apply_speed_options(model, options)
    executor = BatchExecutor(model, max_batch_size=max(batches), autocast=options.autocast)
    out = {}
    for batch in batches:
        start = time.perf_counter()
        rows = executor.finish(executor.launch(observations[:batch]))  # first call: compiles, if compiling
        first_ms = (time.perf_counter() - start) * 1e3
        ms = float(np.median(time_executor(executor, observations[:batch], iters))) * 1e3
        out[batch] = {"batch_ms": ms, "per_sample_ms": ms / batch, "first_call_ms": first_ms,
                      "actions": np.stack([r["action"] for r in rows])}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--skip-compile", action="store_true", help="leave torch.compile out (it needs a C++ compiler)")
    parser.add_argument("--json", default=str(ROOT / "bench-results" / "options.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(ServerConfig(workers=2).torch_threads_per_worker())
    device = args.device
    batches = [1, ServerConfig().batch_size_for(device)]
    sample = sample_inputs(load_model_dir(MODEL, "cpu").input_spec, batch=max(batches), seed=0)
    observations = [{k: v[i] for k, v in sample.items()} for i in range(max(batches))]

    variants = {"baseline": SpeedOptions(), "channels_last": SpeedOptions(channels_last=True)}
    if device == "cpu":
        variants["quantize_int8"] = SpeedOptions(quantize_int8=True)
        variants["autocast_bf16"] = SpeedOptions(autocast="bf16")
    else:
        variants["autocast_bf16"] = SpeedOptions(autocast="bf16")
        variants["autocast_fp16"] = SpeedOptions(autocast="fp16")
    if not args.skip_compile:
        variants["compile"] = SpeedOptions(compile=True)

    results = {}
    for name, options in variants.items():
        results[name] = measure(options, device, batches, args.iters, observations)
    base = results["baseline"]
    log.info("device %s, torch threads %d", device, torch.get_num_threads())
    log.info("%-15s %6s %12s %14s %14s %10s", "option", "batch", "ms/batch", "ms/sample", "vs baseline", "rel err")
    table = {}
    for name, per_batch in results.items():
        for batch, r in per_batch.items():
            ref = base[batch]["actions"]
            err = float(np.linalg.norm(r["actions"] - ref) / np.linalg.norm(ref))
            speedup = base[batch]["batch_ms"] / r["batch_ms"]
            log.info(
                "%-15s %6d %12.2f %14.2f %13.2fx %10.1e", name, batch, r["batch_ms"], r["per_sample_ms"], speedup, err
            )
            table.setdefault(name, {})[batch] = {k: v for k, v in r.items() if k != "actions"} | {
                "speedup": speedup,
                "rel_err": err,
            }
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"device": device, "results": table}, fh, indent=2)
    log.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
