"""Sequential round trips over a Unix domain socket against loopback TCP, same server.

One server (``--workers 1 --uds``) binds both; the real client (``PolicyClient``, keep-alive)
calls ``GET /health`` (transport and HTTP only) and ``POST /infer`` with a reacher
observation (921 KB camera frame), alternating the two transports in blocks, several runs.
Prints p50/p90/p99 in ms per transport and call.

    .venv/bin/python benchmarks/bench_uds.py --runs 5 --n 200
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.local_server import local_server  # noqa: E402
from examples.reacher import ReacherEnv  # noqa: E402
from request_tools import PolicyClient  # noqa: E402

log = logging.getLogger("bench_uds")

def timed(call, n: int) -> np.ndarray:
    for _ in range(10):
        call()
    times = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        call()
        times[i] = time.perf_counter() - t0
    return times * 1e3


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--n", type=int, default=200, help="calls per run, transport and route")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    obs = ReacherEnv(seed=1).reset()
    samples: dict[tuple[str, str], list[np.ndarray]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-uds-") as scratch, \
            local_server(["--uds", str(Path(scratch) / "policy.sock")]) as (url, _):
        sock = Path(scratch) / "policy.sock"
        clients = {"tcp": PolicyClient(url), "uds": PolicyClient(f"unix://{sock}")}
        for _ in range(args.runs):
            for transport, client in clients.items():
                samples.setdefault((transport, "GET /health"), []).append(timed(client.health, args.n))
                samples.setdefault((transport, "POST /infer"), []).append(
                    timed(lambda client=client: client.infer(obs), args.n)
                )
    results = []
    log.info(f"{'transport':9} {'call':12} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}  (p50 per run)")
    for (transport, call), runs in samples.items():
        all_ms = np.concatenate(runs)
        row = {
            "transport": transport,
            "call": call,
            "p50_ms": float(np.median(all_ms)),
            "p90_ms": float(np.percentile(all_ms, 90)),
            "p99_ms": float(np.percentile(all_ms, 99)),
            "run_p50s_ms": [round(float(np.median(r)), 3) for r in runs],
        }
        results.append(row)
        log.info(
            f"{transport:9} {call:12} {row['p50_ms']:8.3f} {row['p90_ms']:8.3f} {row['p99_ms']:8.3f}  "
            f"{row['run_p50s_ms']}"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return {"results": results}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    main()
