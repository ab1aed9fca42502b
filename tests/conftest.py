from __future__ import annotations

import pytest

from policy_server.serving.batcher import Batcher
from tests.support.apps import make_app, runtime_of
from tests.support.gated_executor import GatedExecutor
from tests.support.store_app import make_store_app
from tests.support.tiny_model import write_tiny_model


@pytest.fixture
def app():
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def tiny_models(tmp_path):
    """A model root holding one tiny model, ``tiny``, whose every action is 1.0."""
    root = tmp_path / "models"
    write_tiny_model(root / "tiny", tag=1.0)
    return root


@pytest.fixture
def store_app(tmp_path, tiny_models):
    app = make_store_app(tmp_path, tiny_models)
    yield app
    runtime_of(app).stop(5)


@pytest.fixture
def store_client(store_app):
    return store_app.test_client()


@pytest.fixture
def make_batcher():
    """make(executor=None, **batcher_kwargs) -> (started Batcher, executor); all stopped after the test."""
    made = []

    def make(executor=None, **kwargs):
        executor = executor or GatedExecutor()
        batcher = Batcher(executor, **kwargs)
        batcher.start()
        made.append((batcher, executor))
        return batcher, executor

    yield make
    for batcher, executor in made:
        executor.release()
        batcher.stop(5)
