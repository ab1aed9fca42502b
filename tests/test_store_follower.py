"""The store follower's handoff with the admin side: validate a candidate, publish, adopt.

The watcher is slowed to one poll a minute here, so what a test sees is the handoff's doing,
not the watcher's (the watcher's own following is covered by test_model_admin.py and
test_safe_updates.py).
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from tests.support.apps import runtime_of
from tests.support.store_app import infer, make_store_app, push
from tests.support.tiny_model import tiny_weights, write_tiny_model


@pytest.fixture
def app(tmp_path, tiny_models):  # this module's own: a store the worker does not poll
    app = make_store_app(tmp_path, tiny_models, store_poll_ms=60_000)
    yield app
    runtime_of(app).stop(5)


def test_the_receiving_worker_serves_a_validated_update_without_loading_it_again(app, monkeypatch):
    runtime = runtime_of(app)
    loads = []
    load = runtime.warm_version

    def counting_load(model_dir, name, version):
        loads.append(version)
        return load(model_dir, name, version)

    monkeypatch.setattr(runtime, "warm_version", counting_load)
    client = app.test_client()
    answer = push(client, tiny_weights(4.0), wait_s=0).get_json()
    assert answer["version"] == 2
    assert infer(client)[:2] == ("2", 4.0)  # at once: no watcher poll in between
    assert loads == ["candidate"]  # validated once, then adopted as version 2
    status = runtime.board.read()[os.getpid()]
    assert status["models"]["default"]["version"] == "2" and status["generations"]["default"] == answer["generation"]


def test_adopt_never_serves_a_candidate_over_a_newer_pointer(app, tiny_models):  # noqa: F811 (the imported fixture)
    runtime = runtime_of(app)
    follower, store, client = runtime.follower, runtime.store, app.test_client()
    write_tiny_model(tiny_models / "next", tag=5.0)
    staged = store.stage("default", str(tiny_models / "next"))
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


def test_the_watcher_never_swaps_back_to_a_pointer_an_adopted_update_superseded(app, tiny_models, monkeypatch):
    """The watcher reads a pointer, then an update is published and adopted here before the
    watcher takes the lock: it must not load the version it read (older than the one served)."""
    runtime = runtime_of(app)
    follower, store, client = runtime.follower, runtime.store, app.test_client()
    write_tiny_model(tiny_models / "two", tag=2.0)
    write_tiny_model(tiny_models / "three", tag=3.0)
    unseen = store.publish("default", store.stage("default", str(tiny_models / "two")))  # not followed yet
    assert unseen.version == 2 and follower.generations.get("default") != unseen.generation
    staged = store.stage("default", str(tiny_models / "three"))
    candidate = follower.validate("default", staged)
    read_pointer = store.pointer
    raced = []

    def pointer_then_update(name):
        pointer = read_pointer(name)
        if not raced:  # the watcher's read; the update lands right after it
            raced.append(pointer)
            assert follower.adopt(candidate, store.publish("default", staged)) is True
        return pointer

    monkeypatch.setattr(store, "pointer", pointer_then_update)
    follower.sync()
    monkeypatch.undo()
    assert raced and raced[0].version == 2
    assert infer(client)[:2] == ("3", 3.0)  # still the adopted update, not the stale read
    assert follower.generations["default"] == store.pointer("default").generation
