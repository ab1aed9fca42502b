"""Per-request observation: request ids, metrics, statistics and one structured log line.

:func:`install` registers Flask hooks: ``before_request`` notes the start and the request
id (``X-Request-Id`` when the client sent a sane one, else a fresh one); ``after_request``
counts the request in Prometheus (labelled by its route rule), adds inference requests to
the worker's statistics, writes one JSON log line on the ``policy_server.access`` logger
(at DEBUG for probes and scrapes) and echoes the id. Which requests are inference, probes
or scrapes is declared by the audience group of their route (:mod:`policy_server.app.access`).

Behind the front door (:mod:`policy_server.front_door.worker`) the request's arrival is
``environ[ARRIVED]`` (latency counts from there to the moment its status line was
committed), and counting waits until the answer was written (``environ[DEFERRED]``): a
client that vanished before it is counted as 499, and an answer the door replaced (a 2xx
ready past the deadline) as the 504 it got, not as the status it would have got. Answers
the front door gives itself are counted here too (:func:`count_refusal`, :func:`count_vanished`).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass

from flask import Flask, Response, g, request

from policy_server.app.access import request_audience
from policy_server.serving.inference import Answer
from policy_server.telemetry import metrics
from policy_server.wsgi_keys import ARRIVED, DEFERRED

access_log = logging.getLogger("policy_server.access")

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CLIENT_CLOSED = 499


@dataclass
class RequestNote:
    """What a route tells observability about the request it serves (:func:`note`): the
    model it asked for, its episode id, and the answer (batch size, queue and compute time)."""

    model: str | None = None
    episode: str | None = None
    answer: Answer | None = None


def note(**fields) -> RequestNote:
    """This request's :class:`RequestNote`, with ``fields`` (model, episode, answer) set."""
    current = g.get("note")
    if current is None:
        current = g.note = RequestNote()
    for name, value in fields.items():
        if not hasattr(current, name):
            raise AttributeError(f"a request note has no field {name!r}")
        setattr(current, name, value)
    return current


def install(app: Flask, stats) -> None:
    """Observe every request of ``app``; inference requests also go to ``stats`` (RequestStats)."""

    @app.before_request
    def _start() -> None:
        arrived = request.environ.get(ARRIVED)
        g.t0 = time.perf_counter() - (time.monotonic() - arrived if arrived is not None else 0.0)
        given = request.headers.get("X-Request-Id", "")
        g.request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex

    @app.after_request
    def _observe(response: Response) -> Response:
        t0 = g.get("t0")
        latency = time.perf_counter() - t0 if t0 is not None else 0.0
        arrived = request.environ.get(ARRIVED)
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        status = response.status_code
        noted = g.get("note") or RequestNote()
        answer = noted.answer
        request_id = g.get("request_id") or uuid.uuid4().hex
        response.headers["X-Request-Id"] = request_id
        fields = {
            "request_id": request_id, "method": request.method, "route": route, "path": request.path,
            "status": status, "latency_ms": round(latency * 1e3, 3),
            "batch_size": answer.batch_size if answer is not None else None,
            "model": noted.model, "version": response.headers.get("X-Model-Version"),
            "remote": request.remote_addr,
        }
        if noted.episode is not None:
            fields["episode_id"] = noted.episode
        audience = request_audience()  # None for a request that matched no route
        inference = audience is not None and audience.inference
        quiet = audience is not None and audience.quiet  # probes and scrapes: DEBUG only

        def record(delivered: bool = True, replaced: int | None = None, committed: float | None = None) -> None:
            # From the front door, once the answer was written: ``replaced`` is the status it
            # answered instead (504 for an answer ready too late), ``committed`` the
            # time.monotonic() its status line was committed: the request's latency ends there.
            final = (replaced or status) if delivered else CLIENT_CLOSED
            if committed is not None and arrived is not None:
                fields["latency_ms"] = round((committed - arrived) * 1e3, 3)
            took = fields["latency_ms"] / 1e3
            metrics.REQUESTS.labels(route, str(final)).inc()
            metrics.REQUEST_SECONDS.labels(route).observe(took)
            if inference:
                stats.record(
                    took, final < 400,
                    answer.queue_s if answer is not None else 0.0, answer.compute_s if answer is not None else 0.0,
                )
            level = logging.DEBUG if quiet and delivered else logging.INFO
            if access_log.isEnabledFor(level):
                if not delivered:
                    fields.update(status=final, detail=f"client closed the connection before its {status} answer")
                elif replaced:
                    fields.update(status=final, detail=f"its {status} answer was ready past the deadline; dropped")
                access_log.log(level, json.dumps(fields))

        deferred = request.environ.get(DEFERRED)
        if deferred is not None:
            deferred.append(record)
        else:
            record()
        return response


