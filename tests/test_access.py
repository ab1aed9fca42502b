"""Route access is declared with the route: every rule is in an audience group, the group's
access is what the OpenAPI document declares and what the server enforces, and the group
decides how observability treats its requests."""

from __future__ import annotations

import json
import logging
import re

import pytest
from flask import Blueprint, Flask

from policy_server.app.access import ADMIN, INFO, WEBSOCKET, Access, RouteGroup, audience_of, require_declared_access
from policy_server.app.openapi import openapi_document
from policy_server.app.web import PolicyFlask, register_error_handlers
from policy_server.config import ServerConfig
from policy_server.errors import ConfigError
from server import create_app
from tests.support.apps import make_app, runtime_of
from tests.support.fakes import FakePolicy

API_KEY, ADMIN_KEY = "access-api-key-0123", "access-admin-key-0123"

# What each access class means in the OpenAPI document: [{}] is "no key needed" (the keys are optional settings).
SECURITY = {
    Access.OPEN: [{}],
    Access.API: [{}, {"ApiKey": []}],
    Access.ADMIN: [{}, {"AdminKey": []}, {"ApiKey": []}],
}
# The behaviour pinned by URL, independent of any function or blueprint name.
EXPECTED = {
    Access.OPEN: {"/health", "/healthz", "/ready", "/metrics", "/openapi.json", "/v2/health/live", "/v2/health/ready"},
    Access.ADMIN: {"/update_model", "/models/<name>/load", "/models/<name>/unload"},
}
INFERENCE_RULES = {
    "/infer", "/models/<name>/infer", "/v2/models/<name>/infer", "/v2/models/<name>/versions/<version>/infer",
}
QUIET_RULES = {"/health", "/healthz", "/ready", "/metrics", "/v2/health/live", "/v2/health/ready"}


def operations(app: Flask):
    """(method, rule, OpenAPI path, audience) for every operation of ``app``."""
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            yield method, rule, path, audience_of(app, rule.endpoint)


def concrete(rule: str) -> str:
    return rule.replace("<name>", "default").replace("<version>", "fake-1")


