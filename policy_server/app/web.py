"""HTTP plumbing shared by the routes: body reading, responses, error handlers.

Who may call a route (the API and admin keys) is :mod:`policy_server.app.access`.
"""

from __future__ import annotations

import json
import logging
import time

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, InternalServerError
from werkzeug.routing.exceptions import WebsocketMismatch

from binary_protocol import ProtocolError, binary_to_dict
from policy_server.errors import (
    BadRequest,
    DeadlineExceeded,
    LengthRequired,
    PayloadTooLarge,
    ServingError,
    UnsupportedMediaType,
)
from policy_server.inputs.episodes import EPISODE_HEADER, VERSION_HEADER, parse_episode_id, parse_version
from policy_server.wsgi_keys import ARRIVED, DEADLINE

log = logging.getLogger(__name__)

BINARY_MIMETYPE = "application/octet-stream"


class PolicyFlask(Flask):
    """Flask, with an unhandled error logged once: by the InternalServerError handler that
    :func:`register_error_handlers` installs, not also by Flask before it."""

    def log_exception(self, exc_info) -> None:
        """Nothing here: ``register_error_handlers`` logs the error with its traceback."""


def read_body(max_bytes: int) -> bytes:
    """Read exactly Content-Length bytes straight from ``wsgi.input``.

    Cheaper than ``request.get_data()`` (no chunk joining), and a missing Content-Length is
    refused instead of trusting a chunked stream that could be cut short silently.
    """
    raw_length = request.environ.get("CONTENT_LENGTH")
    if not raw_length:
        raise LengthRequired("Content-Length header is required")
    try:
        length = int(raw_length)
    except ValueError:
        raise BadRequest("Content-Length is not an integer") from None
    if length < 0:
        raise BadRequest("Content-Length is negative")
    if length > max_bytes:
        raise PayloadTooLarge(f"body of {length} bytes exceeds the limit of {max_bytes}")
    body = request.environ["wsgi.input"].read(length)
    if len(body) != length:
        raise BadRequest(f"body ended after {len(body)} of {length} bytes")
    return body


def request_deadline_s(default_ms: int) -> float:
    """Seconds this request may wait before compute: the default, or less via ``X-Deadline-Ms``."""
    raw = request.headers.get("X-Deadline-Ms")
    if raw is None:
        return default_ms / 1000.0
    try:
        asked = float(raw)
    except ValueError:
        raise BadRequest("X-Deadline-Ms is not a number") from None
    if not asked > 0:
        raise BadRequest("X-Deadline-Ms must be positive")
    return min(asked, default_ms) / 1000.0


def request_arrival(now: float | None = None) -> float:
    """When this request arrived (``time.monotonic()``): its first byte behind the front door, else now."""
    arrived = request.environ.get(ARRIVED)
    return arrived if arrived is not None else (time.monotonic() if now is None else now)


def request_deadline(default_ms: int) -> float:
    """The request's deadline as a ``time.monotonic()`` instant, counted from its arrival.

    Behind the front door the arrival is the request's first byte, so reading it and
    waiting for a thread count too; else it is now. Raises
    DeadlineExceeded (504) when it already passed: nothing is computed for it.
    """
    now = time.monotonic()
    deadline = request_arrival(now) + request_deadline_s(default_ms)
    if deadline <= now:
        raise DeadlineExceeded(f"deadline passed {1e3 * (now - deadline):.1f} ms before the request reached a thread")
    note_deadline(deadline)
    return deadline


def note_deadline(deadline: float) -> None:
    """Tell the front door the request's deadline: a 2xx not written by then is answered 504."""
    request.environ[DEADLINE] = deadline


def requested_outputs() -> list[str]:
    """Optional outputs asked for by ``?outputs=attention`` (comma-separated, repeatable)."""
    names = [n.strip() for value in request.args.getlist("outputs") for n in value.split(",")]
    return [n for n in names if n]


def episode_headers() -> tuple[str | None, str | None]:
    """The request's pinned version (``X-Model-Version``) and episode id (``X-Episode-Id``),
    each None when absent; BadRequest naming the header that is malformed."""
    return parse_version(request.headers.get(VERSION_HEADER)), parse_episode_id(request.headers.get(EPISODE_HEADER))


