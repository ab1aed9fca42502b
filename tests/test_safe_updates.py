"""Safe updates on an in-process app: updates that cannot hurt.

Every refused update must leave the store exactly as it was (pointer, listed versions,
directories on disk, an empty staging area) and keep version 1 serving.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from binary_protocol import dict_to_binary
from policy_server.launcher import ROOT
from policy_server.store.model_store import ModelStore
from tests.support.apps import runtime_of
from tests.support.store_app import BINARY, infer, make_store_app, push
from tests.support.tiny_model import CANARY_CODE, POLICY, tiny_weights, write_linked_out_model, write_tiny_model
from tests.support.wait import eventually


def assert_nothing_published(store_client, name: str = "default") -> None:
    store: ModelStore = runtime_of(store_client.application).store
    pointer = store.pointer(name)
    assert (pointer.version, pointer.generation) == (1, 1)
    assert store.versions(name) == [1]
    assert os.listdir(os.path.join(store.root, name, "versions")) == ["000001"]
    assert os.listdir(os.path.join(store.root, name, ".staging")) == []
    by_name = {m["name"]: m for m in store_client.get("/models").get_json()["models"]}
    assert by_name[name]["kept_versions"] == [1]
    assert infer(store_client)[:2] == ("1", 1.0)


def refused(response, status: int, fragment: str) -> dict:
    body = response.get_json()
    assert response.status_code == status, body
    assert set(body) == {"error", "detail"} and fragment in body["detail"], body
    return body


# -- confinement ----------------------------------------------------------------------


def test_a_policy_py_linked_out_of_the_root_is_refused_and_never_runs(store_client, tiny_models, tmp_path):
    canary = write_linked_out_model(tiny_models, tmp_path)
    refused(store_client.post("/update_model", json={"model_path": "evil"}), 403,
            "'policy.py' is a link that leads outside the model root")
    refused(store_client.post("/models/other/load", json={"model_path": "evil"}), 403, "'policy.py'")
    assert not canary.exists()
    assert_nothing_published(store_client)


def test_a_weights_file_linked_out_of_the_root_is_refused(store_client, tiny_models, tmp_path):
    write_tiny_model(tmp_path / "outside", tag=9.0)
    evil = write_tiny_model(tiny_models / "evil", tag=2.0)
    (evil / "sub").mkdir()
    (evil / "sub" / "model.safetensors").symlink_to(tmp_path / "outside" / "model.safetensors")
    refused(store_client.post("/update_model", json={"model_path": "evil"}), 403, "'sub/model.safetensors'")
    assert_nothing_published(store_client)


def test_a_link_inside_the_root_is_served_as_a_copy(store_client, tiny_models):
    linked = tiny_models / "linked"
    linked.mkdir()
    (linked / "policy.py").symlink_to(tiny_models / "tiny" / "policy.py")
    write_tiny_model(tiny_models / "weights_only", tag=3.0)
    (linked / "model.safetensors").symlink_to("../weights_only/model.safetensors")
    answer = store_client.post("/update_model", json={"model_path": "linked"}).get_json()
    assert answer["version"] == 2 and answer["all_workers"] is True
    store = runtime_of(store_client.application).store
    published = store.version_dir("default", 2)
    assert not any(os.path.islink(os.path.join(published, f)) for f in os.listdir(published))
    (tiny_models / "weights_only" / "model.safetensors").write_bytes(b"changed later")  # the copy is what serves
    assert infer(store_client)[:2] == ("2", 3.0)


def test_special_files_and_limits_are_refused(store_client, tiny_models, tmp_path):
    fifo = write_tiny_model(tiny_models / "fifo", tag=2.0)
    os.mkfifo(fifo / "pipe")
    refused(store_client.post("/update_model", json={"model_path": "fifo"}), 422, "'pipe' is a FIFO")
    assert_nothing_published(store_client)
    store_app = make_store_app(tmp_path / "small", tiny_models, stage_max_files=2)
    try:
        small = store_app.test_client()
        write_tiny_model(tiny_models / "three", tag=2.0)
        (tiny_models / "three" / "notes.txt").write_text("a third file")
        refused(small.post("/update_model", json={"model_path": "three"}), 413, "more than 2 files")
        assert_nothing_published(small)
    finally:
        runtime_of(store_app).stop(5)


# -- weights checked before anything runs -----------------------------------------------


@pytest.mark.parametrize("value", [-np.inf, np.inf, np.nan])
def test_a_non_finite_weight_push_is_refused_naming_the_key(store_client, value):
    weights = tiny_weights(2.0)
    weights["linear.bias"][7] = value
    refused(push(store_client, weights), 422, "weight 'linear.bias' is not finite")
    assert_nothing_published(store_client)


def test_a_model_directory_with_a_non_finite_weight_is_refused_before_its_code_runs(
    store_client, tiny_models, tmp_path
):
    from safetensors.numpy import save_file

    canary = tmp_path / "canary"
    bad = write_tiny_model(tiny_models / "bad", tag=2.0)
    (bad / "policy.py").write_text(CANARY_CODE.format(path=str(canary)) + POLICY)
    weights = tiny_weights(2.0)
    weights["linear.weight"][1, 2] = -np.inf
    save_file(weights, str(bad / "model.safetensors"))
    refused(
        store_client.post("/update_model", json={"model_path": "bad"}),
        422,
        "model.safetensors: weight 'linear.weight' is not finite",
    )
    assert not canary.exists()
    assert_nothing_published(store_client)


def test_a_constant_policy_is_published_with_a_warning(store_client):
    answer = push(store_client, tiny_weights(2.0)).get_json()  # the tiny model's output is its bias: constant
    assert answer["version"] == 2
    assert answer["warnings"] == [  # warm-up: batch 1 twice, then the CPU batch cap of 4
        "output 'action' was identical for 6 distinct random observations: the policy may ignore its input"
    ]


def test_a_policy_that_uses_its_input_has_no_warning(tmp_path):
    models = os.path.join(ROOT, "models")
    store_app = make_store_app(tmp_path, Path(models), model_path=os.path.join(models, "default"))
    try:
        answer = store_app.test_client().post("/update_model", json={"model_path": "default"}).get_json()
        assert answer["version"] == 2, answer
        assert "warnings" not in answer and answer["all_workers"] is True
    finally:
        runtime_of(store_app).stop(5)


# -- store failures ---------------------------------------------------------------------


def _raise(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize(
    "code, status, reason",
    [
        (errno.ENOSPC, 507, "No space left on device (ENOSPC)"),
        (errno.EROFS, 500, "Read-only file system (EROFS)"),
        (errno.EACCES, 500, "Permission denied (EACCES)"),
    ],
)
def test_a_failing_pointer_write_answers_json_and_keeps_serving(
    store_client, tiny_models, monkeypatch, code, status, reason
):
    monkeypatch.setattr(ModelStore, "_write_pointer", _raise(code))
    write_tiny_model(tiny_models / "next", tag=2.0)
    body = refused(store_client.post("/update_model", json={"model_path": "next"}), status, reason)
    assert "writing the pointer failed" in body["detail"]
    refused(push(store_client, tiny_weights(3.0)), status, reason)
    refused(store_client.post("/update_model", json={"version": 1}), status, reason)
    monkeypatch.undo()
    assert_nothing_published(store_client)
    assert push(store_client, tiny_weights(3.0)).get_json()["version"] == 2  # and it recovers


def test_a_staging_area_that_cannot_be_written_is_500(store_client, tiny_models):
    store = runtime_of(store_client.application).store
    staging = os.path.join(store.root, "default", ".staging")
    os.rmdir(staging)
    open(staging, "w").close()  # a file where the staging directory should be: fails even for root
    write_tiny_model(tiny_models / "next", tag=2.0)
    refused(
        store_client.post("/update_model", json={"model_path": "next"}), 500, "creating the staging directory failed"
    )
    os.unlink(staging)
    os.mkdir(staging)
    assert_nothing_published(store_client)


# -- read your writes --------------------------------------------------------------------


def test_updates_wait_for_every_worker_by_default(store_client, tiny_models):
    response = store_client.post("/update_model", data=dict_to_binary({"weights": tiny_weights(2.0)}), headers=BINARY)
    answer = response.get_json()
    assert answer["all_workers"] is True and answer["lagging"] == [] and answer["missing_workers"] == 0
    assert infer(store_client)[:2] == ("2", 2.0)
    quick = store_client.post("/update_model?wait_s=0", json={"version": 1}).get_json()
    assert quick["version"] == 1 and "all_workers" not in quick
    write_tiny_model(tiny_models / "second", tag=5.0)
    loaded = store_client.post("/models/second/load", json={"model_path": "second"}).get_json()
    assert loaded["all_workers"] is True
    assert infer(store_client, "/models/second/infer")[:2] == ("1", 5.0)
    unloaded = store_client.post("/models/second/unload").get_json()
    assert unloaded["all_workers"] is True
    assert store_client.post("/models/second/infer", data=dict_to_binary({}), headers=BINARY).status_code == 404


def test_the_default_wait_is_a_setting(tmp_path, tiny_models):
    store_app = make_store_app(tmp_path, tiny_models, update_wait_s=0.0)
    try:
        answer = store_app.test_client().post("/update_model", json={"version": 1}).get_json()
        assert answer["version"] == 1 and "all_workers" not in answer
    finally:
        runtime_of(store_app).stop(5)


# -- fuzzing the update path --------------------------------------------------------------


def _header_file(header_text: str, data: bytes) -> bytes:
    raw = header_text.encode()
    return struct.pack("<Q", len(raw)) + raw + data


ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "F64", "X9"]),
        "shape": st.lists(st.integers(-2, 80), max_size=3),
        "data_offsets": st.lists(st.integers(-4, 1 << 41), min_size=2, max_size=2),
    }
)


@st.composite
def broken_safetensors(draw) -> bytes:
    """Bytes no safetensors reader may accept as the tiny model's weights."""
    from safetensors.numpy import save

    valid = save(tiny_weights(2.0))
    kind = draw(st.sampled_from(["truncated", "random", "fields", "duplicate", "overlap", "length"]))
    if kind == "truncated":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "fields":
        entries = draw(st.dictionaries(st.sampled_from(["linear.weight", "linear.bias", "x"]), ENTRY, min_size=1))
        return _header_file(json.dumps(entries), draw(st.binary(max_size=64)))
    if kind == "duplicate":
        one = json.dumps({"dtype": "F32", "shape": [70], "data_offsets": [0, 280]})
        two = json.dumps({"dtype": "F32", "shape": [70, 7], "data_offsets": [280, 280 + 1960]})
        text = '{"linear.bias": %s, "linear.weight": %s, "linear.bias": %s}' % (one, two, one)
        return _header_file(text, bytes(2240))
    if kind == "overlap":
        start = draw(st.integers(0, 279))
        text = json.dumps(
            {
                "linear.bias": {"dtype": "F32", "shape": [70], "data_offsets": [0, 280]},
                "linear.weight": {"dtype": "F32", "shape": [70, 7], "data_offsets": [start, start + 1960]},
            }
        )
        return _header_file(text, bytes(2240))
    length = draw(st.integers(len(valid), 1 << 64 - 1))  # a header length past the end of the file
    return struct.pack("<Q", length) + valid[8:]


