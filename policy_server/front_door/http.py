"""HTTP/1.1 pieces of the front door: parsing a complete head, and refusals answered by the poller.

The head is parsed by gunicorn's own parser (``gunicorn.http.message.Request``), so the
request line and header rules are gunicorn's; only its errors are turned into the server's
JSON error body (``{"error", "detail"}``) with a status of their own.
"""

from __future__ import annotations

import errno
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from gunicorn.http import errors as http_errors
from gunicorn.http.body import ChunkedReader, LengthReader
from gunicorn.http.message import Request
from gunicorn.http.unreader import IterUnreader
from werkzeug.exceptions import HTTPException

from policy_server.wsgi_keys import DEADLINE

GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN)  # the client went away


class Refusal(Exception):
    """An answer the poller gives without the app: status, JSON body, metric reason."""

    def __init__(
        self, status: int, error: str, detail: str, reason: str, *, retry: bool = False, route: str = "front_door"
    ) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.reason = status, error, detail, reason
        self.retry = retry  # 503: Retry-After
        self.route = route
        self.req = None  # the parsed request, when the refusal came after its head


@dataclass
class Head:
    req: Any  # gunicorn.http.message.Request, body not yet attached
    length: int  # body bytes still to read
    route: str  # the Flask rule it maps to, or "unmatched"
    probe: bool  # a GET or HEAD of a route in the probes group (AppRoutes)


class AppRoutes:
    """The app's routes as the front door sees them before the app runs, each fact taken from
    the route's own declaration (its audience group, :mod:`policy_server.app.access`): the rule a
    request maps to (its ``route`` label), its body limit (the group's ``body_limit`` setting:
    model management takes weights pushes up to ``max_update_bytes``, everything else
    ``max_body_bytes``), and whether it is a probe (a route of the probes group: liveness,
    readiness, scrapes, ours and OIP's), answered on a lane of its own and never shed. For an
    app that is not ours (no ``url_map``): every route "unmatched", ``max_body_bytes``, and
    /health and /ready the probes."""

    def __init__(self, app, settings) -> None:
        self.settings = settings
        url_map = getattr(app, "url_map", None)
        self._adapter = url_map.bind("localhost") if url_map is not None else None
        self.probes = frozenset({"/health", "/ready"})
        self.limits: dict[tuple[str, str], int] = {}  # (rule, method) -> body limit, when not max_body_bytes
        if url_map is not None:
            from policy_server.app.access import PROBES, audience_of  # flask: in the worker, not the master

            audiences = [(r, audience_of(app, r.endpoint)) for r in url_map.iter_rules()]
            self.probes = frozenset(r.rule for r, audience in audiences if audience is PROBES)
            for rule, audience in audiences:
                limit = getattr(settings, audience.body_limit) if audience is not None else settings.max_body_bytes
                if limit != settings.max_body_bytes:
                    self.limits.update({(rule.rule, method): limit for method in rule.methods})

    def route_of(self, method: str, path: str) -> str:
        """The Flask rule ``path`` maps to, or "unmatched"."""
        if self._adapter is None:
            return "unmatched"
        try:
            rule, _ = self._adapter.match(path, method=method, return_rule=True)
            return rule.rule
        except HTTPException:  # NotFound, MethodNotAllowed, RequestRedirect
            return "unmatched"

    def limit_for(self, method: str, route: str) -> int:
        """The body limit of a request to ``route`` (a rule from :meth:`route_of`) by ``method``."""
        return self.limits.get((route, method), self.settings.max_body_bytes)

    def is_probe(self, method: str, route: str) -> bool:
        return method in ("GET", "HEAD") and route in self.probes


def parse_head(cfg, head: bytes, client, number: int, routes: AppRoutes) -> Head:
    """Parse one complete request head (through its blank line); Refusal when it cannot be served."""
    try:
        req = Request(cfg, IterUnreader([head]), client, number)
    except http_errors.LimitRequestLine as exc:
        raise Refusal(414, "uri too long", str(exc), "request_line") from None
    except http_errors.LimitRequestHeaders as exc:
        raise Refusal(431, "request header fields too large", str(exc), "headers") from None
    except (http_errors.InvalidHeader, http_errors.UnsupportedTransferCoding) as exc:
        status = getattr(exc, "code", 400) or 400
        raise Refusal(status, "bad request", f"bad framing: {exc}", "framing") from None
    except (http_errors.ParseException, http_errors.NoMoreData, ValueError) as exc:
        raise Refusal(400, "bad request", f"malformed request: {str(exc)[:200]}", "malformed") from None
    route = routes.route_of(req.method, req.path or "/")
    reader = getattr(req.body, "reader", None)
    refusal = None
    length = reader.length if isinstance(reader, LengthReader) else 0
    limit = routes.limit_for(req.method, route)
    if isinstance(reader, ChunkedReader):
        refusal = Refusal(
            411, "length required", "send Content-Length; chunked request bodies are not accepted", "framing",
            route=route,
        )
    elif length > limit:
        refusal = Refusal(
            413, "payload too large", f"body of {length} bytes exceeds the limit of {limit}", "too_large", route=route
        )
    if refusal is not None:
        refusal.req = req
        raise refusal
    return Head(req, length, route, routes.is_probe(req.method, route))


