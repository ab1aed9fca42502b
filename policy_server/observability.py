"""Per-request observation: request ids, metrics, statistics and one structured log line.

:func:`install` registers Flask hooks: ``before_request`` notes the start and the request
id (``X-Request-Id`` when the client sent a sane one, else a fresh one); ``after_request``
counts the request in Prometheus, adds inference requests to the worker's statistics,
writes one JSON log line on the ``policy_server.access`` logger and echoes the id.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from flask import Flask, Response, g, request

from policy_server import metrics

access_log = logging.getLogger("policy_server.access")

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
INFERENCE_ENDPOINTS = frozenset({"infer", "infer_named", "oip.infer", "oip.infer_version"})
QUIET_ENDPOINTS = frozenset({"health", "ready", "prometheus_metrics", "oip.live", "oip.ready"})  # probes and scrapes: DEBUG only


def install(app: Flask, stats) -> None:
    """Observe every request of ``app``; inference requests also go to ``stats`` (RequestStats)."""

    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()
        given = request.headers.get("X-Request-Id", "")
        g.request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex

    @app.after_request
    def _observe(response: Response) -> Response:
        started = g.get("started")
        latency = time.perf_counter() - started if started is not None else 0.0
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        status = response.status_code
        metrics.REQUESTS.labels(route, str(status)).inc()
        metrics.REQUEST_SECONDS.labels(route).observe(latency)
        answer = g.get("answer")
        if request.endpoint in INFERENCE_ENDPOINTS:
            stats.record(
                latency, status < 400,
                answer.queue_s if answer is not None else 0.0, answer.compute_s if answer is not None else 0.0,
            )
        request_id = g.get("request_id") or uuid.uuid4().hex
        response.headers["X-Request-Id"] = request_id
        level = logging.DEBUG if request.endpoint in QUIET_ENDPOINTS else logging.INFO
        if access_log.isEnabledFor(level):
            access_log.log(level, json.dumps({
                "request_id": request_id, "method": request.method, "route": route, "path": request.path,
                "status": status, "latency_ms": round(latency * 1e3, 3),
                "batch_size": answer.batch_size if answer is not None else None,
                "model": g.get("model"), "version": response.headers.get("X-Model-Version"),
                "remote": request.remote_addr,
            }))
        return response
