"""Hot reload under load: how long 4 workers take to switch, and what a burst of updates does to p99.

Starts ``server.py`` (default policy, ``--workers 4``, a fresh model store), drives it with
16 keep-alive clients (raw HTTP, spread over 4 processes, as bench_serving.py does) and,
per run, measures two phases of equal length:

- ``steady``: load only;
- ``updates``: the same load while a trainer-like client pushes the default policy's
  weights back to back (``/update_model`` with a weights body and ``wait_s``).

Reports, as the median over runs: p50/p99 latency of each phase and their ratio, errors,
and over every update the switch time (first 200 to every worker serving the new version,
``switch_s`` in the answer) and the POST round trip (validation + publish + wait).

    python benchmarks/bench_updates.py --runs 3 --duration 8
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_serving import (  # noqa: E402
    CORES,
    MODEL,
    ROOT,
    Target,
    concurrent,
    free_port,
    raw_http_client,
    reference_observation,
)
from benchmarks.timing import write_json  # noqa: E402
from binary_protocol import dict_to_binary  # noqa: E402
from request_tools import PolicyClient  # noqa: E402

log = logging.getLogger("bench_updates")


def push_updates(base_url: str, start_at: float, duration_s: float, pause_s: float, out: list) -> None:
    """Push perturbed copies of the default weights until the phase ends; record each answer."""
    base = load_file(str(Path(MODEL) / "model.safetensors"))
    rng = np.random.default_rng(0)
    while time.time() < start_at:
        time.sleep(0.005)
    with PolicyClient(base_url, timeout_s=60) as trainer:
        while time.time() < start_at + duration_s - 0.5:
            weights = {k: (v + rng.normal(0, 1e-3, v.shape).astype(v.dtype)) if v.dtype.kind == "f" else v
                       for k, v in base.items()}
            t0 = time.perf_counter()
            answer = trainer.update_model(weights=weights, wait_s=10)
            answer["post_s"] = time.perf_counter() - t0
            out.append(answer)
            time.sleep(pause_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of each phase")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between two pushes")
    parser.add_argument("--json", default=str(ROOT / "bench-results" / "updates.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    port = free_port()
    frame = dict_to_binary(reference_observation())
    target = Target(
        "server",
        [sys.executable, "server.py", "--port", str(port), "--workers", str(args.workers), "--threads", "16",
         "--model-path", MODEL, "--model-root", str(ROOT / "models"),
         "--model-store", tempfile.mkdtemp(prefix="bench-store-")],
        {}, lambda p: raw_http_client(p, frame), port,
    )
    log_dir = Path(tempfile.mkdtemp(prefix="bench-updates-"))
    target.start(log_dir)
    runs, answers = [], []
    try:
        for run in range(args.runs):
            steady = concurrent(target, args.clients, args.processes, args.duration)
            pushed: list[dict] = []
            pusher = threading.Thread(
                target=push_updates,
                args=(f"http://127.0.0.1:{port}", time.time() + 1.0, args.duration, args.pause, pushed),
            )
            pusher.start()
            during = concurrent(target, args.clients, args.processes, args.duration)
            pusher.join()
            answers += pushed
            runs.append({"steady": steady, "updates": during, "pushes": len(pushed),
                         "all_workers": all(a["all_workers"] for a in pushed)})
            log.info(
                "run %d: steady p50 %.2f p99 %.2f ms | %d updates: p50 %.2f p99 %.2f ms, errors %d/%d",
                run, steady["p50_ms"], steady["p99_ms"], len(pushed), during["p50_ms"], during["p99_ms"],
                steady["errors"], during["errors"],
            )
    finally:
        target.stop()

    def med(phase: str, key: str) -> float:
        return float(np.median([r[phase][key] for r in runs]))

    switch = np.array([a["switch_s"] for a in answers]) * 1e3
    post = np.array([a["post_s"] for a in answers]) * 1e3
    summary = {
        "cores": CORES, "workers": args.workers, "clients": args.clients, "runs": args.runs,
        "duration_s": args.duration,
        "steady_p50_ms": med("steady", "p50_ms"), "steady_p99_ms": med("steady", "p99_ms"),
        "updates_p50_ms": med("updates", "p50_ms"), "updates_p99_ms": med("updates", "p99_ms"),
        "steady_req_per_s": med("steady", "req_per_s"), "updates_req_per_s": med("updates", "req_per_s"),
        "errors": sum(r["steady"]["errors"] + r["updates"]["errors"] for r in runs),
        "updates": len(answers), "all_workers_every_time": all(r["all_workers"] for r in runs),
        "switch_ms_p50": float(np.percentile(switch, 50)), "switch_ms_p90": float(np.percentile(switch, 90)),
        "switch_ms_max": float(switch.max()),
        "post_ms_p50": float(np.percentile(post, 50)), "post_ms_max": float(post.max()),
    }
    summary["p99_ratio_updates_vs_steady"] = summary["updates_p99_ms"] / summary["steady_p99_ms"]
    write_json(args.json, {"summary": summary, "runs": runs}, indent=2)
    for key, value in summary.items():
        log.info("%-28s %s", key, f"{value:.3f}" if isinstance(value, float) else value)


if __name__ == "__main__":
    main()
