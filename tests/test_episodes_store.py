"""Episodes in the store and on the wire, without a server: the pointer's canary and retained
version through every update (publish, canary, promote, end, rollback), pruning that keeps
what workers serve, the pinned-use marks, the headers' grammar and the canary's hash."""

from __future__ import annotations

import json
import os

import pytest

from policy_server.errors import BadRequest, Conflict, UnknownVersion
from policy_server.inputs.episodes import canary_share, parse_episode_id, parse_version
from policy_server.store.model_store import ModelStore
from policy_server.store.pointer import Pointer, check_fraction
from tests.support.tiny_model import write_tiny_model


@pytest.fixture
def source(tmp_path):
    return write_tiny_model(tmp_path / "src", tag=1.0)


@pytest.fixture
def store(tmp_path, source):
    store = ModelStore(str(tmp_path / "store"), keep=1)
    publish(store, source)  # version 1, stable
    return store


def publish(store: ModelStore, source, canary: float | None = None):
    return store.publish("m", store.stage("m", str(source)), canary=canary)


def test_a_publish_retains_the_superseded_version_and_a_rollback_retains_the_one_it_leaves(store, source):
    two = publish(store, source)
    assert (two.version, two.previous, two.retained.version, two.canary) == (2, 1, 1, None)
    assert two.retained.since == two.changed_at and two.served_versions() == (2, 1)
    back = store.set_current("m", 1)
    assert (back.version, back.previous, back.retained.version) == (1, 2, 2)
    three = publish(store, source)
    assert (three.version, three.retained.version) == (3, 1)  # at most one retained: 2 is no longer
    assert store.versions("m") == [1, 3]  # keep=1 keeps the stable, previous and retained versions


def test_a_canary_publish_keeps_the_stable_version_and_a_replaced_candidate_is_retained(store, source):
    canary = publish(store, source, canary=0.25)
    assert (canary.version, canary.previous, canary.retained) == (1, None, None)
    assert (canary.canary.version, canary.canary.fraction) == (2, 0.25)
    assert canary.canary.digest and canary.canary.since == canary.changed_at
    replaced = publish(store, source, canary=0.5)
    assert (replaced.version, replaced.canary.version, replaced.retained.version) == (1, 3, 2)
    assert store.versions("m") == [1, 2, 3]  # stable, candidate and retained are never pruned
    retuned = store.set_canary("m", 0.1)
    assert (retuned.canary.version, retuned.canary.fraction) == (3, 0.1)
    assert retuned.canary.since == replaced.canary.since  # the candidate's time, not the fraction's
    assert retuned.generation == replaced.generation + 1


def test_promote_ends_the_canary_and_retains_the_old_stable_version(store, source):
    started = publish(store, source, canary=0.3)
    with pytest.raises(Conflict, match="runs a canary of version 2"):
        store.set_current("m", 1)  # neither a promotion nor allowed while it runs
    with pytest.raises(Conflict, match="runs a canary of version 2"):
        publish(store, source)  # a plain update while it runs: nothing published
    assert store.versions("m") == [1, 2] and os.listdir(os.path.join(store.root, "m", ".staging")) == []
    promoted = store.set_current("m", 2)
    assert (promoted.version, promoted.previous, promoted.canary, promoted.retained.version) == (2, 1, None, 1)
    assert promoted.digest == started.canary.digest and store.pointer("m") == promoted


def test_ending_a_canary_retains_its_candidate_and_ending_none_changes_nothing(store, source):
    started = publish(store, source, canary=0.3)
    ended = store.set_canary("m", 0.0)
    assert (ended.version, ended.canary, ended.retained.version) == (1, None, 2)
    assert store.set_canary("m", 0.0) == ended  # idempotent: no generation bump
    with pytest.raises(Conflict, match="runs no canary"):
        store.set_canary("m", 0.2)
    again = store.set_canary("m", 0.4, version=2)  # a kept version as the candidate: the retained one
    assert (again.canary.version, again.retained) == (2, None)
    assert again.generation == started.generation + 2


