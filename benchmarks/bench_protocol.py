"""Encode/decode cost of the wire format, against in-band pickle and a bare memcpy, in one run.

Usage: python benchmarks/bench_protocol.py [--runs 5] [--iters 2000] [--json out.json]

Prints, per case, the median and p90/p99 of per-call times (microseconds) pooled over
``runs`` runs, and the spread of the per-run medians. The decode-vs-size table shows that
out-of-band decoding does not grow with the image, while in-band decoding and a copy do.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from binary_protocol import binary_to_dict, dict_to_binary  # noqa: E402

log = logging.getLogger("bench_protocol")
SIZES = [(120, 160), (240, 320), (480, 640), (960, 1280), (1920, 2560)]


def observation(h: int, w: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "state": rng.standard_normal(6).astype(np.float32),
        "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
    }


def time_calls(fn, iters: int, runs: int) -> dict[str, float]:
    for _ in range(min(iters, 200)):
        fn()
    samples, medians = [], []
    for _ in range(runs):
        run = np.empty(iters)
        for i in range(iters):
            t0 = time.perf_counter_ns()
            fn()
            run[i] = time.perf_counter_ns() - t0
        medians.append(float(np.median(run)) / 1e3)
        samples.append(run)
    pooled = np.concatenate(samples) / 1e3
    return {
        "p50_us": float(np.percentile(pooled, 50)),
        "p90_us": float(np.percentile(pooled, 90)),
        "p99_us": float(np.percentile(pooled, 99)),
        "run_medians_us": medians,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    obs = observation(480, 640)
    body = dict_to_binary(obs)
    inband = pickle.dumps(obs, protocol=5)
    image = obs["image"]
    results = {
        "reference": {
            "encode": time_calls(lambda: dict_to_binary(obs), args.iters, args.runs),
            "decode": time_calls(lambda: binary_to_dict(body), args.iters, args.runs),
            "pickle_inband_loads (unsafe baseline)": time_calls(lambda: pickle.loads(inband), args.iters, args.runs),
            "memcpy_image (baseline)": time_calls(lambda: image.copy(), args.iters, args.runs),
        },
        "decode_vs_size": {},
    }
    for h, w in SIZES:
        sized = observation(h, w)
        sized_body = dict_to_binary(sized)
        sized_inband = pickle.dumps(sized, protocol=5)
        iters = max(200, args.iters // max(1, (h * w) // (480 * 640)))
        results["decode_vs_size"][f"{h}x{w}"] = {
            "image_bytes": h * w * 3,
            "decode": time_calls(lambda body=sized_body: binary_to_dict(body), iters, args.runs),
            "pickle_inband_loads": time_calls(lambda data=sized_inband: pickle.loads(data), iters, args.runs),
        }

    log.info("reference observation: state float32[6], image uint8[480,640,3] (%d bytes on the wire)", len(body))
    log.info("%-40s %9s %9s %9s   %s", "case", "p50 us", "p90 us", "p99 us", "per-run medians")
    for name, r in results["reference"].items():
        log.info(
            "%-40s %9.1f %9.1f %9.1f   %s",
            name,
            r["p50_us"],
            r["p90_us"],
            r["p99_us"],
            " ".join(f"{m:.1f}" for m in r["run_medians_us"]),
        )
    log.info("")
    log.info("%-12s %10s %16s %22s", "image", "bytes", "decode p50 us", "in-band loads p50 us")
    for size, r in results["decode_vs_size"].items():
        log.info(
            "%-12s %10d %16.1f %22.1f",
            size,
            r["image_bytes"],
            r["decode"]["p50_us"],
            r["pickle_inband_loads"]["p50_us"],
        )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
        log.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
