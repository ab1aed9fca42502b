"""Load generators of the serving benchmarks: one-round-trip clients for each target (this
project's client, requests, a minimal keep-alive HTTP/1.1 client over raw sockets, the socket
baseline's length-prefixed framing, openpi's own WebSocket client), a sequential phase and a
concurrent phase spread over processes; the benchmarks point them only at 127.0.0.1.
Re-exported by ``benchmarks/bench_serving.py``.
"""

from __future__ import annotations

import multiprocessing
import socket
import struct
import threading
import time
from collections.abc import Callable

import numpy as np
import requests

from benchmarks.serving_targets import Target
from binary_protocol import binary_to_dict
from request_tools import PolicyClient

# -- clients: each returns a callable doing one round trip, returning the batch size (or 0) --


def policy_client(base_url: str, obs: dict) -> Callable[[], int]:
    """This project's client, as a robot would use it."""
    client = PolicyClient(base_url, timeout_s=30, retries=0)

    def call() -> int:
        assert client.infer(obs)["action"].shape == (10, 7)
        return client.last_batch_size or 0

    return call


def openpi_client(port: int, obs: dict) -> Callable[[], int]:
    """openpi's own client (``openpi_client.WebsocketClientPolicy``), unmodified."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    policy = WebsocketClientPolicy("127.0.0.1", port)

    def call() -> int:
        answer = policy.infer(obs)
        assert answer["actions"].shape == (10, 7)
        return int(answer.get("server_timing", {}).get("batch_size", 0))

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
