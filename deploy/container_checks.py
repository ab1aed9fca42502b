"""The client side of ``deploy/container_test.sh`` and ``deploy/compose_demo.sh``.

Run with the project's virtual environment (numpy, requests, ``request_tools``), from the
network namespace the container answers in. Every loop here is bounded in count and time.

    python deploy/container_checks.py held-model DIR           a test model (below) in DIR/held
    python deploy/container_checks.py ready URL [CONTAINER]    seconds until /ready answers 200
    python deploy/container_checks.py smoke URL                inference, keys, one update
    python deploy/container_checks.py drain URL CONTAINER      a request in flight while the container stops

Keys come from ``POLICY_API_KEY`` and ``POLICY_ADMIN_KEY``. The held model is the default
policy, except that a request whose ``state[0]`` is 42 takes ``HOLD_S`` seconds longer, so a
test can have a request in flight when SIGTERM arrives.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from request_tools import PolicyClient, PolicyClientError, PolicyServerError  # noqa: E402

log = logging.getLogger("container_checks")

HOLD_S = 3.0
HELD_MARK = 42.0
_HELD_PATCH = f'''

# Added by deploy/container_checks.py (a test model, never a real one): a request whose
# state[0] is {HELD_MARK} takes {HOLD_S} s longer, so it is still in flight when SIGTERM arrives.
import time as _time

_plain_forward = CnnMlp.forward


def _held_forward(self, state, image):
    if bool((state[:, 0] == {HELD_MARK}).any()):
        _time.sleep({HOLD_S})
    return _plain_forward(self, state, image)


CnnMlp.forward = _held_forward
'''


def observation(held: bool = False) -> dict:
    """One observation for the default policy (``held``: the one the held model holds)."""
    state = np.zeros(6, dtype=np.float32)
    state[0] = HELD_MARK if held else 0.0
    return {"state": state, "image": np.zeros((480, 640, 3), dtype=np.uint8)}


def make_held_model(directory: Path) -> Path:
    """Write the held test model (the default policy's files, one function added) to ``directory``/held."""
    target = directory / "held"
    shutil.copytree(REPO / "models" / "default", target)
    with open(target / "policy.py", "a") as f:
        f.write(_HELD_PATCH)
    for path in [target, *target.iterdir()]:  # readable by any uid in the container
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def running(container: str) -> bool:
    state = subprocess.run(["podman", "inspect", "--format", "{{.State.Running}}", container],
                           capture_output=True, text=True, check=False).stdout.strip()
    return state == "true"


def wait_ready(url: str, container: str | None = None, timeout_s: float = 180.0) -> float:
    """Seconds until ``url``/ready answers 200; RuntimeError past ``timeout_s`` or once
    ``container`` (when given) is no longer running."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if container and not running(container):
            raise RuntimeError(f"{container} stopped before {url} was ready")
        try:
            if requests.get(url + "/ready", timeout=2).status_code == 200:
                return time.monotonic() - start
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready within {timeout_s} s")


def client(url: str, **kwargs) -> PolicyClient:
    return PolicyClient(url, api_key=os.environ["POLICY_API_KEY"], admin_key=os.environ.get("POLICY_ADMIN_KEY"),
                        **kwargs)


def perturbed_weights(scale: float = 1e-3) -> dict[str, np.ndarray]:
    """The shipped default weights, slightly changed: a new version to publish."""
    from safetensors.numpy import load_file

    weights = load_file(str(REPO / "models" / "default" / "model.safetensors"))
    return {k: (v + scale).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in weights.items()}


def smoke(url: str) -> dict:
    """Inference with the key, 401 without it, one weights update published and served."""
    with client(url) as c:
        action = c.infer(observation())["action"]
        assert action.shape == (10, 7), action.shape
        before = c.last_model_version
        with PolicyClient(url, check_spec=False) as anonymous:
            try:
                anonymous.infer(observation())
                raise AssertionError("inference without the API key was answered")
            except PolicyServerError as exc:
                assert exc.status == 401, exc
        answer = c.update_model(weights=perturbed_weights(), wait_s=30)
        assert answer["all_workers"], answer
        c.infer(observation())
        assert c.last_model_version == str(answer["version"]) != before, (before, answer)
    return {"inference": list(action.shape), "version_before": before, "version_after": answer["version"]}


def drain(url: str, container: str, stop_timeout_s: int = 40) -> dict:
    """SIGTERM (``podman stop``) while a held request is in flight: that request must be answered."""
    result: dict = {}

    def held_request() -> None:
        t0 = time.monotonic()
        try:
            with client(url, retries=0, timeout_s=30) as c:
                result["action"] = list(c.infer(observation(held=True))["action"].shape)
        except PolicyClientError as exc:
            result["error"] = repr(exc)
        result["request_s"] = round(time.monotonic() - t0, 2)

    thread = threading.Thread(target=held_request)
    thread.start()
    time.sleep(1.0)  # the request is being computed (HOLD_S = 3 s)
    t_stop = time.monotonic()
    stop = subprocess.Popen(["podman", "stop", "-t", str(stop_timeout_s), container],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    try:  # a request arriving during the drain: refused at once, never held
        requests.get(url + "/health", timeout=5)
        result["new_request_during_drain"] = "answered"
    except requests.ConnectionError:
        result["new_request_during_drain"] = "refused"
    except requests.Timeout:
        result["new_request_during_drain"] = "timed out"
    thread.join(timeout=60)
    stop.wait(timeout=stop_timeout_s + 20)
    result["stop_s"] = round(time.monotonic() - t_stop, 2)
    exit_code = subprocess.run(["podman", "inspect", "--format", "{{.State.ExitCode}}", container],
                               capture_output=True, text=True, check=True).stdout.strip()
    result["exit_code"] = int(exit_code)
    assert "error" not in result and result.get("action") == [10, 7], result
    assert result["exit_code"] == 0, result
    return result


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("held-model").add_argument("directory", type=Path)
    ready_parser = sub.add_parser("ready")
    ready_parser.add_argument("url")
    ready_parser.add_argument("container", nargs="?")
    sub.add_parser("smoke").add_argument("url")
    drain_parser = sub.add_parser("drain")
    drain_parser.add_argument("url")
    drain_parser.add_argument("container")
    args = parser.parse_args(argv)
    if args.command == "held-model":
        log.info("%s", make_held_model(args.directory))
    elif args.command == "ready":
        log.info("%.2f", wait_ready(args.url, args.container))
    elif args.command == "smoke":
        log.info("smoke: %s", json.dumps(smoke(args.url)))
    else:
        log.info("drain: %s", json.dumps(drain(args.url, args.container)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
