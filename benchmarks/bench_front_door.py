"""Front-door benchmark: overload and slow clients against a real gunicorn (127.0.0.1 only).

Usage: python benchmarks/bench_front_door.py [--runs 3] [--phases shed,stalled,robots]
                                             [--robots 500] [--robot-seconds 20] [--json out.json]
                                             [--server-arg=--max-reading-bytes=16777216 ...]

Phases (each starts its own server, stops it at the end):

- ``shed``: 1 worker; ``admission_limit`` stalled uploads hold every admission slot, then
  one keep-alive client sends ``--shed-requests`` complete /infer requests: the time from its
  last byte sent to the 503's status line (p50/p99 ms), and whether each 503 had Retry-After.
- ``stalled``: 1 worker x ``--threads``; N stalled uploads (headers + 4 KB of a 0.9 MB body)
  are held, N = 0, threads, 4 x threads; a well-behaved PolicyClient's sequential /infer
  latency (p50/p99 ms) meanwhile.
- ``malloc`` (not in the default set): glibc malloc thresholds on against off, one worker,
  sequential requests: minor page faults and worker CPU per request, latency.
- ``robots``: ``--robots`` concurrent keep-alive clients (raw sockets, spread over processes)
  against ``--workers`` workers for ``--robot-seconds``: answers by status, 503s without
  Retry-After, connection errors, p50/p99 latency, and each worker's RSS at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.timing import write_json  # noqa: E402
from binary_protocol import dict_to_binary  # noqa: E402
from request_tools import PolicyClient  # noqa: E402
from tests.support.serving import run_server  # noqa: E402

log = logging.getLogger("bench_front_door")


def observation(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "state": rng.standard_normal(6).astype(np.float32),
        "image": rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),
    }


def request_bytes(port: int, body: bytes) -> bytes:
    head = (
        f"POST /infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


def stalled_uploads(port: int, n: int, body_len: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(request_bytes(port, b"\0" * body_len)[: 4096 + 200])
        socks.append(sock)
    time.sleep(0.3)
    return socks


def read_answer(sock: socket.socket, buf: bytearray) -> tuple[int, dict[str, str]]:
    """One answer from a keep-alive socket (``buf`` keeps read-ahead): status and headers."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("closed by the server")
        buf += chunk
    end = buf.index(b"\r\n\r\n")
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    need = end + 4 + int(headers.get("content-length", 0))
    while len(buf) < need:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("closed mid-answer")
        buf += chunk
    del buf[:need]
    return int(lines[0].split()[1]), headers