def test_a_canary_of_the_stable_an_unknown_or_an_unloaded_version_is_refused(store, source):
    with pytest.raises(Conflict, match="stable version"):
        store.set_canary("m", 0.5, version=1)
    with pytest.raises(UnknownVersion, match="no version 9"):
        store.set_canary("m", 0.5, version=9)
    publish(store, source)
    store.set_loaded("m", False)
    with pytest.raises(Conflict, match="unloaded"):
        store.set_canary("m", 0.5, version=1)
    with pytest.raises(BadRequest, match="no stable version"):
        store.publish("fresh", store.stage("fresh", str(source)), canary=0.5)


def test_seeding_a_changed_model_path_waits_while_a_canary_runs(store, source):
    seeded = store.seed("m", str(source))  # a seed differs from what was published: a new version
    publish(store, source, canary=0.2)
    write_tiny_model(source, tag=3.0)
    assert store.seed("m", str(source)).version == seeded.version  # not published under a canary
    store.set_canary("m", 0.0)
    assert store.seed("m", str(source)).version == 4


def test_pointers_from_before_episodes_load_and_unknown_keys_are_ignored(store):
    raw = json.loads(store.read_pointer_bytes("m"))
    for key in ("canary", "retained"):
        raw.pop(key)
    old = Pointer.from_json({**raw, "written_by_a_later_server": 1})
    assert (old.canary, old.retained, old.served_versions()) == (None, None, (1,))
    assert Pointer.from_json(json.loads(json.dumps(old.to_json()))) == old


def test_pinned_use_marks_round_trip_per_version(store):
    assert store.pinned_use("m", 1) is None
    store.mark_pinned_use("m", 1, 1234.5)
    assert store.pinned_use("m", 1) == 1234.5 and store.pinned_use("m", 2) is None
    leftover = os.path.join(store.root, "m", ".PINNED-dead")
    open(leftover, "w").close()
    assert leftover in store.recover()


@pytest.mark.parametrize("raw", [0.0, 0.5, 0.999, 0])
def test_canary_fractions_in_range_are_taken(raw):
    assert check_fraction(raw) == float(raw)


@pytest.mark.parametrize("raw", [1, 1.0, -0.1, True, "0.5", None, float("nan")])
def test_canary_fractions_out_of_range_are_refused_naming_canary(raw):
    with pytest.raises(BadRequest, match="canary must be a number in"):
        check_fraction(raw)


def test_version_pins_are_version_numbers_and_episode_ids_a_token():
    assert (parse_version(None), parse_version("7"), parse_version(" 007 ")) == (None, "7", "7")
    for bad in ("", "v7", "7.0", "-1", "1" * 19, "fake-1"):
        with pytest.raises(BadRequest, match="X-Model-Version must be a model version number"):
            parse_version(bad)
    assert parse_episode_id("robot-7:ep_0001.a") == "robot-7:ep_0001.a" and parse_episode_id(None) is None
    for bad in ("", "a b", "x" * 129, "é", "a/b", 7):
        with pytest.raises(BadRequest, match="X-Episode-Id must be 1-128 characters"):
            parse_episode_id(bad)


def test_the_canary_share_is_stable_uniform_monotone_and_independent_per_model_and_candidate():
    ids = [f"episode-{i}" for i in range(20_000)]
    shares = [canary_share("default", "2", i) for i in ids]
    assert shares == [canary_share("default", "2", i) for i in ids]  # the same answer every time
    assert all(0.0 <= s < 1.0 for s in shares)
    for fraction in (0.01, 0.1, 0.5, 0.9):
        assert abs(sum(s < fraction for s in shares) / len(ids) - fraction) < 0.01
    other_model = [canary_share("other", "2", i) < 0.5 for i in ids]
    other_candidate = [canary_share("default", "3", i) < 0.5 for i in ids]
    for other in (other_model, other_candidate):  # about half agree: independent assignments
        agree = sum(a == (s < 0.5) for a, s in zip(other, shares, strict=True)) / len(ids)
        assert 0.47 < agree < 0.53