def read_command(max_bytes: int) -> dict:
    """A management body: JSON, or wire format v1 (a weights push); empty means ``{}``."""
    mimetype = request.mimetype
    if request.environ.get("CONTENT_LENGTH", "") in ("", "0"):
        return {}
    if mimetype == "application/json":
        body = read_body(max_bytes)
        try:
            data = json.loads(body) if body else {}
        except ValueError as exc:
            raise BadRequest(f"body is not JSON: {exc}") from None
        except RecursionError:
            raise BadRequest("body is not JSON a server accepts: nested too deeply") from None
    elif mimetype == BINARY_MIMETYPE:
        data = binary_to_dict(read_body(max_bytes))
    else:
        raise UnsupportedMediaType(f"send application/json or {BINARY_MIMETYPE}, not {mimetype or 'nothing'!r}")
    if not isinstance(data, dict):
        raise BadRequest("body must be an object")
    return data


def wait_seconds() -> float | None:
    """The ``wait_s`` query parameter: how long a management call waits for every worker."""
    raw = request.args.get("wait_s")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest("wait_s is not a number") from None
    if not 0 <= value <= 300:
        raise BadRequest("wait_s must be between 0 and 300")
    return value


def binary_response(body: bytes, headers: dict[str, str]) -> Response:
    return Response(body, status=200, mimetype=BINARY_MIMETYPE, headers=headers)


def server_timing(**stages_s: float) -> str:
    """A Server-Timing header value, durations in milliseconds."""
    return ", ".join(f"{name};dur={seconds * 1e3:.3f}" for name, seconds in stages_s.items())


def answer_headers(answer, *, read_s: float, decode_s: float, encode_s: float) -> dict[str, str]:
    """The headers every inference answer carries (``/infer`` and OIP alike): the model
    version, Server-Timing (read, decode (encoded images included), queue, compute, encode;
    ms), the batch size and the cache outcome when there is one. ``answer`` is a
    ``runtime.Answer``."""
    headers = {
        "X-Model-Version": answer.version,
        "Server-Timing": server_timing(
            read=read_s, decode=decode_s + answer.images_s, queue=answer.queue_s, compute=answer.compute_s,
            encode=encode_s,
        ),
    }
    if answer.batch_size:
        headers["X-Batch-Size"] = str(answer.batch_size)
    if answer.cache:
        headers["X-Cache"] = answer.cache
    return headers


def error_response(status: int, error: str, detail: str = "", headers=None, fields=None) -> Response:
    """The JSON error answer ``{"error", "detail"}`` (plus ``fields``, an error's own keys)."""
    response = jsonify({**(fields or {}), "error": error, "detail": detail})
    response.status_code = status
    if headers:
        response.headers.update(headers)
    if status == 503 and "Retry-After" not in response.headers:  # every 503 says when to come back
        response.headers["Retry-After"] = "1"
    return response


def register_error_handlers(app: Flask) -> None:
    """Known errors become their status with JSON; anything else a logged, generic 500.

    Pair it with :class:`PolicyFlask`, which leaves the logging of unhandled errors to it.
    """

    @app.errorhandler(ServingError)
    def _serving_error(exc: ServingError):
        return error_response(exc.status, exc.error, exc.detail, exc.headers, exc.fields)

    @app.errorhandler(ProtocolError)
    def _protocol_error(exc: ProtocolError):
        return error_response(400, "bad request", f"body rejected: {str(exc)[:500]}")

    @app.errorhandler(WebsocketMismatch)  # a plain request to a WebSocket-only route (openpi's wire)
    def _websocket_only(exc: WebsocketMismatch):
        return error_response(
            426, "upgrade required",
            f"{request.path} speaks openpi's WebSocket protocol on GET: connect a WebSocket client "
            "(openpi_client.WebsocketClientPolicy, or PolicyClient('ws://...')), or POST observations to /infer",
            {"Upgrade": "websocket"},
        )

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        headers = dict(exc.get_headers())
        headers.pop("Content-Type", None)
        return error_response(exc.code or 500, (exc.name or "error").lower(), exc.description or "", headers)

    @app.errorhandler(InternalServerError)  # Flask wraps every unhandled exception in one
    def _unexpected(exc: InternalServerError):
        if exc.original_exception is not None:
            log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc.original_exception)
        return error_response(500, "internal server error", "see the server log")