def spread(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {"n": 0}
    p50, p99 = np.percentile(ms, [50, 99])
    return {"n": len(ms), "p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3),
            "max_ms": round(float(max(ms)), 3)}


def phase_shed(args, tmp: Path) -> dict:
    limit = 16
    server_args = ("--threads", str(args.threads), "--admission-limit", str(limit))
    with run_server(tmp / "shed", workers=1, args=server_args) as server:
        held = stalled_uploads(server.port, limit, 900_000)
        payload = request_bytes(server.port, dict_to_binary(observation()))
        times, statuses, with_retry = [], [], 0
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        buf = bytearray()
        for _ in range(args.shed_requests):
            sock.sendall(payload)
            t0 = time.perf_counter()  # after the last byte: the server could answer from the head on
            status, headers = read_answer(sock, buf)
            times.append((time.perf_counter() - t0) * 1e3)
            statuses.append(status)
            with_retry += "retry-after" in headers
        sock.close()
        for s in held:
            s.close()
    return {"statuses": {str(s): statuses.count(s) for s in set(statuses)}, "with_retry_after": with_retry,
            "time_to_answer": spread(times)}


def phase_stalled(args, tmp: Path) -> dict:
    results = {}
    server_args = ("--threads", str(args.threads))
    with run_server(tmp / "stalled", workers=1, args=server_args) as server:
        obs = observation()
        for n in (0, args.threads, 4 * args.threads):
            held = stalled_uploads(server.port, n, 900_000)
            times, errors = [], []
            with PolicyClient(server.base_url, retries=0, timeout_s=30) as client:
                client.infer(obs)
                for _ in range(args.sequential):
                    t0 = time.perf_counter()
                    try:
                        client.infer(obs)
                        times.append((time.perf_counter() - t0) * 1e3)
                    except Exception as exc:  # noqa: BLE001 (reported, not hidden)
                        errors.append(repr(exc)[:200])
            for s in held:
                s.close()
            time.sleep(0.5)
            results[f"stalled_{n}"] = {**spread(times), "errors": errors[:5], "error_count": len(errors)}
    return results


def _robot_process(port: int, robots: int, seconds: float, queue) -> None:
    payload = request_bytes(port, dict_to_binary(observation()))
    out = {"latency_ms": [], "by_status_ms": {}, "statuses": {}, "no_retry_after": 0, "connection_errors": []}
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def robot() -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        except OSError as exc:
            with lock:
                out["connection_errors"].append(repr(exc))
            return
        buf = bytearray()
        try:
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                sock.sendall(payload)
                status, headers = read_answer(sock, buf)
                dt = (time.perf_counter() - t0) * 1e3
                with lock:
                    out["latency_ms"].append(dt)
                    out["by_status_ms"].setdefault(str(status), []).append(dt)
                    out["statuses"][status] = out["statuses"].get(status, 0) + 1
                    out["no_retry_after"] += status == 503 and "retry-after" not in headers
                if status == 503:  # as a polite robot would: Retry-After, jittered
                    time.sleep(float(headers.get("retry-after", "1")) * np.random.uniform(0.5, 1.0))
                if headers.get("connection", "").lower() == "close":
                    sock.close()
                    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
                    buf = bytearray()
        except OSError as exc:
            with lock:
                out["connection_errors"].append(repr(exc))
        finally:
            sock.close()

    threads = [threading.Thread(target=robot) for _ in range(robots)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    queue.put(out)


def _worker_rss_mb(pids) -> dict[int, float]:
    rss = {}
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss[pid] = round(int(line.split()[1]) / 1024, 1)
        except OSError:
            pass
    return rss


def phase_robots(args, tmp: Path) -> dict:
    server_args = ("--threads", str(args.threads), *args.server_arg)
    with run_server(tmp / "robots", workers=args.workers, args=server_args) as server:
        queue = multiprocessing.Queue()
        per = [args.robots // args.processes + (i < args.robots % args.processes) for i in range(args.processes)]
        procs = [multiprocessing.Process(target=_robot_process, args=(server.port, n, args.robot_seconds, queue))
                 for n in per]
        for p in procs:
            p.start()
        outs = [queue.get(timeout=args.robot_seconds + 300) for _ in procs]
        for p in procs:
            p.join(30)
        rss = _worker_rss_mb(server.ready_workers())
    latency = [x for o in outs for x in o["latency_ms"]]
    statuses: dict[str, int] = {}
    for o in outs:
        for status, n in o["statuses"].items():
            statuses[str(status)] = statuses.get(str(status), 0) + n
    return {
        "robots": args.robots, "workers": args.workers, "seconds": args.robot_seconds, "statuses": statuses,
        "no_retry_after_503": sum(o["no_retry_after"] for o in outs),
        "connection_errors": sum(len(o["connection_errors"]) for o in outs),
        "connection_error_examples": [e for o in outs for e in o["connection_errors"]][:5],
        "latency": spread(latency), "worker_rss_mb": rss,
        "latency_by_status": {
            status: spread([x for o in outs for x in o["by_status_ms"].get(status, [])]) for status in statuses
        },
    }


def _faults_and_cpu(pid: int) -> tuple[int, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[7]), (int(fields[11]) + int(fields[12])) / ticks  # minflt, utime + stime


def phase_malloc(args, tmp: Path) -> dict:
    """glibc malloc thresholds (mallopt in the worker) on against off: one worker, sequential
    requests; the worker's minor page faults and CPU per request, and client latency."""
    results = {}
    for tuning in ("1", "0"):
        env = {"POLICY_SERVER_MALLOC_TUNING": tuning}
        with run_server(tmp / f"malloc{tuning}", workers=1, env=env, args=("--torch-threads", "1")) as server:
            (pid,) = server.ready_workers()
            obs = observation()
            times = []
            with PolicyClient(server.base_url, retries=0, timeout_s=30) as client:
                for _ in range(20):
                    client.infer(obs)
                faults0, cpu0 = _faults_and_cpu(pid)
                for _ in range(args.sequential * 4):
                    t0 = time.perf_counter()
                    client.infer(obs)
                    times.append((time.perf_counter() - t0) * 1e3)
                faults1, cpu1 = _faults_and_cpu(pid)
            n = args.sequential * 4
            results["on" if tuning == "1" else "off"] = {
                **spread(times), "minor_faults_per_request": round((faults1 - faults0) / n, 1),
                "worker_cpu_ms_per_request": round(1e3 * (cpu1 - cpu0) / n, 3),
                "worker_rss_mb": _worker_rss_mb([pid])[pid],
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--phases", default="shed,stalled,robots")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--shed-requests", type=int, default=500)
    parser.add_argument("--sequential", type=int, default=50)
    parser.add_argument("--robots", type=int, default=500)
    parser.add_argument("--robot-seconds", type=float, default=20.0)
    parser.add_argument("--processes", type=int, default=16, help="load-generating processes for the robots")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra server flag for the robots phase, repeatable: "
                             "--server-arg=--max-reading-bytes=16777216")
    parser.add_argument("--json")
    args = parser.parse_args()
    phases = {"shed": phase_shed, "stalled": phase_stalled, "robots": phase_robots, "malloc": phase_malloc}
    results: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="bench-front-door-") as tmp:
        for run in range(args.runs):
            for name in args.phases.split(","):
                result = phases[name](args, Path(tmp) / f"run{run}")
                results.setdefault(name, []).append(result)
                log.info(f"run {run} {name}: {json.dumps(result)}")
    if args.json:
        write_json(args.json, results, indent=2)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    main()
