"""The model store: numbering, the atomic pointer, rollback, seeding, pruning, names."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading

import pytest

from policy_server.errors import ModelError
from policy_server.model_loader import directory_digest
from policy_server.store import InvalidModelName, ModelStore, UnknownModel, UnknownVersion, check_name
from tests.tiny_model import write_tiny_model


@pytest.fixture
def source(tmp_path):
    return write_tiny_model(tmp_path / "src", tag=1.0)


def publish_copy(store: ModelStore, name: str, source) -> int:
    return store.publish(name, store.stage(name, str(source))).version


def test_publish_numbers_versions_and_points_at_the_newest(tmp_path, source):
    store = ModelStore(str(tmp_path / "store"))
    first = store.publish("m", store.stage("m", str(source)))
    assert (first.version, first.previous, first.generation, first.loaded) == (1, None, 1, True)
    assert first.digest == directory_digest(str(source))
    second = store.publish("m", store.stage("m", str(source)))
    assert (second.version, second.previous, second.generation) == (2, 1, 2)
    assert store.pointer("m") == second
    assert store.versions("m") == [1, 2] and store.names() == ["m"]
    assert sorted(os.listdir(store.version_dir("m", 2))) == ["model.safetensors", "policy.py"]
    assert os.listdir(os.path.join(store.root, "m", ".staging")) == []


def test_readers_never_see_a_torn_pointer(tmp_path, source):
    store = ModelStore(str(tmp_path / "store"), keep=100)
    publish_copy(store, "m", source)
    stop, seen, errors = threading.Event(), set(), []

    def read():
        while not stop.is_set():
            try:
                seen.add(json.loads(store.read_pointer_bytes("m"))["version"])
            except Exception as exc:  # a partial file would fail to parse
                errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(30):
        store.set_current("m", 1)
        publish_copy(store, "m", source)
    stop.set()
    reader.join()
    assert errors == [] and len(seen) > 1


def _publish_in_process(root, source, count, queue):
    store = ModelStore(root, keep=1000)
    queue.put([publish_copy(store, "m", source) for _ in range(count)])


def test_concurrent_publishers_in_several_processes_get_distinct_versions(tmp_path, source):
    root = str(tmp_path / "store")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_publish_in_process, args=(root, str(source), 5, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    versions = sorted(v for _ in procs for v in queue.get(timeout=60))
    for p in procs:
        p.join(60)
    assert versions == list(range(1, 16))
    pointer = ModelStore(root).pointer("m")
    assert pointer.version == 15 and pointer.generation == 15


def test_rollback_points_at_a_kept_version_and_refuses_unknown_ones(tmp_path, source):
    store = ModelStore(str(tmp_path / "store"))
    for _ in range(3):
        publish_copy(store, "m", source)
    back = store.set_current("m", 1)
    assert (back.version, back.previous, back.generation) == (1, 3, 4)
    with pytest.raises(UnknownVersion, match="kept versions are \\[1, 2, 3\\]"):
        store.set_current("m", 7)
    with pytest.raises(UnknownModel):
        store.set_current("nope", 1)
    assert store.names() == ["m"] and not os.path.exists(os.path.join(store.root, "nope"))
    assert store.pointer("m") == back
    assert publish_copy(store, "m", source) == 4  # numbering never reuses a number


def test_pruning_keeps_the_last_k_and_the_current_version(tmp_path, source):
    store = ModelStore(str(tmp_path / "store"), keep=2)
    for _ in range(3):
        publish_copy(store, "m", source)
    assert store.versions("m") == [2, 3]
    store.set_current("m", 2)
    publish_copy(store, "m", source)
    publish_copy(store, "m", source)
    assert store.versions("m") == [4, 5]


def test_seed_publishes_a_changed_model_path_only(tmp_path, source):
    store = ModelStore(str(tmp_path / "store"))
    assert store.seed("m", str(source)).version == 1
    assert store.seed("m", str(source)).version == 1  # unchanged: nothing new
    publish_copy(store, "m", source)  # a push since the seed keeps serving after a restart
    assert store.seed("m", str(source)).version == 2
    write_tiny_model(source, tag=2.0)
    assert store.seed("m", str(source)).version == 3
    with pytest.raises(ModelError, match="no policy.py"):
        store.seed("other", str(tmp_path / "missing"))


def test_concurrent_seeds_publish_once(tmp_path, source):
    store = ModelStore(str(tmp_path / "store"))
    threads = [threading.Thread(target=store.seed, args=("m", str(source))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.versions("m") == [1]


def test_load_flag_changes_the_generation(tmp_path, source):
    store = ModelStore(str(tmp_path / "store"))
    publish_copy(store, "m", source)
    off = store.set_loaded("m", False)
    assert (off.loaded, off.generation, off.version) == (False, 2, 1)
    assert store.set_loaded("m", False).generation == 2  # no change, no new generation
    assert store.set_loaded("m", True).generation == 3


@pytest.mark.parametrize("name", ["", ".hidden", "../x", "a/b", "x" * 65, "tab\t", "ümlaut", None, 3])
def test_model_names_are_safe_path_components(name):
    with pytest.raises(InvalidModelName):
        check_name(name)


def test_good_names_pass():
    assert check_name("default") == "default" and check_name("act-v2.1_b") == "act-v2.1_b"
