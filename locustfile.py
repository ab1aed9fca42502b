"""Load-test a policy server with locust, through the project's own client.

Each simulated robot reads the served model's input spec from ``/model_info``, builds one
random observation matching it, and sends it in a loop with ``PolicyClient.infer``; every
call is reported to locust's statistics (name, response time, response length, failure).

    locust -f locustfile.py --headless -u 16 -r 16 -t 60s --host http://127.0.0.1:50000

``POLICY_MODEL`` picks a named model (``/models/<name>/infer``); ``POLICY_API_KEY`` is
sent as ``X-API-Key``; ``POLICY_WAIT_S`` paces each robot (default 0: back to back).
"""

from __future__ import annotations

import os
import time

import numpy as np
from locust import User, constant, task

from request_tools import PolicyClient


def observation_for(spec: list[dict], seed: int) -> dict[str, np.ndarray]:
    """A random observation matching ``/model_info``'s input spec."""
    rng = np.random.default_rng(seed)
    obs = {}
    for field in spec:
        dtype, shape = np.dtype(field["dtype"]), tuple(field["shape"])
        if dtype.kind in "iu":
            obs[field["name"]] = rng.integers(0, min(np.iinfo(dtype).max, 255), shape, dtype=dtype, endpoint=True)
        elif dtype.kind == "b":
            obs[field["name"]] = rng.random(shape) < 0.5
        else:
            obs[field["name"]] = rng.standard_normal(shape).astype(dtype)
    return obs


class PolicyRobot(User):
    """One robot: keep-alive connection, one observation, infer in a loop."""

    wait_time = constant(float(os.environ.get("POLICY_WAIT_S", "0")))
    _count = 0

    def on_start(self) -> None:
        model = os.environ.get("POLICY_MODEL") or None
        self.policy = PolicyClient(
            self.host, api_key=os.environ.get("POLICY_API_KEY") or None, model=model, retries=0, timeout_s=30,
        )
        self.name = f"/models/{model}/infer" if model else "/infer"
        PolicyRobot._count += 1
        self.obs = observation_for(self.policy.model_info()["inputs"], seed=PolicyRobot._count)

    def on_stop(self) -> None:
        self.policy.close()

    @task
    def infer(self) -> None:
        start = time.perf_counter()
        error = None
        try:
            self.policy.infer(self.obs)
        except Exception as exc:  # noqa: BLE001 (reported to locust as a failure, with its message)
            error = exc
        self.environment.events.request.fire(
            request_type="POST",
            name=self.name,
            response_time=(time.perf_counter() - start) * 1e3,
            response_length=self.policy.last_response_bytes if error is None else 0,
            exception=error,
            context={"model_version": self.policy.last_model_version},
        )
