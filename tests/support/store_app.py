"""An in-process app over a model store seeded with a tiny model (tests/support/tiny_model.py).

The fixtures ``tiny_models``, ``store_app`` and ``store_client`` (tests/conftest.py) build on
these helpers; model admin, safe update and store follower tests share them.
"""

from __future__ import annotations

from binary_protocol import binary_to_dict, dict_to_binary
from policy_server.config import ServerConfig
from server import create_app
from tests.support.apps import runtime_of
from tests.support.fakes import fake_observation

BINARY = {"Content-Type": "application/octet-stream"}


def make_store_app(tmp_path, model_root, **config):
    """A started app serving ``model_root/tiny`` through a store in ``tmp_path/store``."""
    settings = dict(
        model_path=str(model_root / "tiny"), model_store=str(tmp_path / "store"), model_root=str(model_root),
        store_poll_ms=10,
    )
    settings.update(config)
    app = create_app(ServerConfig(**settings))
    runtime = runtime_of(app)
    runtime.start(block=True)
    assert runtime.ready, runtime.failure
    return app


def infer(client, route="/infer", headers=None, obs=None):
    """One inference through ``client``: (version header, first action value, response)."""
    response = client.post(
        route, data=dict_to_binary(obs or fake_observation(0)), headers={**BINARY, **(headers or {})}
    )
    assert response.status_code == 200, response.get_json()
    action = binary_to_dict(response.get_data())["action"]
    return response.headers["X-Model-Version"], float(action.flat[0]), response


def push(client, weights, wait_s=5, **extra):
    """POST /update_model with ``weights`` (and ``extra`` fields), waiting up to ``wait_s``."""
    body = dict_to_binary({"weights": weights, **extra})
    return client.post(f"/update_model?wait_s={wait_s}", data=body, headers=BINARY)
