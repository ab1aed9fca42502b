"""In-process apps: ``make_app`` builds one around a policy, ``runtime_of`` reaches its worker
runtime (the one place the tests name the app extension it lives in), ``assert_error`` checks
an error answer."""

from __future__ import annotations

from policy_server.config import ServerConfig
from policy_server.serving.runtime import PolicyRuntime
from server import create_app
from tests.support.fakes import FakePolicy


def runtime_of(app) -> PolicyRuntime:
    """The ``PolicyRuntime`` behind an app built by ``create_app``."""
    return app.extensions["policy_runtime"]


def make_app(policy=None, **config):
    """An app around ``policy`` (default FakePolicy) with its runtime loaded and warmed up."""
    app = create_app(ServerConfig(**config), policy=policy if policy is not None else FakePolicy())
    runtime_of(app).start(block=True)
    return app


def assert_error(response, status: int, *fragments: str) -> dict:
    """``response`` (a test client's) is ``status`` with the JSON error shape, its error and
    detail holding every fragment; returns the payload."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    payload = response.get_json()
    assert set(payload) == {"error", "detail"}
    text = payload["error"] + " " + payload["detail"]
    for fragment in fragments:
        assert fragment in text, text
    return payload
