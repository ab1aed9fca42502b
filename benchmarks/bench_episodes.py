"""Episodes: what a pinned request costs against an unpinned one, and what holding two versions
costs in memory.

Cost: ``server.py`` with the default policy (``--workers 2``, a fresh model store), driven by
minimal keep-alive HTTP clients over raw sockets (as bench_serving.py) whose requests take
turns: unpinned, then pinned, then unpinned..., so both kinds meet the same machine at the
same moment (this box is shared; separate phases differed by 20% from one minute to the
next). Pinned is ``X-Model-Version`` of the stable version and an ``X-Episode-Id`` (what a
ChunkRunner sends), and in a second pairing ``retained``: pinned to the previous version
after an update (its own batch lane, the retained copy). Per run and pairing: 1 sequential
connection (p50 of ``--sequential`` requests of each kind) and ``--clients`` concurrent
connections for ``--duration`` seconds; the ratio of the pinned p50 to the unpinned one, and
its median over runs (the goal: within 2%). Also, in this process, what
the pin adds per request in a worker (headers parsed, version looked up, canary hash).

Memory: a synthetic MLP policy of about ``--mlp-mb`` MB of weights (``--workers 2``,
``--retain-previous-s`` short). RSS per worker (``VmRSS``): one version held; after a weights
push while requests pinned to the old version keep it (two held); once no request pinned to
it came for the window (one again); and the same after a second update (steady state).

    python benchmarks/bench_episodes.py --runs 3 --duration 6 --sequential 300
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.bench_serving import MODEL, free_port, reference_observation  # noqa: E402
from benchmarks.serving_load import _Conn  # noqa: E402
from benchmarks.serving_targets import Target  # noqa: E402
from benchmarks.timing import write_json  # noqa: E402
from binary_protocol import binary_to_dict, dict_to_binary  # noqa: E402
from request_tools import PolicyClient  # noqa: E402

log = logging.getLogger("bench_episodes")

MLP_POLICY = '''
import os

import torch
from torch import nn

from policy_server.contract import TensorSpec
from policy_server.torch_policy import ModulePolicy, load_weights_strict

INPUT_SPEC = (TensorSpec("state", "float32", (6,)),)
OUTPUT_SPEC = (TensorSpec("action", "float32", (10, 7)),)
WIDTH, DEPTH = {width}, {depth}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, WIDTH)
        self.hidden = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH))
        self.out = nn.Linear(WIDTH, 70)

    def forward(self, state):
        x = torch.tanh(self.inp(state))
        for layer in self.hidden:
            x = torch.tanh(layer(x))
        return {{"action": self.out(x).view(-1, 10, 7)}}


def load_model(model_dir, device):
    module = MLP()
    load_weights_strict(module, os.path.join(model_dir, "model.safetensors"))
    return ModulePolicy(module, INPUT_SPEC, OUTPUT_SPEC, device=device)
'''


def mlp_weights(width: int, depth: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def linear(name: str, n_in: int, n_out: int) -> dict[str, np.ndarray]:
        scale = 1 / np.sqrt(n_in)
        return {f"{name}.weight": (rng.standard_normal((n_out, n_in)) * scale).astype(np.float32),
                f"{name}.bias": np.zeros(n_out, np.float32)}

    weights = {**linear("inp", 6, width), **linear("out", width, 70)}
    for i in range(depth):
        weights.update(linear(f"hidden.{i}", width, width))
    return weights


def write_mlp_model(path: Path, mb: float) -> tuple[int, int]:
    """A model directory of about ``mb`` MB of float32 weights in 2048-wide layers (16 MB each)."""
    from safetensors.numpy import save_file

    width = 2048
    depth = max(1, round(mb * 2**20 / (4 * width * width)))
    path.mkdir(parents=True, exist_ok=True)
    (path / "policy.py").write_text(MLP_POLICY.format(width=width, depth=depth))
    save_file(mlp_weights(width, depth, 0), str(path / "model.safetensors"))
    return width, depth


def raw_client(port: int, body: bytes, headers: dict[str, str]):
    """A keep-alive HTTP/1.1 client sending ``headers`` with every request; checks the version answered."""
    return raw_call(_Conn(port), body, headers)


def raw_call(conn: _Conn, body: bytes, headers: dict[str, str]):
    """One request with ``headers`` on ``conn`` per call (see :func:`raw_client`)."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode()
    request = (b"POST /infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n" + extra
               + b"Content-Length: %d\r\n\r\n" % len(body)) + body
    want = headers.get("X-Model-Version")

    def call() -> int:
        conn.sock.sendall(request)
        head = conn.read_until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        if " 200 " not in head[0] + " ":
            raise RuntimeError(head[0])
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
        binary_to_dict(conn.read_exact(int(fields["content-length"])))
        if want is not None and fields["x-model-version"] != want:
            raise RuntimeError(f"asked for version {want}, answered by {fields['x-model-version']}")
        return int(fields.get("x-batch-size", 0))

    return call