def test_fuzzed_weight_files_are_refused_with_a_reason(tmp_path, tiny_models):
    store_app = make_store_app(tmp_path, tiny_models)
    store_client = store_app.test_client()
    target = write_tiny_model(tiny_models / "fuzz", tag=2.0)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(broken_safetensors())
    def check(data: bytes) -> None:
        (target / "model.safetensors").write_bytes(data)
        response = store_client.post("/update_model?wait_s=0", json={"model_path": "fuzz"})
        body = response.get_json()
        assert response.status_code == 422, body
        assert body["detail"].startswith("validation failed, nothing published: "), body

    try:
        check()
        assert_nothing_published(store_client)
    finally:
        runtime_of(store_app).stop(5)


PUSH_DTYPES = st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.uint8, np.bool_])


def test_fuzzed_weight_pushes_are_refused_with_a_reason(tmp_path, tiny_models):
    store_app = make_store_app(tmp_path, tiny_models)
    store_client = store_app.test_client()

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.dictionaries(
            st.sampled_from(["linear.weight", "linear.bias", "extra", ""]),
            hnp.arrays(PUSH_DTYPES, hnp.array_shapes(min_dims=0, max_dims=2, max_side=71)),
            max_size=3,
        ),
        st.booleans(),
    )
    def check(weights, spoil: bool) -> None:
        good = tiny_weights(2.0)
        if spoil:  # a right-shaped push with one value made non-finite
            weights = {**good, "linear.bias": good["linear.bias"].copy()}
            weights["linear.bias"][0] = np.nan
        response = store_client.post(
            "/update_model?wait_s=0", data=dict_to_binary({"weights": weights}), headers=BINARY
        )
        body = response.get_json()
        assert 400 <= response.status_code < 500, body
        assert body["detail"], body

    try:
        check()
        assert_nothing_published(store_client)
    finally:
        runtime_of(store_app).stop(5)


