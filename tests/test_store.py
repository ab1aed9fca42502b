"""The model store: numbering, the atomic pointer, rollback, seeding, pruning, names."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading

import pytest

from policy_server.contract import check_model_name
from policy_server.errors import (
    InsufficientStorage,
    InvalidModelName,
    ModelError,
    StoreWriteFailed,
    UnknownModel,
    UnknownVersion,
)
from policy_server.model import files as model_files
from policy_server.model.files import digest as directory_digest
from policy_server.store import model_store as store_module
from policy_server.store.model_store import ModelStore
from tests.support.tiny_model import tiny_weights, write_tiny_model


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
            except Exception as exc:  # noqa: BLE001 (a partial file would fail to parse: recorded)
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
        check_model_name(name)


def test_good_names_pass():
    assert check_model_name("default") == "default" and check_model_name("act-v2.1_b") == "act-v2.1_b"


# -- durable writes: a version is visible only once durably written; failures are clean ---------


def only_version_one(store: ModelStore, name: str = "m") -> None:
    """Nothing but version 1 anywhere: listed, pointed at, on disk, staged."""
    assert store.versions(name) == [1] and store.pointer(name).version == 1
    assert os.listdir(os.path.join(store.root, name, "versions")) == ["000001"]
    assert os.listdir(os.path.join(store.root, name, ".staging")) == []


def test_a_failing_pointer_write_publishes_nothing(tmp_path, source, monkeypatch):
    store = ModelStore(str(tmp_path / "store"))
    publish_copy(store, "m", source)
    before = store.pointer("m")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ModelStore, "_write_pointer", full)
    with pytest.raises(InsufficientStorage, match=r"writing the pointer failed: No space left on device \(ENOSPC\)"):
        publish_copy(store, "m", source)
    assert InsufficientStorage.status == 507
    assert store.pointer("m") == before
    only_version_one(store)
    monkeypatch.undo()
    assert publish_copy(store, "m", source) == 2  # the store still works


@pytest.mark.parametrize("step", ["rename", "fsync"])
def test_other_io_failures_are_500_naming_the_reason(tmp_path, source, monkeypatch, step):
    store = ModelStore(str(tmp_path / "store"))
    publish_copy(store, "m", source)
    staged = store.stage("m", str(source))

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(store_module.os if step == "rename" else model_files, "rename" if step == "rename"
                        else "fsync_tree", read_only)
    with pytest.raises(StoreWriteFailed, match=r"Read-only file system \(EROFS\)") as refused:
        store.publish("m", staged)
    assert refused.value.status == 500 and "nothing was published" in refused.value.detail
    monkeypatch.undo()
    only_version_one(store)
    assert not os.path.exists(staged)


def test_rollback_and_unload_failures_leave_the_pointer(tmp_path, source, monkeypatch):
    store = ModelStore(str(tmp_path / "store"))
    publish_copy(store, "m", source)
    publish_copy(store, "m", source)
    before = store.pointer("m")
    monkeypatch.setattr(store_module.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.EACCES, "denied")))
    with pytest.raises(StoreWriteFailed, match="EACCES"):
        store.set_current("m", 1)
    with pytest.raises(StoreWriteFailed, match="EACCES"):
        store.set_loaded("m", False)
    monkeypatch.undo()
    assert store.pointer("m") == before
    assert [f for f in os.listdir(os.path.join(store.root, "m")) if f.startswith(".CURRENT-")] == []


def crash_after_rename(store: ModelStore, name: str, source, version: int) -> str:
    """What a publisher killed between its rename and its pointer write leaves behind."""
    staged = store.stage(name, str(source))
    target = store.version_dir(name, version)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.rename(staged, target)
    return target


def test_a_version_the_pointer_does_not_list_is_invisible_and_cleaned(tmp_path, source):
    store = ModelStore(str(tmp_path / "store"))
    publish_copy(store, "m", source)
    leftover = crash_after_rename(store, "m", source, 2)
    assert store.versions("m") == [1]  # not listed, so not a rollback target
    with pytest.raises(UnknownVersion, match=r"kept versions are \[1\]"):
        store.set_current("m", 2)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    staging = os.path.join(store.root, "m", ".staging")
    mine = store.stage("m", str(source))  # this live process's: kept
    orphan = tempfile.mkdtemp(prefix=f"candidate-{dead.pid}@{store_module._HOST}-", dir=staging)
    removed = store.recover()
    assert sorted(removed) == sorted([leftover, orphan]) and os.path.isdir(mine)
    assert os.listdir(os.path.join(store.root, "m", "versions")) == ["000001"]
    store.discard(mine)


def test_publish_removes_leftovers_under_the_lock_and_numbers_past_nothing_visible(tmp_path, source):
    store = ModelStore(str(tmp_path / "store"))
    publish_copy(store, "m", source)
    crash_after_rename(store, "m", source, 2)
    assert publish_copy(store, "m", source) == 2  # 2 was never visible: its number is free
    assert store.versions("m") == [1, 2] and store.pointer("m").kept == (1, 2)
    assert store.pointer("m").digest == directory_digest(store.version_dir("m", 2))


def test_a_first_publish_that_crashed_leaves_no_model(tmp_path, source):
    store = ModelStore(str(tmp_path / "store"))
    crash_after_rename(store, "new", source, 1)
    assert store.names() == [] and store.versions("new") == []
    store.recover()
    assert os.listdir(os.path.join(store.root, "new", "versions")) == []


def test_a_store_written_before_kept_lists_every_directory(tmp_path, source):
    store = ModelStore(str(tmp_path / "store"))
    publish_copy(store, "m", source)
    publish_copy(store, "m", source)
    path = os.path.join(store.root, "m", "CURRENT")
    old = json.load(open(path))
    del old["kept"]
    with open(path, "w") as fh:
        json.dump(old, fh)
    assert store.pointer("m").kept is None and store.versions("m") == [1, 2]
    assert store.recover() == []
    assert publish_copy(store, "m", source) == 3 and store.pointer("m").kept == (1, 2, 3)


def test_seed_inside_the_model_root_is_confined_to_it(tmp_path):
    root = tmp_path / "models"
    seed = write_tiny_model(root / "default", tag=1.0)
    write_tiny_model(root / "shared", tag=2.0)
    (seed / "model.safetensors").unlink()
    (seed / "model.safetensors").symlink_to(root / "shared" / "model.safetensors")  # inside: copied
    store = ModelStore(str(tmp_path / "store"), model_root=str(root))
    assert store.seed_root(str(seed)) == str(root)
    pointer = store.seed("m", str(seed))
    copied = os.path.join(store.version_dir("m", pointer.version), "model.safetensors")
    assert not os.path.islink(copied)
    assert open(copied, "rb").read() == (root / "shared" / "model.safetensors").read_bytes()
    (tmp_path / "evil.py").write_text("raise SystemExit")
    (seed / "policy.py").unlink()
    (seed / "policy.py").symlink_to(tmp_path / "evil.py")
    with pytest.raises(ModelError, match="'policy.py' is a link that leads outside the model root"):
        store.seed("m", str(seed))
    assert store.versions("m") == [1]


def test_seed_outside_the_model_root_is_confined_to_its_own_directory(tmp_path):
    seed = write_tiny_model(tmp_path / "elsewhere" / "seed", tag=1.0)
    write_tiny_model(tmp_path / "elsewhere" / "sibling", tag=2.0)
    store = ModelStore(str(tmp_path / "store"), model_root=str(tmp_path / "models"))
    assert store.seed_root(str(seed)) == str(seed)
    (seed / "model.safetensors").unlink()
    (seed / "model.safetensors").symlink_to(tmp_path / "elsewhere" / "sibling" / "model.safetensors")
    with pytest.raises(ModelError, match="'model.safetensors' is a link that leads outside"):
        store.seed("m", str(seed))
    assert store.names() == []


def test_a_seed_with_non_finite_weights_is_refused(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    seed = write_tiny_model(tmp_path / "seed", tag=1.0)
    weights = tiny_weights(1.0)
    weights["linear.bias"][0] = -np.inf
    save_file(weights, str(seed / "model.safetensors"))
    store = ModelStore(str(tmp_path / "store"))
    with pytest.raises(ModelError, match="weight 'linear.bias' is not finite"):
        store.seed("m", str(seed))
    assert store.names() == [] and os.listdir(os.path.join(store.root, "m", ".staging")) == []


@pytest.mark.parametrize("keep", [1, 2, 5])
def test_publishing_after_a_rollback_to_the_oldest_keeps_it_as_previous(tmp_path, source, keep):
    """Rollback to the oldest kept version, publish: the answer's ``previous`` must stay a
    rollback target (it was pruned, and ``set_current(previous)`` answered 404)."""
    store = ModelStore(str(tmp_path / "store"), keep=keep)
    for _ in range(keep + 2):
        publish_copy(store, "m", source)
    oldest = store.versions("m")[0]
    store.set_current("m", oldest)
    pointer = store.publish("m", store.stage("m", str(source)))
    assert pointer.previous == oldest and {oldest, pointer.version} <= set(store.versions("m"))
    assert len(store.versions("m")) == max(keep, 2)
    assert os.path.isdir(store.version_dir("m", oldest))
    assert store.set_current("m", pointer.previous).version == oldest


def test_recover_removes_temp_pointers_of_dead_writers(tmp_path, source):
    store = ModelStore(str(tmp_path / "store"))
    publish_copy(store, "m", source)
    crashed = tmp_path / "store" / "m" / ".CURRENT-crash1"
    crashed.write_text('{"half": ')
    assert str(crashed) in store.recover()
    assert not crashed.exists() and store.pointer("m").version == 1


def test_a_seed_with_a_non_utf8_file_name_stops_with_the_reason(tmp_path):
    seed = write_tiny_model(tmp_path / "seed", tag=1.0)
    with open(os.path.join(os.fsencode(seed), b"odd\xfe.txt"), "wb") as fh:
        fh.write(b"x")
    store = ModelStore(str(tmp_path / "store"))
    with pytest.raises(ModelError, match=r"'odd\\udcfe.txt' is not a UTF-8 file name"):
        store.seed("m", str(seed))
    assert store.pointer("m") is None
