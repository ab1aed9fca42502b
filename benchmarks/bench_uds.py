"""Sequential round trips over a Unix domain socket against loopback TCP, same server.

One server (``--workers 1 --uds``) binds both; the real client (``PolicyClient``, keep-alive)
calls ``GET /health`` (transport and HTTP only) and ``POST /infer`` with a reacher
observation (921 KB camera frame), alternating the two transports in blocks, several runs.
Prints p50/p90/p99 in ms per transport and call.

    .venv/bin/python benchmarks/bench_uds.py --runs 5 --n 200
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.local_server import local_server  # noqa: E402
from benchmarks.timing import latency_table, timed_calls, write_json  # noqa: E402
from examples.reacher import ReacherEnv  # noqa: E402
from request_tools import PolicyClient  # noqa: E402

log = logging.getLogger("bench_uds")

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
                samples.setdefault((transport, "GET /health"), []).append(timed_calls(client.health, args.n))
                samples.setdefault((transport, "POST /infer"), []).append(
                    timed_calls(lambda client=client: client.infer(obs), args.n)
                )
    results = latency_table(samples, "transport", log)
    if args.json:
        write_json(args.json, results, indent=1)
    return {"results": results}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    main()
