"""HTTP plumbing shared by the routes: API-key checks, body reading, responses, error handlers."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from binary_protocol import ProtocolError
from policy_server.errors import (
    BadRequest,
    LengthRequired,
    PayloadTooLarge,
    ServingError,
    Unauthorized,
)

log = logging.getLogger(__name__)

BINARY_MIMETYPE = "application/octet-stream"


def check_api_key(expected: str | None, open_endpoints: Iterable[str]) -> None:
    """Raise Unauthorized unless ``X-API-Key`` matches (constant-time), or the route is open."""
    if expected is None or request.endpoint in open_endpoints:
        return
    provided = request.headers.get("X-API-Key", "")
    if not hmac.compare_digest(provided.encode(), expected.encode()):
        raise Unauthorized("missing or wrong X-API-Key")


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


def binary_response(body: bytes, headers: dict[str, str]) -> Response:
    return Response(body, status=200, mimetype=BINARY_MIMETYPE, headers=headers)


def server_timing(**stages_s: float) -> str:
    """A Server-Timing header value, durations in milliseconds."""
    return ", ".join(f"{name};dur={seconds * 1e3:.3f}" for name, seconds in stages_s.items())


def error_response(status: int, error: str, detail: str = "", headers=None) -> Response:
    response = jsonify({"error": error, "detail": detail})
    response.status_code = status
    if headers:
        response.headers.update(headers)
    return response


def register_error_handlers(app: Flask) -> None:
    """Known errors become their status with JSON; anything else a logged, generic 500."""

    @app.errorhandler(ServingError)
    def _serving_error(exc: ServingError):
        return error_response(exc.status, exc.error, exc.detail, exc.headers)

    @app.errorhandler(ProtocolError)
    def _protocol_error(exc: ProtocolError):
        return error_response(400, "bad request", f"body rejected: {str(exc)[:500]}")

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        headers = dict(exc.get_headers())
        headers.pop("Content-Type", None)
        return error_response(exc.code or 500, (exc.name or "error").lower(), exc.description or "", headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal server error", "see the server log")