def upgrade(rule) -> dict[str, str]:
    """The headers that make a request a WebSocket upgrade, for a rule that takes only those."""
    if not rule.websocket:
        return {}
    return {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


def test_every_rule_has_the_access_its_openapi_operation_declares():
    app = make_app()
    paths = openapi_document()["paths"]
    seen = 0
    for method, rule, path, audience in operations(app):
        assert audience is not None, rule.rule
        assert paths[path][method.lower()]["security"] == SECURITY[audience.access], (method, rule.rule)
        seen += 1
    assert seen == sum(len(item) for item in paths.values()) == 27


def test_access_by_url_is_pinned():
    app = make_app()
    for _, rule, _, audience in operations(app):
        expected = next((access for access, rules in EXPECTED.items() if rule.rule in rules), Access.API)
        assert audience.access is expected, rule.rule
        assert audience.inference == (rule.rule in INFERENCE_RULES and not rule.websocket), rule.rule
        assert audience.quiet == (rule.rule in QUIET_RULES), rule.rule


def test_every_route_enforces_its_declared_access():
    client = make_app(api_key=API_KEY, admin_key=ADMIN_KEY).test_client()
    app = client.application
    for method, rule, _, audience in operations(app):
        url = concrete(rule.rule)

        def status(headers, url=url, method=method, rule=rule):
            return client.open(url, method=method, headers={**headers, **upgrade(rule)}).status_code

        nothing, api, wrong_admin = status({}), status({"X-API-Key": API_KEY}), status({"X-Admin-Key": "x" * 20})
        if audience.access is Access.OPEN:
            assert 401 not in (nothing, api, wrong_admin), (method, url)
        elif audience.access is Access.API:
            assert (nothing, wrong_admin) == (401, 401) and api != 401, (method, url)
        else:  # admin: the API key is not enough; the admin key is tested in test_model_admin (it changes state)
            assert (nothing, api, wrong_admin) == (401, 401, 401), (method, url)


def test_unrouted_requests_need_the_api_key():
    client = make_app(api_key=API_KEY).test_client()
    assert client.get("/nope").status_code == 401
    assert client.get("/nope", headers={"X-API-Key": API_KEY}).status_code == 404
    assert client.get("/infer").status_code == 401  # a wrong method matches no rule either
    assert client.get("/infer", headers={"X-API-Key": API_KEY}).status_code == 405
    assert client.get("/static/x", headers={"X-API-Key": API_KEY}).status_code == 404  # no static files


def test_a_route_outside_any_group_fails_app_creation():
    app = Flask(__name__, static_folder=None)
    grouped = RouteGroup(INFO, None, None)
    grouped.get("/fine")(lambda: "fine")
    app.register_blueprint(grouped)
    require_declared_access(app)

    app.get("/bare")(lambda: "bare")
    named_like_admin = Blueprint("admin", __name__)  # a name confers no access
    named_like_admin.post("/models/<name>/load")(lambda name: name)
    app.register_blueprint(named_like_admin)
    with pytest.raises(RuntimeError, match=r"/bare, /models/<name>/load$"):
        require_declared_access(app)


def test_access_belongs_to_the_group_not_the_function_name():
    app = PolicyFlask(__name__, static_folder=None)
    register_error_handlers(app)
    group = RouteGroup(ADMIN, "api-key-0123456", "admin-key-0123456")

    @group.post("/anything")
    def renamed_from_load_model():
        return "done"

    app.register_blueprint(group)
    client = app.test_client()
    assert client.post("/anything", headers={"X-API-Key": "api-key-0123456"}).status_code == 401
    assert client.post("/anything", headers={"X-Admin-Key": "admin-key-0123456"}).status_code == 200


def test_the_group_decides_stats_and_log_level(caplog):
    app = make_app()
    client = app.test_client()
    caplog.set_level(logging.DEBUG, logger="policy_server.access")

    def counted() -> int:
        return client.get("/stats").get_json()["total_requests"]

    for method, rule, _, _ in operations(app):
        before = counted()
        caplog.clear()
        client.open(concrete(rule.rule), method=method, headers={"X-Request-Id": "probe", **upgrade(rule)}, data=b"",
                    content_type="application/octet-stream")
        records = [r for r in caplog.records if r.name == "policy_server.access"]
        assert [json.loads(r.getMessage())["route"] for r in records] == [rule.rule]
        expected_level = logging.DEBUG if rule.rule in QUIET_RULES else logging.INFO
        assert records[0].levelno == expected_level, rule.rule
        assert counted() - before == (1 if rule.rule in INFERENCE_RULES and not rule.websocket else 0), rule.rule


def test_the_instance_totals_count_the_inference_groups_routes():
    """Under gunicorn, /stats totals and final_metrics.json count policy_requests_total by
    route rule from a set the master keeps (it builds no app): the inference group's rules."""
    from policy_server.telemetry.stats import INFERENCE_ROUTES

    app = make_app()
    http = {rule.rule for _, rule, _, audience in operations(app) if audience.inference}
    websocket = {"ws:" + rule.rule for _, rule, _, audience in operations(app) if audience is WEBSOCKET}
    assert http == INFERENCE_RULES and websocket == {"ws:/", "ws:/infer", "ws:/models/<name>/infer"}
    assert INFERENCE_ROUTES == http | websocket  # openpi messages count under ws: + the upgrade's rule


@pytest.mark.parametrize("change", [{"api_key": "short"}, {"port": 0}, {"host": "0.0.0.0"}, {"autocast": "fp8"}])
def test_create_app_refuses_an_invalid_config_as_the_cli_does(change):
    with pytest.raises(ConfigError):
        create_app(ServerConfig(**change), policy=FakePolicy())


def test_an_unhandled_error_is_a_generic_json_500_logged_once_with_its_traceback(caplog, monkeypatch):
    app = make_app()
    runtime = runtime_of(app)

    def broken():
        raise RuntimeError("secret detail of a bug")

    monkeypatch.setattr(runtime.stats_board, "read", broken)
    with caplog.at_level(logging.ERROR):
        response = app.test_client().get("/stats")
    assert response.status_code == 500
    assert response.get_json() == {"error": "internal server error", "detail": "see the server log"}
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [(r.name, r.getMessage()) for r in errors] == [("policy_server.app.web", "unhandled error on GET /stats")]
    assert "secret detail of a bug" in caplog.text and "Traceback" in caplog.text


def test_the_front_doors_body_limit_of_every_route_is_its_groups_declaration():
    """The door bounds a body before the app runs; the limit comes from the route's group, so a
    renamed or added management route keeps the large limit and nothing else gets it."""
    from policy_server.front_door.http import AppRoutes

    settings = ServerConfig(max_body_bytes=1000, max_update_bytes=5000)
    app = make_app()
    routes = AppRoutes(app, settings)
    for method, rule, _, audience in operations(app):
        assert routes.limit_for(method, rule.rule) == getattr(settings, audience.body_limit), (method, rule.rule)
    assert routes.limit_for("POST", "/update_model") == routes.limit_for("POST", "/models/<name>/load") == 5000
    assert routes.limit_for("POST", "/infer") == routes.limit_for("POST", "unmatched") == 1000
