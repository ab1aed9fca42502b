"""Who may call a route, declared where the route is: every route belongs to one audience group.

A :class:`RouteGroup` is a Flask blueprint for one :class:`Audience`. Its ``before_request``
hook checks the key that audience needs (constant-time), and observability asks the group of
a request how to treat it (:func:`request_audience`): inference requests go to the worker's
statistics, probes and scrapes log at DEBUG. :func:`require_declared_access` makes building an
app fail when a route belongs to no group, so renaming or moving a view cannot silently change
who may call it. A request that matches no route needs the API key, as every non-open route
does, so a 404 or 405 tells a caller without the key nothing.

The OpenAPI document (:mod:`policy_server.app.openapi`) declares the same access per operation as
its ``security``; ``tests/test_access.py`` checks that the two agree for every route.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from enum import Enum

from flask import Blueprint, Flask, current_app, request

from policy_server.errors import Unauthorized


class Access(Enum):
    """The key a route needs."""

    OPEN = "open"  # none
    API = "api"  # X-API-Key, when the server has an API key
    ADMIN = "admin"  # X-Admin-Key when the server has an admin key, else as API


@dataclass(frozen=True)
class Audience:
    """Who a group of routes is for: the key it needs and how its requests are observed."""

    name: str
    access: Access
    inference: bool = False  # its requests count in the worker's statistics (/stats)
    quiet: bool = False  # probes and scrapes: the access log line only at DEBUG
    body_limit: str = "max_body_bytes"  # the ServerConfig setting bounding its bodies (the front door reads it)


PROBES = Audience("probes", Access.OPEN, quiet=True)  # liveness, readiness, Prometheus scrapes
DOCS = Audience("docs", Access.OPEN)  # the OpenAPI document
INFERENCE = Audience("inference", Access.API, inference=True)
INFO = Audience("info", Access.API)  # statistics, model and server metadata
WEBSOCKET = Audience("websocket", Access.API)  # upgrades to openpi's protocol; its messages count as inference
ADMIN = Audience("admin", Access.ADMIN, body_limit="max_update_bytes")  # model management: weights pushes
REPORTS = Audience("reports", Access.API)  # episode outcomes robots report (not inference: not in /stats)


class RouteGroup(Blueprint):
    """A blueprint whose routes all serve ``audience``; it refuses requests without its key.

    ``api_key``/``admin_key``: the server's keys (None: not set). Raises
    :class:`policy_server.errors.Unauthorized` (401) for a missing or wrong key.
    """

    def __init__(self, audience: Audience, api_key: str | None, admin_key: str | None) -> None:
        super().__init__(audience.name, __name__)
        self.audience = audience
        self.before_request(lambda: require_key(audience.access, api_key, admin_key))


def require_key(access: Access, api_key: str | None, admin_key: str | None) -> None:
    """Raise Unauthorized unless the request carries the key ``access`` needs (constant-time)."""
    if access is Access.OPEN:
        return
    if access is Access.ADMIN and admin_key is not None:
        _compare("X-Admin-Key", request.headers.get("X-Admin-Key", ""), admin_key)
    elif api_key is not None:
        _compare("X-API-Key", api_key_given(), api_key)


def api_key_given() -> str:
    """The API key the request carries: ``X-API-Key``, else ``Authorization: Api-Key <key>``
    (what openpi's client sends); empty when neither."""
    given = request.headers.get("X-API-Key")
    if given is not None:
        return given
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "api-key" else ""


def _compare(header: str, provided: str, expected: str) -> None:
    if not hmac.compare_digest(provided.encode(), expected.encode()):
        raise Unauthorized(f"missing or wrong {header}")


def audience_of(app: Flask, endpoint: str | None) -> Audience | None:
    """The audience of the group that registered ``endpoint``; None outside any group."""
    if not endpoint:
        return None
    return getattr(app.blueprints.get(endpoint.rpartition(".")[0]), "audience", None)


def request_audience() -> Audience | None:
    """The audience of the route this request matched; None when it matched none (404, 405)."""
    return audience_of(current_app, request.endpoint)


def install(app: Flask, api_key: str | None) -> None:
    """Requests that match no route need the API key, as every non-open route does."""

    @app.before_request
    def _unrouted() -> None:
        if request.url_rule is None:
            require_key(Access.API, api_key, None)


def require_declared_access(app: Flask) -> None:
    """Raise RuntimeError naming every route of ``app`` that belongs to no :class:`RouteGroup`."""
    undeclared = sorted(rule.rule for rule in app.url_map.iter_rules() if audience_of(app, rule.endpoint) is None)
    if undeclared:
        raise RuntimeError(f"routes outside any RouteGroup, so with no declared access: {', '.join(undeclared)}")