def _pickled_push_repeating_a_key(setitems: bool) -> bytes:
    """A protocol-5 pickle of {"weights": {"linear.bias": bad, "linear.weight": w, "linear.bias": good}}:
    no pickler writes this, a crafted stream can (the last value would win)."""
    import pickle

    weights = tiny_weights(2.0)
    bad = weights["linear.bias"].copy()
    bad[0] = np.nan
    body = pickle.dumps({"weights": {"linear.bias": bad, "linear.weight": weights["linear.weight"]}}, protocol=5)
    key = pickle.dumps("linear.bias", protocol=5)[2:-1]  # the SHORT_BINUNICODE opcode, without PROTO and STOP
    value = pickle.dumps(weights["linear.bias"], protocol=5)[2:-1]
    extra = key + value + (b"\x75" if setitems else b"\x73")  # SETITEMS needs a MARK first
    if setitems:
        extra = b"\x28" + extra
    # insert just before the inner dict's own SETITEMS closes the outer dict: after its last u
    inner_end = body.rindex(b"\x75", 0, len(body) - 2)
    return body[: inner_end + 1] + extra + body[inner_end + 1 :]


@pytest.mark.parametrize("setitems", [True, False])
def test_a_push_repeating_a_key_is_refused(store_client, setitems):
    import pickle

    data = _pickled_push_repeating_a_key(setitems)
    decoded = pickle.loads(data)  # what CPython would make of it: a silent last-wins dict
    assert set(decoded["weights"]) == {"linear.bias", "linear.weight"}
    refused(store_client.post("/update_model", data=data, headers=BINARY), 400, "repeats a key")
    assert_nothing_published(store_client)


