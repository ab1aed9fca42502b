"""In-process apps: ``make_app`` builds one around a policy, ``runtime_of`` reaches its worker
runtime (the one place the tests name the app extension it lives in)."""

from __future__ import annotations

from policy_server.config import ServerConfig
from policy_server.runtime import PolicyRuntime
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