def count_refusal(route: str, status: int, reason: str, req, remote: str, latency_s: float) -> None:
    """An answer the front door gave without the app (408, 411, 413, 414, 431, 400, 503)."""
    metrics.REQUESTS.labels(route, str(status)).inc()
    metrics.FRONT_DOOR_REFUSALS.labels(reason, str(status)).inc()
    access_log.info(json.dumps({
        "request_id": None, "method": getattr(req, "method", None), "route": route,
        "path": getattr(req, "path", None), "status": status, "latency_ms": round(latency_s * 1e3, 3),
        "remote": remote, "refused": reason,
    }))


def count_vanished(route: str, req, remote: str, latency_s: float, when: str) -> None:
    """A client that closed or reset its connection before its answer: 499, logged at INFO."""
    metrics.REQUESTS.labels(route, str(CLIENT_CLOSED)).inc()
    access_log.info(json.dumps({
        "request_id": None, "method": getattr(req, "method", None), "route": route,
        "path": getattr(req, "path", None), "status": CLIENT_CLOSED, "latency_ms": round(latency_s * 1e3, 3),
        "remote": remote, "detail": f"client closed the connection {when}",
    }))


def count_late_answer(stage: str) -> None:
    """An answer ready past its deadline and replaced by 504 (the front door's "write" stage)."""
    metrics.LATE_ANSWERS.labels(stage).inc()


def count_certificate_reload(outcome: str) -> None:
    """Changed certificate files: "loaded" (new handshakes use them) or "failed" (the old ones serve)."""
    metrics.TLS_CERTIFICATE_RELOADS.labels(outcome).inc()


def count_closed(reason: str, n: int = 1) -> None:
    """Connections the front door closed between requests ("idle", "evicted")."""
    metrics.FRONT_DOOR_CLOSED.labels(reason).inc(n)


def count_message(
    *, stats, route: str, request_id: str, status: int, delivered: bool, latency_s: float, answer, model: str,
    remote: str, session_id: str | None = None,
) -> None:
    """One WebSocket message answered (or not: ``delivered`` False is a 499), counted like an
    inference request: ``policy_requests_total`` and the latency under ``route``, the worker's
    statistics, and one access-log line. ``answer`` is the ``runtime.Answer`` when there is one."""
    final = status if delivered else CLIENT_CLOSED
    metrics.REQUESTS.labels(route, str(final)).inc()
    metrics.REQUEST_SECONDS.labels(route).observe(latency_s)
    stats.record(
        latency_s, final < 400, answer.queue_s if answer is not None else 0.0,
        answer.compute_s if answer is not None else 0.0,
    )
    if access_log.isEnabledFor(logging.INFO):
        fields = {
            "request_id": request_id, "method": "WS", "route": route, "path": route.removeprefix("ws:"),
            "status": final, "latency_ms": round(latency_s * 1e3, 3),
            "batch_size": answer.batch_size if answer is not None else None, "model": model,
            "version": answer.version if answer is not None else None, "remote": remote,
        }
        if session_id is not None:
            fields["session_id"] = session_id
        if not delivered:
            fields["detail"] = f"client closed the connection before its {status} answer"
        access_log.info(json.dumps(fields))