def test_the_client_sends_its_wait_and_sizes_its_timeout(monkeypatch):
    """PolicyClient waits 10 s by default, sends wait_s=0 as such, and leaves it to the server on None."""
    import request_tools
    from policy_client import transport

    calls = []

    class Answer:
        def json(self):
            return {"version": 2}

    def fake_request(session, method, url, *, timeout_s, params, **kwargs):
        calls.append((url.rsplit("/", 1)[-1], timeout_s, params))
        return Answer()

    monkeypatch.setattr(transport, "request", fake_request)
    with request_tools.PolicyClient("http://127.0.0.1:9", timeout_s=5) as store_client:
        store_client.update_model(version=1)
        store_client.update_model(version=1, wait_s=0)
        store_client.load_model("x", wait_s=None)
        store_client.unload_model("x", wait_s=2.5)
    assert calls == [
        ("update_model", 15.0, {"wait_s": 10.0}),
        ("update_model", 5.0, {"wait_s": 0}),
        ("load", 305.0, None),
        ("unload", 7.5, {"wait_s": 2.5}),
    ]


# -- hostile update paths (second round) --------------------------------------------------


def test_a_chain_of_double_directory_links_is_refused_at_once(store_client, tiny_models):
    """Each directory links twice to the next: 2**30 paths if every link were walked."""
    write_tiny_model(tiny_models / "k", tag=2.0)
    (tiny_models / "k" / "d" / "n0").mkdir(parents=True)
    for i in range(30):
        (tiny_models / "k" / "d" / f"n{i + 1}").mkdir()
        (tiny_models / "k" / "d" / f"n{i}" / "a").symlink_to(f"../n{i + 1}")
        (tiny_models / "k" / "d" / f"n{i}" / "b").symlink_to(f"../n{i + 1}")
    refused(
        store_client.post("/update_model", json={"model_path": "k"}),
        422,
        "'d/n0/a' leads to a directory already staged as 'd/n1'",
    )
    assert_nothing_published(store_client)


