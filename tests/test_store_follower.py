"""The store follower's handoff with the admin side: validate a candidate, publish, adopt.

The watcher is slowed to one poll a minute here, so what a test sees is the handoff's doing,
not the watcher's (the watcher's own following is covered by test_model_admin.py and
test_safe_updates.py).
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from tests.test_model_admin import infer, make_store_app, push, root  # noqa: F401 (fixture)
from tests.tiny_model import tiny_weights, write_tiny_model


@pytest.fixture
def app(tmp_path, root):  # noqa: F811 (the imported fixture)
    app = make_store_app(tmp_path, root, store_poll_ms=60_000)
    yield app
    app.extensions["policy_runtime"].stop(5)


def test_the_receiving_worker_serves_a_validated_update_without_loading_it_again(app, monkeypatch):
    runtime = app.extensions["policy_runtime"]
    loads = []
    load = runtime.load

    def counting_load(model_dir, name, version):
        loads.append(version)
        return load(model_dir, name, version)

    monkeypatch.setattr(runtime, "load", counting_load)
    client = app.test_client()
    answer = push(client, tiny_weights(4.0), wait_s=0).get_json()
    assert answer["version"] == 2
    assert infer(client)[:2] == ("2", 4.0)  # at once: no watcher poll in between
    assert loads == ["candidate"]  # validated once, then adopted as version 2
    status = runtime.board.read()[os.getpid()]
    assert status["models"]["default"]["version"] == "2" and status["generations"]["default"] == answer["generation"]


def test_adopt_never_serves_a_candidate_over_a_newer_pointer(app, root):  # noqa: F811 (the imported fixture)
    runtime = app.extensions["policy_runtime"]
    follower, store, client = runtime.follower, runtime.store, app.test_client()
    write_tiny_model(root / "next", tag=5.0)
    staged = store.stage("default", str(root / "next"))
    candidate = follower.validate("default", staged)
    assert candidate.name == "default" and candidate.served.model.version == "candidate"
    pointer = store.publish("default", staged)
    assert pointer.digest == candidate.digest

    follower.generations["default"] = pointer.generation + 1  # this worker followed a later pointer
    assert follower.adopt(candidate, pointer) is False
    assert infer(client)[:2] == ("1", 1.0)

    follower.generations["default"] = pointer.generation - 1
    assert follower.adopt(candidate, dataclasses.replace(pointer, digest="0" * 12)) is False  # other files
    assert follower.adopt(candidate, dataclasses.replace(pointer, model="other")) is False
    assert infer(client)[:2] == ("1", 1.0)

    assert follower.adopt(candidate, pointer) is True
    assert infer(client)[:2] == ("2", 5.0)
    assert follower.adopt(candidate, pointer) is False  # acted on already
    assert candidate.served.model.version == "candidate"  # adopting copies; the candidate is unchanged
