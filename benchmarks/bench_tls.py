"""Sequential round trips over HTTPS against plain HTTP on loopback: what TLS costs.

Two servers (``--workers 1``), one plain and one with ``--certfile``/``--keyfile`` (a throwaway
EC P-256 certificate made with ``openssl``, tests/support/tls_certs.py); the real client
(``PolicyClient``, keep-alive) calls ``GET /health`` (transport and HTTP only) and
``POST /infer`` with a reacher observation (921 KB camera frame), and a fresh connection per
call for ``/health`` (what a client that does not keep connections alive pays: the TCP and
TLS handshakes). The two servers alternate in blocks, several runs. Prints p50/p90/p99 in ms.

    .venv/bin/python benchmarks/bench_tls.py --runs 5 --n 200
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.local_server import local_server  # noqa: E402
from benchmarks.timing import latency_table, timed_calls, write_json  # noqa: E402
from examples.reacher import ReacherEnv  # noqa: E402
from request_tools import PolicyClient  # noqa: E402
from tests.support.tls_certs import make_pki  # noqa: E402

log = logging.getLogger("bench_tls")


def fresh_connection(url: str, verify: str | bool):
    """GET /health on a new connection each time (no keep-alive)."""
    def call() -> None:
        with requests.Session() as session:
            session.trust_env = False
            session.get(url + "/health", timeout=10, verify=verify).raise_for_status()
    return call


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--n", type=int, default=200, help="calls per run, transport and call")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    obs = ReacherEnv(seed=1).reset()
    samples: dict[tuple[str, str], list[np.ndarray]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as scratch:
        pki = make_pki(Path(scratch) / "pki")
        ca = str(pki / "ca.pem")
        tls_args = ["--certfile", str(pki / "server.pem"), "--keyfile", str(pki / "server.key")]
        with local_server([]) as (plain_url, _), local_server(tls_args, tls_ca=ca) as (tls_url, _):
            servers = {"http": (plain_url, True), "https": (tls_url, ca)}
            clients = {name: PolicyClient(url, verify=verify) for name, (url, verify) in servers.items()}
            for _ in range(args.runs):
                for name, client in clients.items():
                    url, verify = servers[name]
                    samples.setdefault((name, "GET /health"), []).append(timed_calls(client.health, args.n))
                    samples.setdefault((name, "POST /infer"), []).append(
                        timed_calls(lambda c=client: c.infer(obs), args.n)
                    )
                    samples.setdefault((name, "new conn /health"), []).append(
                        timed_calls(fresh_connection(url, verify), max(1, args.n // 4))
                    )
            for client in clients.values():
                client.close()
    samples = dict(sorted(samples.items(), key=lambda item: (item[0][1], item[0][0])))
    results = latency_table(samples, "scheme", log)
    if args.json:
        write_json(args.json, results, indent=1)
    return {"results": results}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    main()