def test_a_directory_too_deep_is_422(store_client, tiny_models):
    from policy_server.model.files import MAX_DEPTH

    write_tiny_model(tiny_models / "deep", tag=2.0)
    (tiny_models / "deep" / "/".join(["d"] * (MAX_DEPTH + 1))).mkdir(parents=True)
    refused(store_client.post("/update_model", json={"model_path": "deep"}), 422, f"more than {MAX_DEPTH} levels deep")
    assert_nothing_published(store_client)


def _fail_writes_to(monkeypatch, suffix: str, code: int) -> None:
    """os.write raises ``code`` for files whose name ends in ``suffix`` (as a full disk does)."""
    real_write = os.write

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(suffix):
            raise OSError(code, os.strerror(code))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize(
    "code, status, reason",
    [
        (errno.ENOSPC, 507, "No space left on device (ENOSPC)"),
        (errno.EIO, 500, "Input/output error (EIO)"),
    ],
)
def test_a_failing_weights_write_names_the_reason(store_client, monkeypatch, code, status, reason):
    """safetensors' save_file reported a full disk as SafetensorError: a generic 500."""
    _fail_writes_to(monkeypatch, "/model.safetensors", code)
    body = refused(push(store_client, tiny_weights(3.0)), status, reason)
    assert "writing model.safetensors failed" in body["detail"]
    monkeypatch.undo()
    assert_nothing_published(store_client)


def test_the_previous_version_stays_a_rollback_target(tmp_path, tiny_models):
    """README: ``update_model(version=answer["previous"])`` after a rollback to the oldest kept."""
    store_app = make_store_app(tmp_path, tiny_models, store_keep=2)
    try:
        store_client = store_app.test_client()
        for tag in (2.0, 3.0):
            assert push(store_client, tiny_weights(tag)).status_code == 200
        assert store_client.post("/update_model", json={"version": 2}).status_code == 200
        answer = push(store_client, tiny_weights(4.0)).get_json()
        assert (answer["version"], answer["previous"]) == (4, 2)
        back = store_client.post("/update_model", json={"version": answer["previous"]})
        assert back.status_code == 200, back.get_json()
        assert infer(store_client)[:2] == ("2", 2.0)
    finally:
        runtime_of(store_app).stop(5)


@pytest.mark.parametrize("route", ["/update_model", "/models/other/load"])
def test_a_lone_surrogate_model_path_is_400(store_client, route):
    response = store_client.post(route, data='{"model_path": "\\ud800"}', content_type="application/json")
    refused(response, 400, "not valid UTF-8")
    assert_nothing_published(store_client)


def test_deeply_nested_json_is_400(store_client):
    refused(store_client.post("/update_model", data="[" * 100_000, content_type="application/json"), 400, "nested")


def test_a_model_path_whose_link_vanishes_while_resolving_is_422(store_client, tiny_models, monkeypatch):
    real = os.path.realpath

    def swapped(path, *args, **kwargs):
        if "swapped" in str(path):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os.path, "realpath", swapped)
    refused(
        store_client.post("/update_model", json={"model_path": "swapped"}),
        422,
        "'swapped' is not a model directory: No such file or directory",
    )
    monkeypatch.undo()
    assert_nothing_published(store_client)


