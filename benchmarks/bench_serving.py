"""Serving benchmark: this server against a naive Flask+pickle server, a bare TCP socket
server and an openpi-style WebSocket server, all doing the same forward of the same policy on
the same observation, in one run; this server also over openpi's WebSocket wire (``openpi``,
driven by openpi's own client, as is ``openpi_ref``).

Usage: python benchmarks/bench_serving.py [--runs 3] [--duration 8] [--sequential 200]
                                          [--clients 16] [--workers 2] [--json out.json]
                                          [--targets server,naive,socket,openpi,openpi_ref]

Measures, per target and run: 1 sequential client (p50/p90/p99 ms) and ``--clients``
concurrent clients for ``--duration`` seconds (req/s, p50/p99 ms, mean batch size for this
server, server CPU ms per request from /proc). The load uses a minimal keep-alive HTTP/1.1
client over raw sockets (a length-prefixed one for the socket server), spread over
``--processes`` processes, so the load generator's own cost is small and equal for every
target; the sequential phase is also run through the real clients (PolicyClient for this
server, requests for the naive one) to show what a robot loop sees. Also the in-process forward at batch 1, 8
and 16 (the compute floor). Prints the medians over runs, the ratios the throughput issue
sets targets for, and writes JSON. Every server binds 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The load generators and the servers under test live in their own modules; re-exported here.
from benchmarks.serving_load import (  # noqa: E402, F401 (the load generators, re-exported)
    _Conn,
    _load_process,
    concurrent,
    http_client,
    openpi_client,
    policy_client,
    raw_http_client,
    sequential,
    socket_client,
)
from benchmarks.serving_targets import Target  # noqa: E402
from benchmarks.timing import time_executor  # noqa: E402
from binary_protocol import binary_to_dict, dict_to_binary  # noqa: E402

log = logging.getLogger("bench_serving")
MODEL = str(ROOT / "models" / "default")
CORES = len(os.sched_getaffinity(0))


def reference_observation() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "state": rng.standard_normal(6).astype(np.float32),
        "image": rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compute_floor(iters: int) -> dict:
    """In-process forward of the same policy through the batch executor, per batch size."""
    import torch

    from policy_server.model.loader import load_model_dir
    from policy_server.serving.executor import BatchExecutor

    out = {}
    obs = reference_observation()
    for threads in sorted({1, CORES}):
        torch.set_num_threads(threads)
        model = load_model_dir(MODEL, "cpu")
        for batch in (1, 8, 16):
            executor = BatchExecutor(model, max_batch_size=batch)
            ms = float(np.median(time_executor(executor, [obs] * batch, max(3, iters // batch)))) * 1e3
            out[f"threads{threads}_batch{batch}"] = {"batch_ms": ms, "per_sample_ms": ms / batch}
    return out


def median_of(runs: list[dict], phase: str, key: str) -> float | None:
    values = [r[phase][key] for r in runs if r.get(phase) and r[phase].get(key) is not None]
    return float(np.median(values)) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of each concurrent phase")
    parser.add_argument("--sequential", type=int, default=200, help="requests of each sequential phase")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--processes", type=int, default=4, help="load-generating processes for the clients")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers for this server and the naive one")
    parser.add_argument("--server-args", default="", help="extra flags for server.py, e.g. '--max-batch-delay-ms 2'")
    parser.add_argument("--targets", default="server,naive,socket,openpi,openpi_ref",
                        help="any of server, naive, socket, openpi (this server over openpi's WebSocket wire, "
                             "openpi's client) and openpi_ref (an openpi-style asyncio server, same policy)")
    parser.add_argument("--json", default=str(ROOT / "bench-results" / "serving.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    obs = reference_observation()
    frame = dict_to_binary(obs)
    inband = pickle.dumps(obs, protocol=5)
    per_worker = str(max(1, CORES // args.workers))
    ports = {name: free_port() for name in ("server", "naive", "socket", "openpi", "openpi_ref")}

    def this_server(port: int) -> list[str]:
        return [
            sys.executable, "server.py", "--port", str(port), "--workers", str(args.workers),
            "--threads", str(max(4, args.clients)), "--model-path", MODEL,
            "--model-store", tempfile.mkdtemp(prefix="bench-store-"), *args.server_args.split(),
        ]

    all_targets = {
        "server": Target(
            "server",
            this_server(ports["server"]),
            {},
            lambda p: raw_http_client(p, frame),
            ports["server"],
            real_client=lambda p: policy_client(f"http://127.0.0.1:{p}", obs),
        ),
        "naive": Target(
            "naive",
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-w",
                str(args.workers),
                "-k",
                "sync",
                "-b",
                f"127.0.0.1:{ports['naive']}",
                "--no-control-socket",
                "benchmarks.baselines.naive_flask:create_app()",
            ],
            {"BASELINE_MODEL_PATH": MODEL, "BASELINE_TORCH_THREADS": per_worker, "OMP_NUM_THREADS": per_worker},
            lambda p: raw_http_client(p, inband),
            ports["naive"],
            real_client=lambda p: http_client(f"http://127.0.0.1:{p}/infer", inband, binary_to_dict),
        ),
        "socket": Target(
            "socket",
            [
                sys.executable,
                "-m",
                "benchmarks.baselines.socket_server",
                "--port",
                str(ports["socket"]),
                "--model-path",
                MODEL,
            ],
            {},
            lambda p: socket_client(p, frame),
            ports["socket"],
        ),
        "openpi": Target("openpi", this_server(ports["openpi"]), {}, lambda p: openpi_client(p, obs), ports["openpi"]),
        "openpi_ref": Target(
            "openpi_ref",
            [sys.executable, "-m", "benchmarks.baselines.openpi_server", "--port", str(ports["openpi_ref"]),
             "--model-path", MODEL],
            {},
            lambda p: openpi_client(p, obs),
            ports["openpi_ref"],
        ),
    }
    targets = [all_targets[name] for name in args.targets.split(",")]
    log_dir = Path(args.json).parent
    log_dir.mkdir(parents=True, exist_ok=True)

    log.info("compute floor (in-process forward, %d cores)...", CORES)
    floor = compute_floor(iters=64)
    try:
        for target in targets:
            log.info("starting %s ...", target.name)
            target.start(log_dir)
            for run in range(args.runs):
                seq = sequential(target.make_client(target.port), args.sequential)
                real = sequential(target.real_client(target.port), args.sequential) if target.real_client else None
                conc = concurrent(target, args.clients, args.processes, args.duration)
                target.results.append({"sequential": seq, "sequential_real_client": real, "concurrent": conc})
                log.info(
                    "  %s run %d: seq p50 %.2f ms; %d clients %.1f req/s p50 %.1f p99 %.1f ms, errors %d",
                    target.name,
                    run + 1,
                    seq["p50_ms"],
                    args.clients,
                    conc["req_per_s"],
                    conc["p50_ms"],
                    conc["p99_ms"],
                    conc["errors"],
                )
            target.stop()
    finally:
        for target in targets:
            target.stop()

    summary = {
        t.name: {
            "seq_p50_ms": median_of(t.results, "sequential", "p50_ms"),
            "seq_p90_ms": median_of(t.results, "sequential", "p90_ms"),
            "seq_p99_ms": median_of(t.results, "sequential", "p99_ms"),
            "seq_p50_ms_real_client": median_of(t.results, "sequential_real_client", "p50_ms")
            if t.real_client
            else None,
            "conc_req_per_s": median_of(t.results, "concurrent", "req_per_s"),
            "conc_p50_ms": median_of(t.results, "concurrent", "p50_ms"),
            "conc_p99_ms": median_of(t.results, "concurrent", "p99_ms"),
            "mean_batch": median_of(t.results, "concurrent", "mean_batch"),
            "cpu_ms_per_req": median_of(t.results, "concurrent", "server_cpu_ms_per_req"),
            "errors": sum(r["concurrent"]["errors"] for r in t.results),
        }
        for t in targets
    }
    ratios = {}
    s, k, n = summary.get("server"), summary.get("socket"), summary.get("naive")
    if s and k:
        ratios["seq_p50_vs_socket (<= 1.3)"] = s["seq_p50_ms"] / k["seq_p50_ms"]
        ratios["conc_throughput_vs_socket (>= 1.2)"] = s["conc_req_per_s"] / k["conc_req_per_s"]
    if s and n:
        ratios["conc_throughput_vs_naive (>= 2.5)"] = s["conc_req_per_s"] / n["conc_req_per_s"]
    if s:
        ratios["conc_p99_over_p50 (<= 3)"] = s["conc_p99_ms"] / s["conc_p50_ms"]
    o, r = summary.get("openpi"), summary.get("openpi_ref")
    if o and r:
        ratios["openpi_throughput_vs_openpi_reference (>= 1.5)"] = o["conc_req_per_s"] / r["conc_req_per_s"]
    if o and s:
        ratios["openpi_seq_p50_vs_http_raw (<= 1.1)"] = o["seq_p50_ms"] / s["seq_p50_ms"]
        if s["seq_p50_ms_real_client"]:
            ratios["openpi_seq_p50_vs_http_policy_client (<= 1.1)"] = o["seq_p50_ms"] / s["seq_p50_ms_real_client"]

    log.info("")
    log.info("compute floor, in-process forward (median ms per batch / per sample):")
    for key, value in floor.items():
        log.info("  %-20s %8.2f %8.2f", key, value["batch_ms"], value["per_sample_ms"])
    log.info("")
    log.info(
        "%-8s %8s %8s %8s | %9s %8s %8s %6s %8s %6s",
        "target",
        "seq p50",
        "p90",
        "p99",
        f"{args.clients}c req/s",
        "p50",
        "p99",
        "batch",
        "cpu/req",
        "errors",
    )
    for name, r in summary.items():
        log.info(
            "%-8s %8.2f %8.2f %8.2f | %9.1f %8.2f %8.2f %6s %8.2f %6d",
            name,
            r["seq_p50_ms"],
            r["seq_p90_ms"],
            r["seq_p99_ms"],
            r["conc_req_per_s"],
            r["conc_p50_ms"],
            r["conc_p99_ms"],
            f"{r['mean_batch']:.2f}" if r["mean_batch"] else "-",
            r["cpu_ms_per_req"],
            r["errors"],
        )
    log.info(
        "sequential p50 through the real client (PolicyClient / requests): %s",
        ", ".join(
            f"{name} {r['seq_p50_ms_real_client']:.2f} ms" for name, r in summary.items() if r["seq_p50_ms_real_client"]
        ),
    )
    log.info("")
    for name, value in ratios.items():
        log.info("  %-40s %.2f", name, value)
    result = {
        "config": vars(args) | {"cores": CORES},
        "compute_floor": floor,
        "summary": summary,
        "ratios": ratios,
        "runs": {t.name: t.results for t in targets},
    }
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=2)
    log.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