def server_command(port: int, model_path: str, workers: int, retain_s: float, model_root: str) -> list[str]:
    return [sys.executable, "server.py", "--port", str(port), "--workers", str(workers), "--threads", "16",
            "--model-path", model_path, "--model-root", model_root, "--model-store",
            tempfile.mkdtemp(prefix="bench-store-"), "--retain-previous-s", str(retain_s)]


def perturbed(path: str, seed: int) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    rng = np.random.default_rng(seed)
    return {k: v + rng.normal(0, 1e-3, v.shape).astype(v.dtype) if v.dtype.kind == "f" else v
            for k, v in load_file(path).items()}


def interleaved(port: int, body: bytes, variants: list[dict[str, str]], offset: int = 0):
    """One keep-alive connection whose requests take turns among ``variants`` (header sets):
    each call returns (which variant, seconds); every variant sees the same conditions."""
    conn = _Conn(port)
    calls = [raw_call(conn, body, headers) for headers in variants]
    turn = [offset]

    def call() -> tuple[int, float]:
        k = turn[0] % len(calls)
        turn[0] += 1
        t0 = time.perf_counter()
        calls[k]()
        return k, time.perf_counter() - t0

    return call


def _mixed_process(port, body, variants, threads, duration_s, start_at, first, out) -> None:
    """One load process: ``threads`` interleaved connections until the shared stop time."""
    import threading

    samples: list[list[float]] = [[] for _ in variants]
    errors: list[str] = []
    lock = threading.Lock()

    def loop(offset: int) -> None:
        call = interleaved(port, body, variants, offset)
        while time.time() < start_at:
            time.sleep(0.001)
        while time.time() < start_at + duration_s:
            try:
                k, seconds = call()
            except Exception as exc:  # noqa: BLE001 (counted and reported)
                with lock:
                    errors.append(repr(exc))
                return
            with lock:
                samples[k].append(seconds)

    workers = [threading.Thread(target=loop, args=(first + i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.send((samples, errors))


def mixed_load(port: int, body: bytes, variants: list[dict], clients: int, processes: int, duration_s: float):
    """``clients`` interleaved connections over ``processes`` processes (half start on each
    variant): the latencies of each variant under one and the same load, and the errors."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    start_at = time.time() + 1.0
    pipes, procs, first = [], [], 0
    for i in range(processes):
        threads = clients // processes + (1 if i < clients % processes else 0)
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_mixed_process, args=(port, body, variants, threads, duration_s, start_at,
                                                          first, send))
        proc.start()
        pipes.append(receive)
        procs.append(proc)
        first += threads
    samples: list[list[float]] = [[] for _ in variants]
    errors: list[str] = []
    for receive in pipes:
        got, err = receive.recv()
        for k, values in enumerate(got):
            samples[k] += values
        errors += err
    for proc in procs:
        proc.join(30)
    return samples, errors


def cost(args) -> dict:
    body = dict_to_binary(reference_observation())
    port = free_port()
    target = Target("server", server_command(port, MODEL, args.workers, 600, str(ROOT / "models")), {},
                    lambda p: raw_client(p, body, {}), port)
    target.start(Path(tempfile.mkdtemp(prefix="bench-episodes-")))
    try:
        with PolicyClient(f"http://127.0.0.1:{port}", timeout_s=60) as admin:
            old = admin.model_info()["version"]
            new = str(admin.update_model(weights=perturbed(str(Path(MODEL) / "model.safetensors"), 1),
                                         wait_s=30)["version"])
        pins = {"pinned": {"X-Model-Version": new, "X-Episode-Id": "bench-robot-0:episode-1"},
                "retained": {"X-Model-Version": old, "X-Episode-Id": "bench-robot-0:episode-0"}}
        runs: dict[str, list[dict]] = {name: [] for name in pins}
        for run in range(args.runs):
            for name, headers in pins.items():
                variants = [{}, headers]
                call = interleaved(port, body, variants, offset=run)
                sequential_s: list[list[float]] = [[], []]
                for i in range(20 + 2 * args.sequential):
                    k, seconds = call()
                    if i >= 20:
                        sequential_s[k].append(seconds)
                loaded_s, errors = mixed_load(port, body, variants, args.clients, args.processes, args.duration)
                row = {"errors": len(errors)}
                for phase, samples in (("sequential", sequential_s), ("concurrent", loaded_s)):
                    unpinned, pinned = (float(np.percentile(np.array(x) * 1e3, 50)) for x in samples)
                    row[phase] = {"unpinned_p50_ms": unpinned, f"{name}_p50_ms": pinned, "ratio": pinned / unpinned,
                                  "n": [len(x) for x in samples]}
                runs[name].append(row)
                log.info("run %d %-8s sequential p50 %.3f vs %.3f ms (x%.4f) | %d clients p50 %.3f vs %.3f ms "
                         "(x%.4f), %d errors", run, name, row["sequential"]["unpinned_p50_ms"],
                         row["sequential"][f"{name}_p50_ms"], row["sequential"]["ratio"], args.clients,
                         row["concurrent"]["unpinned_p50_ms"], row["concurrent"][f"{name}_p50_ms"],
                         row["concurrent"]["ratio"], row["errors"])
    finally:
        target.stop()
    summary = {
        name: {f"{phase}_ratio_median": float(np.median([r[phase]["ratio"] for r in rows]))
               for phase in ("sequential", "concurrent")} | {"errors": sum(r["errors"] for r in rows)}
        for name, rows in runs.items()
    }
    log.info("p50 against unpinned requests, median over runs: %s", summary)
    return {"runs": runs, "summary": summary}


def micro(args) -> dict:
    """What the pin adds inside a worker, per request (microseconds): the two headers parsed, and
    the version looked up; an unpinned request with an episode id under a canary hashes the id."""
    import timeit
    from types import SimpleNamespace

    from policy_server.inputs.episodes import parse_episode_id, parse_version
    from policy_server.serving.model_versions import ModelVersions

    def served(version: str):
        return SimpleNamespace(model=SimpleNamespace(version=version), weight_bytes=0)

    versions = ModelVersions(served("4"), served("5"), 0.1, served("3"), 0.0)
    cases = {
        "parse headers": lambda: (parse_version("4"), parse_episode_id("bench-robot-0:episode-1")),
        "pinned lookup": lambda: versions.get("3"),
        "canary assignment": lambda: versions.assign("default", "bench-robot-0:episode-1"),
    }
    out = {}
    for name, case in cases.items():
        n = 100_000
        out[name] = min(timeit.repeat(case, number=n, repeat=5)) / n * 1e6
        log.info("%-18s %.2f us per request", name, out[name])
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory(args) -> dict:
    model_root = Path(tempfile.mkdtemp(prefix="bench-mlp-"))
    width, depth = write_mlp_model(model_root / "mlp", args.mlp_mb)
    port = free_port()
    obs = {"state": np.zeros(6, np.float32)}
    target = Target("mlp", server_command(port, str(model_root / "mlp"), args.workers, args.retain_s,
                                          str(model_root)), {},
                    lambda p: raw_client(p, dict_to_binary(obs), {}), port)
    target.start(Path(tempfile.mkdtemp(prefix="bench-episodes-")))
    base = f"http://127.0.0.1:{port}"
    phases: list[dict] = []

    def snapshot(phase: str) -> None:
        listing = requests.get(base + "/models", timeout=10).json()
        rss = {pid: round(rss_mb(int(pid)), 1) for pid in listing["workers"]}
        phases.append({"phase": phase, "rss_mb": rss, "held": listing["held_by_worker"]})
        log.info("%-28s RSS per worker (MB) %s, held %s", phase, rss, listing["held_by_worker"])

    def pinned_load(version: str, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with PolicyClient(base, check_spec=False) as fresh:  # new connections: every worker
                fresh.infer(obs, version=version)

    try:
        with PolicyClient(base, timeout_s=120) as admin:
            weights_mb = admin.model_info()["held_bytes"] / 2**20
            log.info("MLP of %d x %d: %.1f MB of weights per version", depth, width, weights_mb)
            for _ in range(20):
                admin.infer(obs)
            time.sleep(1)
            snapshot("one version")
            for update in (1, 2):
                old = admin.model_info()["version"]
                admin.update_model(weights=mlp_weights(width, depth, update), wait_s=120)
                pinned_load(old, 3.0)
                snapshot(f"update {update}: two held")
                deadline = time.monotonic() + args.retain_s + 30
                while any(len(v.get("default", [])) > 1 for v in
                          requests.get(base + "/models", timeout=10).json()["held_by_worker"].values()):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the retained version was never unloaded")
                    time.sleep(0.2)
                time.sleep(1)
                snapshot(f"update {update}: after the window")
    finally:
        target.stop()
    return {"weights_mb_per_version": weights_mb, "phases": phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds of each concurrent phase")
    parser.add_argument("--sequential", type=int, default=300, help="requests of each sequential phase")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--processes", type=int, default=4, help="load-generating processes for the clients")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mlp-mb", type=float, default=128.0, help="weights of the memory phase's model")
    parser.add_argument("--retain-s", type=float, default=4.0, help="--retain-previous-s of the memory phase")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", default=str(ROOT / "bench-results" / "episodes.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = {"args": vars(args), "micro_us": micro(args)}
    if not args.skip_cost:
        result["cost"] = cost(args)
    if not args.skip_memory:
        result["memory"] = memory(args)
    write_json(args.json, result, indent=2)


if __name__ == "__main__":
    main()
