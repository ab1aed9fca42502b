"""openpi's WebSocket policy protocol on the server's own port: the upgrade routes and ``/healthz``.

``ws://host:port`` (openpi's ``WebsocketClientPolicy(host, port)`` dials the root), ``/infer``
and ``/models/<name>/infer`` upgrade to openpi's protocol over the named (or default) model;
plain HTTP on those paths is unchanged (``POST /infer`` serves), and a plain ``GET`` there is
426 saying how to connect.
The upgrade needs the API key like inference does (``X-API-Key``, or ``Authorization:
Api-Key <key>``, which openpi's client sends), checked before the 101: a client without it
never gets a frame. The 101 hands the front door an
:class:`policy_server.openpi.session.OpenpiSession`; the front door
(:mod:`policy_server.front_door.websocket`) keeps the connection from then on. ``GET /healthz`` is
openpi's liveness probe path, answered like ``/health``.
"""

from __future__ import annotations

import base64
import binascii
import functools

from flask import Blueprint, Response, jsonify, request
from wsproto.utilities import generate_accept_token

from policy_server.app import observability
from policy_server.app.access import PROBES, WEBSOCKET, RouteGroup
from policy_server.config import ServerConfig
from policy_server.contract import check_model_name
from policy_server.errors import BadRequest, BatcherLost, UpgradeRequired
from policy_server.openpi.session import OpenpiSession
from policy_server.wsgi_keys import UPGRADE


def openpi_blueprint(config: ServerConfig, runtime) -> Blueprint:
    """The upgrade routes and ``/healthz`` over ``runtime`` (a :class:`policy_server.serving.runtime.PolicyRuntime`)."""
    bp = Blueprint("openpi", __name__)
    keys = (config.api_key, config.admin_key)
    websocket = RouteGroup(WEBSOCKET, *keys)
    probes = RouteGroup(PROBES, *keys)
    observe = functools.partial(observability.count_message, stats=runtime.stats)

    def upgrade(name: str | None):
        key = websocket_key()
        if name is not None:
            check_model_name(name)
            runtime.served(name)  # UnknownModel (404) before the upgrade; the default may still be loading
        if UPGRADE not in request.environ:
            raise UpgradeRequired("WebSocket connections need the server's front door worker (gunicorn.conf.py)")
        route = "ws:" + request.url_rule.rule
        request.environ[UPGRADE] = OpenpiSession(runtime, config, name, route, request.remote_addr or "", observe)
        response = Response(status=101)
        del response.headers["Content-Type"]
        response.headers.update({"Upgrade": "websocket", "Connection": "Upgrade",
                                 "Sec-WebSocket-Accept": generate_accept_token(key).decode("ascii")})
        return response

    # websocket=True: werkzeug routes only WebSocket upgrades here; plain HTTP on these paths is
    # answered as before (POST /infer serves), a plain GET 426 (web.register_error_handlers).
    @websocket.get("/", websocket=True)
    def upgrade_root():
        return upgrade(None)

    @websocket.get("/infer", websocket=True)
    def upgrade_default():
        return upgrade(None)

    @websocket.get("/models/<name>/infer", websocket=True)
    def upgrade_named(name: str):
        return upgrade(name)

    @probes.get("/healthz")
    def healthz():
        if runtime.batcher_lost:
            raise BatcherLost("the worker's batcher thread ended; see the server log")
        return jsonify({"status": "ok"})

    for group in (websocket, probes):
        bp.register_blueprint(group)
    return bp


def websocket_key() -> bytes:
    """The upgrade's ``Sec-WebSocket-Key`` after checking the handshake (RFC 6455 section
    4.2.1; werkzeug routed it here for its ``Upgrade: websocket`` and ``Connection: Upgrade``):
    UpgradeRequired (426) for another WebSocket version, BadRequest (400) for a malformed key."""
    headers = request.headers
    if headers.get("Sec-WebSocket-Version", "").strip() != "13":
        raise UpgradeRequired("WebSocket version 13 only", headers={"Sec-WebSocket-Version": "13"})
    raw = headers.get("Sec-WebSocket-Key", "").strip()
    try:
        if len(base64.b64decode(raw, validate=True)) != 16:
            raise ValueError
    except (ValueError, binascii.Error):
        raise BadRequest("Sec-WebSocket-Key must be 16 bytes in base64") from None
    return raw.encode()

