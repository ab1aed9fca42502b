from __future__ import annotations

import pytest

from policy_server.config import ServerConfig
from server import create_app
from tests.fakes import FakePolicy


def make_app(policy=None, **config):
    """An app around ``policy`` (default FakePolicy) with its runtime loaded and warmed up."""
    app = create_app(ServerConfig(**config), policy=policy if policy is not None else FakePolicy())
    app.extensions["policy_runtime"].start(block=True)
    return app


@pytest.fixture
def app():
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()