def refusal_bytes(refusal: Refusal, close: bool) -> bytes:
    """The whole HTTP/1.1 answer for ``refusal`` (JSON body; Retry-After on a retryable 503)."""
    body = json.dumps({"error": refusal.error, "detail": refusal.detail}).encode()
    try:
        phrase = HTTPStatus(refusal.status).phrase
    except ValueError:
        phrase = "Error"
    lines = [
        f"HTTP/1.1 {refusal.status} {phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        f"Connection: {'close' if close else 'keep-alive'}",
    ]
    if refusal.retry or refusal.status == 503:
        lines.append("Retry-After: 1")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def head_overflow(cfg, buf: bytearray) -> Refusal | None:
    """A refusal when an unfinished head is already past gunicorn's limits (no need to wait
    for the rest of a 1 MB request line), else None."""
    limit_line = cfg.limit_request_line or 8190
    if len(buf) > limit_line + 2 and buf.find(b"\r\n", 0, limit_line + 2) < 0:
        return Refusal(414, "uri too long", f"request line longer than {limit_line} bytes", "request_line")
    most = limit_line + 2 + cfg.limit_request_fields * (cfg.limit_request_field_size + 2) + 4
    if len(buf) > most:
        return Refusal(431, "request header fields too large", f"request head over {most} bytes", "headers")
    return None


def send_quietly(sock, data: bytes) -> None:
    """One non-blocking send of a small answer; a client that is gone is not an error."""
    try:
        sock.send(data)
    except OSError:
        pass


def reset_by_peer(sock) -> bool:
    """True when the client reset the connection (RST) after sending its request. ``sock``
    must be non-blocking (a timeout would make the peek wait). An SSL socket is peeked at
    the TCP level (``socket.socket.recv``): the reset is the kernel's news, not OpenSSL's."""
    try:
        socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError as exc:
        return exc.errno in GONE
    return False


def peer_went(sock) -> bool:
    """True when the client of a WebSocket is gone: it reset the connection, closed its end
    (a WebSocket client never half-closes while it waits for an answer), or what it sent
    since is exactly one close frame (over TLS only the first two are seen: its frames are
    encrypted). ``sock`` must be non-blocking. Only the kernel's buffer is peeked; nothing
    is consumed."""
    try:
        pending = socket.socket.recv(sock, 2 + 4 + 125 + 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError as exc:
        return exc.errno in GONE  # as reset_by_peer
    if not pending:
        return True
    # a client frame: FIN and the close opcode, then the mask bit and a length of at most 125
    return pending[0] == 0x88 and bool(pending[1] & 0x80) and len(pending) == 2 + 4 + (pending[1] & 0x7F)


def past_deadline(environ: dict, head: list) -> bool:
    """True when the app's answer is a 2xx and the request's deadline (``environ[DEADLINE]``,
    set by the app) passed before its status line could be written."""
    deadline = environ.get(DEADLINE)
    return bool(deadline is not None and head and head[0].startswith("2") and time.monotonic() > deadline)


def late_answer(environ: dict, head: list) -> tuple[list, bytes, Iterator[bytes]]:
    """The 504 that replaces a late 2xx: (status and headers, body, no further items)."""
    late_ms = 1e3 * (time.monotonic() - environ[DEADLINE])
    body = json.dumps({
        "error": "deadline exceeded",
        "detail": f"the answer was ready {late_ms:.1f} ms after the request's deadline; the late answer was dropped",
    }).encode()
    keep = [(k, v) for k, v in head[1] if k.lower() in ("x-request-id", "x-model-version")]
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *keep]
    return ["504 Gateway Timeout", headers], body, iter(())
