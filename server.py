"""The HTTP routes of the policy server.

Run ``python server.py --help`` for the CLI (it starts gunicorn with gunicorn.conf.py), or
``gunicorn -c gunicorn.conf.py "server:create_app()"`` with ``POLICY_SERVER_*`` variables.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Flask, jsonify

from binary_protocol import binary_to_dict, dict_to_binary
from policy_server.config import ServerConfig
from policy_server.runtime import PolicyRuntime
from policy_server.web import (
    binary_response,
    check_api_key,
    read_body,
    register_error_handlers,
    request_deadline_s,
    server_timing,
)

OPEN_ENDPOINTS = frozenset({"health", "ready"})


def create_app(config: ServerConfig | None = None, policy: Any = None) -> Flask:
    """Build the app. The model is loaded later, by ``runtime.start()`` in the worker.

    ``policy`` (any object following the models/ contract) replaces loading
    ``config.model_path``; tests use it to pass a fake.
    """
    config = config or ServerConfig.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    runtime = PolicyRuntime(config, policy)
    app.extensions["policy_runtime"] = runtime
    register_error_handlers(app)

    @app.before_request
    def _before() -> None:
        if not runtime.started:  # served without gunicorn.conf.py's post_worker_init hook
            runtime.start()
        check_api_key(config.api_key, OPEN_ENDPOINTS)

    @app.post("/infer")
    def infer():
        t0 = time.perf_counter()
        deadline = time.monotonic() + request_deadline_s(config.deadline_ms)
        body = read_body(config.max_body_bytes)
        t1 = time.perf_counter()
        inputs = binary_to_dict(body)
        runtime.validate(inputs)
        t2 = time.perf_counter()
        pending = runtime.submit(inputs, deadline)
        outputs, version = runtime.wait(pending)
        t3 = time.perf_counter()
        payload = dict_to_binary(outputs)
        t4 = time.perf_counter()
        timing = server_timing(
            read=t1 - t0, decode=t2 - t1, queue=pending.queue_s, compute=pending.compute_s, encode=t4 - t3
        )
        return binary_response(
            payload,
            {"X-Model-Version": version, "X-Batch-Size": str(pending.batch_size), "Server-Timing": timing},
        )

    @app.get("/health")
    def health():
        return jsonify({"status": "ok"})

    @app.get("/ready")
    def ready():
        model = runtime.model  # NotReady -> 503 while loading or after a failed load
        return jsonify({"status": "ready", "model": model.name, "version": model.version})

    @app.get("/model_info")
    def model_info():
        return jsonify(runtime.model.info())

    return app


__all__ = ["create_app"]

if __name__ == "__main__":
    from policy_server.launcher import main

    main()
