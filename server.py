"""The HTTP routes of the policy server.

Run ``python server.py --help`` for the CLI (it starts gunicorn with gunicorn.conf.py), or
``gunicorn -c gunicorn.conf.py "server:create_app()"`` with ``POLICY_SERVER_*`` variables.
"""

from __future__ import annotations

import os
import time
from typing import Any

from flask import Flask, Response, jsonify, request

from binary_protocol import binary_to_dict, dict_to_binary
from policy_server.app import access, observability
from policy_server.app.access import ADMIN, DOCS, INFERENCE, INFO, PROBES, RouteGroup
from policy_server.app.model_admin import ModelAdmin
from policy_server.app.model_catalog import ModelCatalog
from policy_server.app.observability import note
from policy_server.app.openapi import openapi_document
from policy_server.app.outcomes import outcomes_blueprint
from policy_server.app.web import (
    PolicyFlask,
    answer_headers,
    binary_response,
    episode_headers,
    read_body,
    read_command,
    register_error_handlers,
    request_deadline,
    requested_outputs,
    wait_seconds,
)
from policy_server.config import ServerConfig
from policy_server.errors import BatcherLost
from policy_server.inputs.tensors import BATCH_ROWS_HEADER, parse_batch_rows
from policy_server.oip.routes import oip_blueprint
from policy_server.openpi.routes import openpi_blueprint
from policy_server.serving.inference import Call, infer_call
from policy_server.serving.runtime import PolicyRuntime
from policy_server.telemetry import metrics
from policy_server.telemetry.stats import instance_summary
from policy_server.wsgi_keys import BUDGET


def create_app(config: ServerConfig | None = None, policy: Any = None) -> Flask:
    """Build the app. Models are loaded later, by ``runtime.start()`` in the worker.

    ``policy`` (any object following the models/ contract) replaces the model store: that
    one object is served, without hot reload. Tests use it to pass a fake. Raises
    :class:`policy_server.errors.ConfigError` for a config that cannot serve safely.
    """
    config = config or ServerConfig.from_env()
    config.validate()  # ConfigError, as from the CLI
    app = PolicyFlask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = max(config.max_body_bytes, config.max_update_bytes)
    runtime = PolicyRuntime(config, policy)
    model_admin = ModelAdmin(config, runtime.store, runtime.follower, runtime.board)
    catalog = ModelCatalog(config, runtime)
    app.extensions["policy_runtime"] = runtime
    register_error_handlers(app)
    observability.install(app, runtime.stats)
    access.install(app, config.api_key)

    @app.before_request
    def _before() -> None:
        if not runtime.booted:  # served without gunicorn.conf.py's post_worker_init hook
            runtime.start()

    # Every route is in the group of its audience, which decides the key it needs (policy_server/app/access.py).
    keys = (config.api_key, config.admin_key)
    probes = RouteGroup(PROBES, *keys)  # open; the access log line at DEBUG
    docs = RouteGroup(DOCS, *keys)  # open
    inference = RouteGroup(INFERENCE, *keys)  # X-API-Key; counted in /stats
    info = RouteGroup(INFO, *keys)  # X-API-Key
    admin = RouteGroup(ADMIN, *keys)  # X-Admin-Key (X-API-Key when there is no admin key)

    def infer_with(name: str | None):
        t0 = time.perf_counter()
        deadline = request_deadline(config.deadline_ms)
        rows = parse_batch_rows(request.headers.get(BATCH_ROWS_HEADER), config.queue_size)  # vectorized
        version, episode = episode_headers()  # a pin and the episode's id (a canary's assignment)
        note(model=name or runtime.default_name, episode=episode)
        body = read_body(config.max_body_bytes)
        t1 = time.perf_counter()
        call = Call(name, binary_to_dict(body), deadline, rows, requested_outputs(), request.environ.get(BUDGET),
                    version, episode)
        t2 = time.perf_counter()
        answer = infer_call(runtime, config, call)
        note(answer=answer)
        t3 = time.perf_counter()
        payload = dict_to_binary(answer.outputs)
        t4 = time.perf_counter()
        headers = answer_headers(answer, read_s=t1 - t0, decode_s=t2 - t1, encode_s=t4 - t3)
        if rows is not None:
            headers[BATCH_ROWS_HEADER] = str(rows)
        return binary_response(payload, headers)

    @inference.post("/infer")
    def infer():
        return infer_with(None)

    @inference.post("/models/<name>/infer")
    def infer_named(name: str):
        return infer_with(name)

    @probes.get("/health")
    def health():
        if runtime.batcher_lost:  # nothing would answer a queued request: restart this worker
            raise BatcherLost("the worker's batcher thread ended; see the server log")
        return jsonify({"status": "ok"})

    @probes.get("/ready")
    def ready():
        model = runtime.model  # NotReady -> 503 while loading or after a failed load
        return jsonify({"status": "ready", "model": model.name, "version": model.version})

    @probes.get("/metrics")
    def prometheus_metrics():
        body, content_type = metrics.exposition()
        return Response(body, content_type=content_type)

    @docs.get("/openapi.json")
    def openapi():
        return jsonify(openapi_document())

    @info.get("/stats")
    def stats():
        workers = runtime.stats_board.read()
        workers[os.getpid()] = runtime.stats.snapshot()  # this worker's own, fresh
        return jsonify(instance_summary(list(workers.values())))

    @info.get("/model_info")
    def model_info():
        return jsonify(catalog.model_detail(runtime.default_name))

    @info.get("/models")
    def list_models():
        listing = {"default": runtime.default_name, "models": catalog.models(), "workers": catalog.workers(),
                   "held_by_worker": catalog.held_by_worker()}
        return jsonify(listing)

    @info.get("/models/<name>")
    def named_model_info(name: str):
        return jsonify(catalog.model_detail(name))

    @admin.post("/update_model")
    def update_model():
        return jsonify(model_admin.update(read_command(config.max_update_bytes), wait_seconds()))

    @admin.post("/models/<name>/load")
    def load_model(name: str):
        return jsonify(model_admin.load(name, read_command(config.max_update_bytes), wait_seconds()))

    @admin.post("/models/<name>/unload")
    def unload_model(name: str):
        return jsonify(model_admin.unload(name, wait_seconds()))

    for group in (inference, probes, docs, info, admin):
        app.register_blueprint(group)
    app.register_blueprint(oip_blueprint(config, runtime))  # Open Inference Protocol v2: /v2/...
    app.register_blueprint(openpi_blueprint(config, runtime))  # openpi's WebSocket protocol: ws://host:port/
    app.register_blueprint(outcomes_blueprint(config, runtime))  # episode outcomes: POST /models/<name>/outcomes
    access.require_declared_access(app)
    return app


__all__ = ["create_app"]

if __name__ == "__main__":
    from policy_server.launcher import main

    main()
