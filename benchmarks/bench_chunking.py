"""ChunkRunner latency sweep with a stand-in policy: starved steps and seam jerk per merge strategy.

Usage: python benchmarks/bench_chunking.py [--seeds 3] [--steps 140] [--parallel 8] [--fractions 0.8,0.85]
       [--strategies replace,rtc] [--stand-in blend|conditioned] [--mode-noise 0.02] [--json out.json]

A loop at 20 Hz plays 10-action chunks (a 500 ms horizon) from an in-process stand-in policy
that sleeps an injected latency before answering: constant 0 .. 0.9 x the horizon, and
seeded uniform jitter from 30 ms to 0.8 x the horizon. The stand-in's chunk is a smooth
function of time (two sines, max step-to-step change about 0.16) plus a random offset per
chunk (sigma 0.1), so a seam between two chunks shows as a jump: the offset is the sample's
mode (think of a flow policy's draw), the sines what every sample agrees on. Given the real-time
chunking inputs, the stand-in is one of two policies (``--stand-in``):

- ``blend`` (the default): a policy that does not condition on the prefix; its fresh chunk
  (a new random offset) goes through the server's inpainting (``inpaint_prefix`` here, a
  numpy mirror of ``policy_server.torch_policy``'s): rows [0, d) the prefix, later rows the
  fresh chunk shifted by the offset at row d - 1, the shift falling to 0 as fast as the
  chunk's own largest step allows (``chunk_merge.rtc_shift``). This is what the shipped
  transformer does.
- ``conditioned``: a policy that conditions on the prefix, as guided inpainting of a flow
  policy (Black et al. 2025) or a model trained with the prefix as an input would: it reads
  the prefix's mode (the mean of ``prefix - sines`` over the committed rows) and draws its
  own near it (plus normal noise of sigma ``--mode-noise``, default 0.02, a fifth of a fresh
  draw's: the continuation is not exact), then goes through the same inpainting. Only the
  mode is modelled: with ``--mode-noise 0`` and a prefix that is the plan actually played,
  its answers continue the plan exactly, so it passes the seam goal by construction; what
  it tests is the runner (does the prefix it sends hold the played plan's mode, with
  several requests in flight and answers arriving late) and what mode noise costs.

Each run plays a first episode of ``--warm-steps`` (the runner learns the latency; its
starved steps are shown as "cold") and then, after ``runner.reset()``, the measured episode
of ``--steps``. Reported per latency and strategy, over the seeds: starved steps of the
measured episodes (no action planned; the first step, which waits for the first chunk by
design, is not counted) out of all their steps;
seam jerk, the largest change between consecutive played actions where the chunk behind
the action changes (max over seeds; starved steps excluded); the in-chunk step-to-step
change of the played actions elsewhere (max over seeds); requests per step and the most
requests in flight at once (counting a first episode's still out after the reset).
``replace/1`` is the runner limited to one request in flight, as it was before v2. Runs go
in parallel threads (each loop sleeps most of its period).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from policy_client.chunk_merge import rtc_shift  # noqa: E402
from robot_loop import MERGE_STRATEGIES, RTC_INPUTS, ChunkRunner, LoopClock  # noqa: E402

log = logging.getLogger("bench_chunking")
RATE_HZ = 20.0
HORIZON = 10
DOF = 2
OFFSET_SIGMA = 0.1
FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9)


class StandInPolicy:
    """Smooth chunks with a per-chunk offset after an injected latency; honours the RTC prefix."""

    def __init__(self, seed: int, latency_s: float | tuple[float, float], rtc: bool,
                 conditioned: bool = False, mode_noise: float = 0.02) -> None:
        self.rng = np.random.default_rng(seed)
        self.latency_s = latency_s
        self.conditioned, self.mode_noise = conditioned, mode_noise
        self.lock = threading.Lock()
        self.info = {
            "inputs": [{"name": "t", "dtype": "int64", "shape": []}],
            "optional_inputs": list(RTC_INPUTS) if rtc else [],
        }
        if rtc:
            self.info["inputs"] += [
                {"name": "action_prefix", "dtype": "float32", "shape": [HORIZON, DOF], "optional": True},
                {"name": "prefix_length", "dtype": "int32", "shape": [1], "optional": True},
                {"name": "inference_delay", "dtype": "int32", "shape": [1], "optional": True},
            ]

    def model_info(self) -> dict:
        return self.info

    def __call__(self, obs: dict, *, deadline_s: float | None = None) -> dict:
        d = int(obs["inference_delay"][0]) if "inference_delay" in obs else 0
        n = int(obs["prefix_length"][0]) if "prefix_length" in obs else 0
        steps = int(obs["t"]) + np.arange(HORIZON)
        base = np.sin(2 * np.pi * steps[:, None] / np.array([40.0, 55.0]))
        with self.lock:
            if self.conditioned and n > 0:  # the prefix's mode, drawn again with a little noise
                committed = min(max(d, 1), n)
                mode = (obs["action_prefix"][:committed] - base[:committed]).mean(axis=0)
                offset = mode + self.rng.normal(0.0, self.mode_noise, DOF)
            else:
                offset = self.rng.normal(0.0, OFFSET_SIGMA, DOF)
            latency = self.latency_s if isinstance(self.latency_s, float) else self.rng.uniform(*self.latency_s)
        time.sleep(latency)
        chunk = base + offset
        if n > 0:
            chunk = inpaint_prefix(chunk, obs["action_prefix"], n, d)
        return {"action": chunk.astype(np.float32)}


def inpaint_prefix(chunk: np.ndarray, prefix: np.ndarray, prefix_length: int, inference_delay: int) -> np.ndarray:
    """Numpy mirror (this benchmark stays torch-free) of
    ``policy_server.torch_policy.inpaint_prefix`` for one request: rows [0, d) the prefix,
    later rows ``chunk`` shifted by ``chunk_merge.rtc_shift`` of the offset ``prefix[k] -
    chunk[k]``, k = max(d - 1, 0) (the shift falls as fast as the chunk's own largest step
    allows)."""
    if prefix_length <= 0:
        return chunk
    k = min(max(inference_delay - 1, 0), len(chunk) - 1)
    out = chunk + rtc_shift(chunk, prefix[k] - chunk[k], k)
    out[:inference_delay] = prefix[:inference_delay]
    return out


def run_one(strategy: str, latency_s: float | tuple[float, float], seed: int, steps: int,
            warm_steps: int, stand_in: str = "blend", mode_noise: float = 0.02) -> dict[str, Any]:
    merge, _, cap = strategy.partition("/")
    policy = StandInPolicy(seed, latency_s, rtc=merge == "rtc", conditioned=stand_in == "conditioned",
                           mode_noise=mode_noise)
    played, sources = [], []
    with ChunkRunner(policy, rate_hz=RATE_HZ, merge=merge, max_in_flight=int(cap) if cap else None) as runner:
        clock = LoopClock(RATE_HZ)
        for t in range(warm_steps):  # a first episode: the runner learns the latency
            runner.act({"t": np.int64(t)})
            clock.tick()
        cold_starved, cold_requests = runner.stats.starved_steps, runner.stats.requests
        runner.reset()
        clock = LoopClock(RATE_HZ)
        for t in range(steps):
            played.append(np.array(runner.act({"t": np.int64(t)}), dtype=np.float64))
            sources.append(runner.last_chunk_step)
            clock.tick()
        stats = runner.stats
    seam, inside = 0.0, 0.0
    for t in range(1, steps):
        if sources[t] is None or sources[t - 1] is None:
            continue
        change = float(np.abs(played[t] - played[t - 1]).max())
        if sources[t] != sources[t - 1]:
            seam = max(seam, change)
        else:
            inside = max(inside, change)
    return {
        "starved": stats.starved_steps - cold_starved, "steps": steps - 1,
        "cold_starved": cold_starved, "cold_steps": warm_steps - 1, "seam_jerk": seam, "in_chunk_change": inside,
        "requests": stats.requests - cold_requests, "max_in_flight": stats.max_in_flight, "overruns": clock.overruns,
        "latency_ms_p99": stats.to_dict()["latency_ms_p99"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=140, help="steps of the measured episode")
    parser.add_argument("--warm-steps", type=int, default=60, help="steps of the first episode before it")
    parser.add_argument("--parallel", type=int, default=8, help="runs at once (threads)")
    parser.add_argument("--strategies", default=",".join(("replace/1", *MERGE_STRATEGIES)))
    parser.add_argument("--fractions", default=",".join(map(str, FRACTIONS)),
                        help="constant latencies, in fractions of the horizon")
    parser.add_argument("--no-jitter", action="store_true", help="skip the jitter case")
    parser.add_argument("--stand-in", choices=("blend", "conditioned"), default="blend",
                        help="rtc: a policy blended with the prefix by the server, or one conditioned on it")
    parser.add_argument("--mode-noise", type=float, default=0.02,
                        help="conditioned stand-in: sigma of its mode's draw around the prefix's")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("robot_loop").setLevel(logging.ERROR)

    horizon_s = HORIZON / RATE_HZ
    cases: list[tuple[str, float | tuple[float, float]]] = [
        (f"{f:.2f}H const ({f * horizon_s * 1e3:.0f} ms)", f * horizon_s)
        for f in (float(x) for x in args.fractions.split(",") if x)]
    if not args.no_jitter:
        cases.append((f"jitter 30-{0.8 * horizon_s * 1e3:.0f} ms", (0.030, 0.8 * horizon_s)))
    strategies = [s for s in args.strategies.split(",") if s]
    jobs = [(name, latency, strategy, seed) for name, latency in cases for strategy in strategies
            for seed in range(args.seeds)]
    start = time.perf_counter()
    with ThreadPoolExecutor(args.parallel) as pool:
        runs = list(pool.map(lambda job: run_one(job[2], job[1], job[3], args.steps, args.warm_steps,
                                                     args.stand_in, args.mode_noise), jobs))
    rows = []
    for name, _ in cases:
        for strategy in strategies:
            mine = [run for job, run in zip(jobs, runs, strict=False) if job[0] == name and job[2] == strategy]
            starved, total = sum(r["starved"] for r in mine), sum(r["steps"] for r in mine)
            rows.append({
                "latency": name, "strategy": strategy, "starved": starved, "steps": total,
                "starved_pct": 100.0 * starved / total,
                "cold_starved": sum(r["cold_starved"] for r in mine), "cold_steps": sum(r["cold_steps"] for r in mine),
                "seam_jerk": max(r["seam_jerk"] for r in mine),
                "in_chunk_change": max(r["in_chunk_change"] for r in mine),
                "requests_per_step": sum(r["requests"] for r in mine) / total,
                "max_in_flight": max(r["max_in_flight"] for r in mine),
                "overruns": sum(r["overruns"] for r in mine),
            })
    log.info("%-24s %-20s %14s %12s %9s %10s %9s %10s %8s", "latency", "strategy", "starved", "cold", "seam jerk",
             "in-chunk", "req/step", "in flight", "overruns")
    for row in rows:
        cold = f"{row['cold_starved']}/{row['cold_steps']}"
        log.info("%-24s %-20s %4d/%d (%4.1f%%) %12s %9.3f %10.3f %9.2f %10d %8d", row["latency"], row["strategy"],
                 row["starved"], row["steps"], row["starved_pct"], cold, row["seam_jerk"], row["in_chunk_change"],
                 row["requests_per_step"], row["max_in_flight"], row["overruns"])
    result = {"rate_hz": RATE_HZ, "horizon": HORIZON, "seeds": args.seeds, "steps": args.steps,
              "stand_in": args.stand_in, "mode_noise": args.mode_noise,
              "warm_steps": args.warm_steps,
              "wall_s": time.perf_counter() - start, "rows": rows}
    log.info("%d runs in %.0f s", len(runs), result["wall_s"])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
