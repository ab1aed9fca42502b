"""The client side of ``deploy/compose_demo.sh``: two instances behind nginx, shown for real.

    python deploy/compose_demo.py update PROXY_URL INSTANCE_URL...     one /update_model, reach time
    python deploy/compose_demo.py stop-one PROXY_URL CONTAINER         load while CONTAINER stops
    python deploy/compose_demo.py websocket PROXY_WS_URL               openpi's wire through the proxy

``update`` publishes slightly changed weights through the proxy (to whichever instance nginx
picks) and measures how long until every instance's ``/ready`` names the new version.
``stop-one`` runs a bounded inference load through the proxy with ``PolicyClient`` as a robot
would (its retries on), sends SIGTERM to one instance's container (``podman stop``) a few
seconds in, and counts the requests that failed after the client's retries: requests lost.
``websocket`` runs ``PolicyClient("ws://...")`` (openpi's WebSocket wire) through the proxy,
then holds one raw connection idle (no pings) longer than nginx's default 60 s read timeout
and uses it again: the proxy passes upgrades and keeps them open.
Keys come from ``POLICY_API_KEY`` and ``POLICY_ADMIN_KEY``. Prints one JSON line each.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from container_checks import client, observation, perturbed_weights  # noqa: E402

from request_tools import PolicyClientError  # noqa: E402

log = logging.getLogger("compose_demo")


def versions(urls: list[str]) -> list[str | None]:
    """The version each instance's /ready names (None while it does not answer 200)."""
    seen = []
    for url in urls:
        try:
            answer = requests.get(url + "/ready", timeout=2)
            seen.append(answer.json()["version"] if answer.status_code == 200 else None)
        except (requests.RequestException, ValueError, KeyError):
            seen.append(None)
    return seen


def update(proxy: str, instances: list[str], scale: float, timeout_s: float = 60.0) -> dict:
    """One /update_model through the proxy; seconds until it answered and until every instance serves it."""
    t0 = time.monotonic()
    with client(proxy) as c:
        answer = c.update_model(weights=perturbed_weights(scale), wait_s=30)
    answered_s = time.monotonic() - t0
    version = str(answer["version"])
    while (seen := versions(instances)) != [version] * len(instances):
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"version {version} not served everywhere within {timeout_s} s: {seen}")
        time.sleep(0.02)
    return {"version": answer["version"], "answered_s": round(answered_s, 3),
            "reached_all_s": round(time.monotonic() - t0, 3), "instances": len(instances)}


def stop_one(proxy: str, container: str, threads: int = 4, duration_s: float = 15.0, max_requests: int = 5000,
             stop_after_s: float = 4.0) -> dict:
    """Inference load through the proxy while ``container`` is stopped with SIGTERM: nothing may be lost."""
    results = {"ok": 0, "lost": 0, "errors": []}
    latencies: list[float] = []
    lock = threading.Lock()
    end = time.monotonic() + duration_s

    def robot() -> None:
        with client(proxy) as c:  # PolicyClient's default retries: connection failures and 503 + Retry-After
            while time.monotonic() < end:
                with lock:
                    if results["ok"] + results["lost"] >= max_requests:
                        return
                t0 = time.monotonic()
                try:
                    action = c.infer(observation())["action"]
                    assert action.shape == (10, 7)
                    outcome = "ok"
                except PolicyClientError as exc:
                    outcome = "lost"
                    with lock:
                        results["errors"].append(repr(exc)[:200])
                with lock:
                    results[outcome] += 1
                    latencies.append(time.monotonic() - t0)

    workers = [threading.Thread(target=robot) for _ in range(threads)]
    for w in workers:
        w.start()
    time.sleep(stop_after_s)
    t_stop = time.monotonic()
    stopped = subprocess.run(["podman", "stop", "-t", "40", container], capture_output=True, text=True, timeout=90)
    stop_s = time.monotonic() - t_stop
    for w in workers:
        w.join(timeout=duration_s + 60)
    exit_code = subprocess.run(["podman", "inspect", "--format", "{{.State.ExitCode}}", container],
                               capture_output=True, text=True, check=False).stdout.strip()
    latencies.sort()
    return {
        "requests": results["ok"] + results["lost"], "ok": results["ok"], "lost": results["lost"],
        "errors": results["errors"][:5], "threads": threads, "stopped": container,
        "stop_rc": stopped.returncode, "stop_s": round(stop_s, 2), "exit_code": exit_code,
        "latency_ms_p50": round(1e3 * statistics.median(latencies), 1) if latencies else None,
        "latency_ms_max": round(1e3 * latencies[-1], 1) if latencies else None,
    }


def websocket(proxy_ws: str, idle_s: float = 65.0, calls: int = 20) -> dict:
    """Inference over openpi's WebSocket wire through the proxy, and one connection idle for ``idle_s``."""
    from websockets.sync.client import connect

    import openpi_wire

    t0 = time.monotonic()
    with client(proxy_ws) as c:  # a WebSocketPolicyClient
        shapes = {tuple(c.infer(observation())["action"].shape) for _ in range(calls)}
    calls_s = time.monotonic() - t0
    headers = {"X-API-Key": os.environ["POLICY_API_KEY"]}
    with connect(proxy_ws + "/infer", additional_headers=headers, compression=None, max_size=None,
                 open_timeout=10, ping_interval=None) as sock:
        openpi_wire.decode(sock.recv(timeout=30))  # the server's metadata frame
        sock.send(openpi_wire.encode(observation()))
        before = openpi_wire.decode(sock.recv(timeout=30))["action"].shape
        time.sleep(idle_s)
        sock.send(openpi_wire.encode(observation()))
        after = openpi_wire.decode(sock.recv(timeout=30))["action"].shape
    assert shapes == {(10, 7)} and before == after == (10, 7), (shapes, before, after)
    return {"calls": calls, "calls_s": round(calls_s, 2), "idle_s": idle_s, "same_connection_after_idle": True}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("update")
    up.add_argument("proxy")
    up.add_argument("instances", nargs="+")
    up.add_argument("--scale", type=float, default=1e-3, help="how much the weights change (a new digest)")
    stop = sub.add_parser("stop-one")
    stop.add_argument("proxy")
    stop.add_argument("container")
    stop.add_argument("--duration-s", type=float, default=15.0)
    ws = sub.add_parser("websocket")
    ws.add_argument("proxy")
    ws.add_argument("--idle-s", type=float, default=65.0)
    args = parser.parse_args(argv)
    if args.command == "update":
        result = update(args.proxy, args.instances, args.scale)
    elif args.command == "websocket":
        result = websocket(args.proxy, args.idle_s)
    else:
        result = stop_one(args.proxy, args.container, duration_s=args.duration_s)
    log.info("%s: %s", args.command, json.dumps(result))
    return 1 if result.get("lost") else 0


if __name__ == "__main__":
    sys.exit(main())
