"""Serving benchmark: this server against a naive Flask+pickle server and a bare TCP socket
server, all doing the same forward of the same policy on the same observation, in one run.

Usage: python benchmarks/bench_serving.py [--runs 3] [--duration 8] [--sequential 200]
                                          [--clients 16] [--workers 2] [--json out.json]

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
import multiprocessing
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.timing import time_executor  # noqa: E402
from binary_protocol import binary_to_dict, dict_to_binary  # noqa: E402
from request_tools import PolicyClient  # noqa: E402

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


# -- clients: each returns a callable doing one round trip, returning the batch size (or 0) --


def policy_client(base_url: str, obs: dict) -> Callable[[], int]:
    """This project's client, as a robot would use it."""
    client = PolicyClient(base_url, timeout_s=30, retries=0)

    def call() -> int:
        assert client.infer(obs)["action"].shape == (10, 7)
        return client.last_batch_size or 0

    return call


def http_client(url: str, body: bytes, decode: Callable[[bytes], dict]) -> Callable[[], int]:
    session = requests.Session()
    session.trust_env = False  # as PolicyClient does: no per-call proxy scan of the environment

    def call() -> int:
        response = session.post(url, data=body, headers={"Content-Type": "application/octet-stream"}, timeout=30)
        response.raise_for_status()
        assert decode(response.content)["action"].shape == (10, 7)
        return int(response.headers.get("X-Batch-Size", 0))

    return call


class _Conn:
    """A keep-alive TCP connection to 127.0.0.1 with exact reads."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def read_exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buffer)))
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def read_until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buffer += chunk
        data, _, self.buffer = self.buffer.partition(marker)
        return data


def raw_http_client(port: int, body: bytes) -> Callable[[], int]:
    """A minimal HTTP/1.1 keep-alive client: the load generator's own cost kept small and
    the same for every HTTP target, so the server is what is measured."""
    conn = _Conn(port)
    request = (
        b"POST /infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body

    def call() -> int:
        conn.sock.sendall(request)
        head = conn.read_until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        if " 200 " not in head[0] + " ":
            raise RuntimeError(head[0])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
        answer = binary_to_dict(conn.read_exact(int(headers["content-length"])))
        assert answer["action"].shape == (10, 7)
        return int(headers.get("x-batch-size", 0))

    return call


def socket_client(port: int, body: bytes) -> Callable[[], int]:
    """The socket baseline's framing: u64 length, then a version-1 frame, each way."""
    conn = _Conn(port)
    message = struct.pack("<Q", len(body)) + body

    def call() -> int:
        conn.sock.sendall(message)
        (length,) = struct.unpack("<Q", conn.read_exact(8))
        assert binary_to_dict(conn.read_exact(length))["action"].shape == (10, 7)
        return 0

    return call


# -- targets --------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    command: list[str]
    env: dict[str, str]
    make_client: Callable[[int], Callable[[], int]]
    port: int
    real_client: Callable[[int], Callable[[], int]] | None = None
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    results: list[dict] = field(default_factory=list)

    def start(self, log_dir: Path) -> None:
        self.log_path = log_dir / f"{self.name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("POLICY_SERVER_")}
        env.update(self.env)
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(
                self.command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                call = self.make_client(self.port)
                for _ in range(20):  # reach every worker past its warm-up
                    call()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)

    def cpu_seconds(self) -> float:
        """User + system CPU of the server's process group (master and workers)."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.process.pid:  # process group id
                total += (int(fields[11]) + int(fields[12])) / ticks
        return total


def sequential(call: Callable[[], int], n: int) -> dict:
    latencies = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t0)
    ms = np.array(latencies) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "n": n}


def _load_process(make_client, port: int, threads: int, duration_s: float, start_at: float, out) -> None:
    """One load-generating process: ``threads`` keep-alive clients until the shared stop time."""
    calls = [make_client(port) for _ in range(threads)]
    latencies: list[float] = []
    sizes: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def loop(call) -> None:
        while time.time() < start_at:
            time.sleep(0.001)
        while time.time() < start_at + duration_s:
            t0 = time.perf_counter()
            try:
                size = call()
            except Exception as exc:  # noqa: BLE001 (counted and reported, never silently dropped)
                with lock:
                    errors.append(repr(exc))
                time.sleep(0.01)
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)
                sizes.append(size)

    workers = [threading.Thread(target=loop, args=(c,)) for c in calls]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.send((latencies, sizes, errors))


def concurrent(target: Target, clients: int, processes: int, duration_s: float) -> dict:
    """``clients`` connections spread over ``processes`` processes (so the load generator's
    GIL is not the bottleneck), all starting and stopping at the same wall-clock times."""
    ctx = multiprocessing.get_context("fork")
    start_at = time.time() + 1.0
    pipes, procs = [], []
    for i in range(processes):
        threads = clients // processes + (1 if i < clients % processes else 0)
        receive, send = ctx.Pipe(duplex=False)
        args = (target.make_client, target.port, threads, duration_s, start_at, send)
        proc = ctx.Process(target=_load_process, args=args)
        proc.start()
        pipes.append(receive)
        procs.append(proc)
    while time.time() < start_at:
        time.sleep(0.001)
    cpu_before = target.cpu_seconds()
    latencies, sizes, errors = [], [], []
    for receive in pipes:
        lat, size, err = receive.recv()
        latencies += lat
        sizes += size
        errors += err
    cpu = target.cpu_seconds() - cpu_before
    for proc in procs:
        proc.join(30)
    ms = np.array(latencies) * 1e3
    sized = [x for x in sizes if x]
    return {
        "requests": int(ms.size),
        "errors": len(errors),
        "req_per_s": ms.size / duration_s,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_batch": float(np.mean(sized)) if sized else None,
        "server_cpu_ms_per_req": 1e3 * cpu / max(1, ms.size),
    }


def compute_floor(iters: int) -> dict:
    """In-process forward of the same policy through the batch executor, per batch size."""
    import torch

    from policy_server.executor import BatchExecutor
    from policy_server.model_loader import load_model_dir

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
    parser.add_argument("--targets", default="server,naive,socket")
    parser.add_argument("--json", default=str(ROOT / "bench-results" / "serving.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    obs = reference_observation()
    frame = dict_to_binary(obs)
    inband = pickle.dumps(obs, protocol=5)
    per_worker = str(max(1, CORES // args.workers))
    ports = {name: free_port() for name in ("server", "naive", "socket")}
    all_targets = {
        "server": Target(
            "server",
            [
                sys.executable,
                "server.py",
                "--port",
                str(ports["server"]),
                "--workers",
                str(args.workers),
                "--threads",
                str(max(4, args.clients)),
                "--model-path",
                MODEL,
                "--model-store",
                tempfile.mkdtemp(prefix="bench-store-"),
                *args.server_args.split(),
            ],
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