def test_a_non_utf8_file_name_is_refused_before_staging(store_client, tiny_models):
    write_tiny_model(tiny_models / "odd", tag=2.0)
    with open(os.path.join(os.fsencode(tiny_models / "odd"), b"notes\xff.txt"), "wb") as fh:
        fh.write(b"x")
    refused(
        store_client.post("/update_model", json={"model_path": "odd"}),
        422,
        "'notes\\udcff.txt' is not a UTF-8 file name",
    )
    assert_nothing_published(store_client)


def test_a_validation_error_shows_no_server_path(store_client, tiny_models):
    import socket

    write_tiny_model(tiny_models / "leaky", tag=2.0)
    policy = tiny_models / "leaky" / "policy.py"
    policy.write_text(policy.read_text() + "\nopen(__file__ + '.missing')\n")
    body = refused(store_client.post("/update_model", json={"model_path": "leaky"}), 422, "policy.py.missing")
    store = runtime_of(store_client.application).store
    for secret in (store.root, str(tiny_models), ".staging", socket.gethostname()):
        assert secret not in body["detail"], body
    outside = refused(store_client.post("/update_model", json={"model_path": ".."}), 403, "inside the model root")
    assert str(tiny_models) not in outside["detail"] and str(tiny_models.parent) not in outside["detail"]
    assert_nothing_published(store_client)


def test_a_worker_that_followed_a_later_update_counts_as_switched(tmp_path, tiny_models):
    """Another client's update lands before this one's wait ends: the workers serve something
    newer, which is not lagging."""
    from types import SimpleNamespace

    from policy_server.app.model_admin import ModelAdmin

    store = ModelStore(str(tmp_path / "store"))
    first = store.publish("default", store.stage("default", str(tiny_models / "tiny")))
    second = store.publish("default", store.stage("default", str(tiny_models / "tiny")))

    def doc(version, generation, problem=None):
        return {
            "models": {"default": {"version": str(version), "since": second.changed_at}},
            "generations": {"default": generation},
            "problems": {"default": problem} if problem else {},
        }

    docs = {101: doc(2, 2), 102: doc(1, 1), 103: doc(0, 2, problem="version 2: broken")}
    board = SimpleNamespace(read=lambda: docs, expected=3)
    manager = ModelAdmin(SimpleNamespace(model_root=str(tiny_models), update_wait_s=1.0), store, None, board)
    answer = manager.wait_for(first, 0.0)
    assert [w["ok"] for w in answer["workers"]] == [True, True, False]
    assert answer["lagging"] == [103] and answer["all_workers"] is False  # 103 failed the newer one
    assert answer["superseded_by"] == {"version": second.version, "generation": second.generation}
    del docs[103]
    board.expected = 2
    answer = manager.wait_for(first, 0.0)
    assert answer["all_workers"] is True and answer["lagging"] == []
    assert "superseded_by" not in manager.wait_for(second, 0.0)


def test_a_version_pruned_before_a_worker_loads_it_is_no_failure(store_app, store_client, caplog, monkeypatch):
    """A worker about to load version N while a later publish prunes N: no reload failure, and
    the watcher follows the newer pointer."""
    import dataclasses

    runtime = runtime_of(store_app)
    store = runtime.store
    current = store.pointer("default")
    pruned = dataclasses.replace(current, version=99, generation=current.generation - 1)
    reads = []
    real_pointer = store.pointer
    here = threading.get_ident()  # the watcher thread polls too: it reads the real pointer

    def pointer(name):  # this thread's first read names 99, gone by the time it loads
        if threading.get_ident() == here:
            reads.append(name)
            if len(reads) == 1:
                return pruned
        return real_pointer(name)

    monkeypatch.setattr(store, "pointer", pointer)
    with caplog.at_level("INFO", logger="policy_server.serving.store_follower"):
        runtime.follower._follow("default")
    monkeypatch.undo()
    assert "default" not in runtime.follower.problems
    assert "pruned by a later update" in caplog.text and "failed" not in caplog.text
    eventually(lambda: runtime.follower.generations.get("default") == current.generation, 5,
               "the watcher following the newer pointer", every_s=0.01)
    assert runtime.follower.generations["default"] == current.generation
    assert infer(store_client)[:2] == ("1", 1.0)
