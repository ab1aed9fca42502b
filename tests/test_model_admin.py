"""/update_model, rollback, several models, the admin key and the cache, on an in-process app.

The models are tiny ones whose every action equals their weights' tag, so an answer
proves which version computed it (see tests/support/tiny_model.py).
"""

from __future__ import annotations

import os
import pickle
import threading

import numpy as np
import pytest

from binary_protocol import dict_to_binary
from policy_server.config import ServerConfig
from server import create_app
from tests.support.apps import runtime_of
from tests.support.fakes import FakePolicy, fake_observation
from tests.support.hostile_payloads import hostile_payloads
from tests.support.prometheus import metric
from tests.support.store_app import BINARY, infer, make_store_app, push
from tests.support.tiny_model import tiny_weights, write_tiny_model
from tests.support.wait import eventually

ADMIN_KEY = "admin-key-0123"
API_KEY = "api-key-0123"


def test_update_from_a_model_path_switches_the_served_version(store_client, tiny_models):
    assert infer(store_client)[:2] == ("1", 1.0)
    write_tiny_model(tiny_models / "next", tag=2.0)
    response = store_client.post("/update_model?wait_s=5", json={"model_path": "next"})
    assert response.status_code == 200, response.get_json()
    answer = response.get_json()
    assert (answer["version"], answer["previous"], answer["model"]) == (2, 1, "default")
    assert answer["all_workers"] is True and [w["version"] for w in answer["workers"]] == ["2"]
    assert 0 <= answer["switch_s"] < 5
    assert infer(store_client)[:2] == ("2", 2.0)
    assert store_client.get("/model_info").get_json()["version"] == "2"


def test_weights_push_then_rollback(store_client):
    answer = push(store_client, tiny_weights(3.0)).get_json()
    assert (answer["version"], answer["previous"], answer["all_workers"]) == (2, 1, True)
    assert infer(store_client)[:2] == ("2", 3.0)
    back = store_client.post("/update_model?wait_s=5", json={"version": 1}).get_json()
    assert (back["version"], back["previous"], back["all_workers"]) == (1, 2, True)
    assert infer(store_client)[:2] == ("1", 1.0)


def test_update_without_wait_answers_at_once_and_the_worker_follows(store_client):
    answer = push(store_client, tiny_weights(4.0), wait_s=0).get_json()
    assert answer["version"] == 2 and "workers" not in answer
    eventually(lambda: infer(store_client)[0] == "2", 10, "the worker serving version 2", every_s=0.01)
    assert infer(store_client)[:2] == ("2", 4.0)


def _unsafe_pickle() -> bytes:
    class Boom:
        def __reduce__(self):
            return (os.system, ("true",))

    return pickle.dumps({"weights": Boom()}, protocol=5)


def _nan_weights():
    weights = tiny_weights(1.0)
    weights["linear.bias"][3] = np.nan
    return weights


def _missing_key():
    weights = tiny_weights(1.0)
    del weights["linear.bias"]
    return weights


BAD_UPDATES = {
    "missing key": (lambda r: dict(data=dict_to_binary({"weights": _missing_key()}), headers=BINARY), 422, "lack"),
    "extra key": (
        lambda r: dict(data=dict_to_binary({"weights": {**tiny_weights(1.0), "x": np.zeros(1)}}), headers=BINARY),
        422,
        "'x'",
    ),
    "wrong shape": (
        lambda r: dict(
            data=dict_to_binary({"weights": {**tiny_weights(1.0), "linear.bias": np.zeros(71, np.float32)}}),
            headers=BINARY,
        ),
        422,
        "shape",
    ),
    "wrong dtype": (
        lambda r: dict(
            data=dict_to_binary({"weights": {**tiny_weights(1.0), "linear.bias": np.zeros(70, np.float64)}}),
            headers=BINARY,
        ),
        422,
        "F64",
    ),
    "weights not arrays": (
        lambda r: dict(data=dict_to_binary({"weights": {"linear.bias": [1.0]}}), headers=BINARY),
        422,
        "dict of name -> array",
    ),
    "outputs NaN": (
        lambda r: dict(data=dict_to_binary({"weights": _nan_weights()}), headers=BINARY),
        422,
        "not finite",
    ),
    "garbage bytes": (lambda r: dict(data=b"\x00garbage" * 10, headers=BINARY), 400, "body rejected"),
    "unsafe pickle": (lambda r: dict(data=_unsafe_pickle(), headers=BINARY), 400, "body rejected"),
    "path outside the root": (lambda r: dict(json={"model_path": str(r.parent)}), 403, "inside the model root"),
    "path traversal": (lambda r: dict(json={"model_path": "../models/../.."}), 403, "inside the model root"),
    "symlink out of the root": (lambda r: dict(json={"model_path": "escape"}), 403, "inside the model root"),
    "the root itself": (lambda r: dict(json={"model_path": "."}), 403, "inside the model root"),
    "not a model directory": (lambda r: dict(json={"model_path": "empty"}), 422, "no policy.py"),
    "model that raises on load": (lambda r: dict(json={"model_path": "broken"}), 422, "refuses to load"),
    "unknown version": (lambda r: dict(json={"version": 9}), 404, "kept versions are [1]"),
    "version not an int": (lambda r: dict(json={"version": "1"}), 400, "positive integer"),
    "two kinds at once": (lambda r: dict(json={"version": 1, "model_path": "tiny"}), 400, "exactly one"),
    "unknown field": (lambda r: dict(json={"versoin": 1}), 400, "unknown field"),
    "bad model name": (lambda r: dict(json={"version": 1, "model": "../x"}), 400, "model name"),
    "weights for an unknown model": (
        lambda r: dict(data=dict_to_binary({"weights": tiny_weights(1.0), "model": "nope"}), headers=BINARY),
        404,
        "no model named",
    ),
    "not JSON": (lambda r: dict(data=b"{nope", headers={"Content-Type": "application/json"}), 400, "not JSON"),
    "JSON not an object": (lambda r: dict(json=[1, 2]), 400, "must be an object"),
    "wrong content type": (lambda r: dict(data=b"x", headers={"Content-Type": "text/plain"}), 415, "text/plain"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPDATES))
def test_bad_updates_are_refused_and_serving_is_untouched(store_client, tiny_models, tmp_path, case):
    (tiny_models / "empty").mkdir()
    write_tiny_model(tiny_models / "broken", tag=5.0, raise_on_load=True)
    outside = write_tiny_model(tmp_path / "outside", tag=6.0)
    (tiny_models / "escape").symlink_to(outside)
    make_request, status, fragment = BAD_UPDATES[case]
    store = runtime_of(store_client.application).store
    before = store.pointer("default")
    response = store_client.post("/update_model?wait_s=1", **make_request(tiny_models))
    assert response.status_code == status, response.get_json()
    assert fragment in response.get_json()["detail"]
    assert store.pointer("default") == before and store.versions("default") == [1]
    assert os.listdir(os.path.join(store.root, "default", ".staging")) == []
    assert infer(store_client)[:2] == ("1", 1.0)


def test_armed_pickles_sent_as_updates_run_nothing(store_client, tmp_path):
    canary = tmp_path / "canary"
    armed = [p for p in hostile_payloads(str(canary)) if p.armed]
    assert len(armed) >= 20
    for payload in armed:
        response = store_client.post("/update_model", data=payload.body, headers=BINARY)
        assert response.status_code == 400, payload.id
    assert not canary.exists()
    assert runtime_of(store_client.application).store.versions("default") == [1]


def test_a_fixed_policy_server_has_no_hot_reload():
    store_app = create_app(ServerConfig(), policy=FakePolicy())
    runtime_of(store_app).start(block=True)
    response = store_app.test_client().post("/update_model", json={"version": 1})
    assert response.status_code == 409 and "model store" in response.get_json()["detail"]


def test_admin_key_guards_management_only(tmp_path, tiny_models):
    store_app = make_store_app(tmp_path, tiny_models, admin_key=ADMIN_KEY, api_key=API_KEY)
    store_client = store_app.test_client()
    update = {"json": {"version": 1}}
    assert store_client.post("/update_model", **update).status_code == 401
    assert store_client.post("/update_model", headers={"X-API-Key": API_KEY}, **update).status_code == 401
    assert store_client.post("/update_model", headers={"X-Admin-Key": "wrong-key-000"}, **update).status_code == 401
    assert store_client.post("/models/x/unload", headers={"X-API-Key": API_KEY}).status_code == 401
    assert store_client.post("/update_model", headers={"X-Admin-Key": ADMIN_KEY}, **update).status_code == 200
    assert (
        store_client.post(
            "/infer", data=dict_to_binary(fake_observation(0)), headers={**BINARY, "X-Admin-Key": ADMIN_KEY}
        ).status_code
        == 401
    )  # the admin key is not an inference key
    assert infer(store_client, headers={"X-API-Key": API_KEY})[0] == "1"
    assert store_client.get("/models", headers={"X-API-Key": API_KEY}).status_code == 200
    runtime_of(store_app).stop(5)


def test_without_an_admin_key_management_follows_the_api_key(tmp_path, tiny_models):
    store_app = make_store_app(tmp_path, tiny_models, api_key=API_KEY)
    store_client = store_app.test_client()
    assert store_client.post("/update_model", json={"version": 1}).status_code == 401
    assert store_client.post("/update_model", json={"version": 1}, headers={"X-API-Key": API_KEY}).status_code == 200
    runtime_of(store_app).stop(5)


def test_several_models_load_serve_and_unload(store_client, tiny_models):
    write_tiny_model(tiny_models / "second", tag=7.0)
    loaded = store_client.post("/models/second/load?wait_s=5", json={"model_path": "second"}).get_json()
    assert (loaded["model"], loaded["version"], loaded["all_workers"]) == ("second", 1, True)
    listing = store_client.get("/models").get_json()
    assert listing["default"] == "default"
    by_name = {m["name"]: m for m in listing["models"]}
    assert by_name["second"]["state"] == by_name["default"]["state"] == "serving"
    assert by_name["second"]["device"] == "cpu" and by_name["second"]["kept_versions"] == [1]
    assert list(listing["workers"].values()) == [{"default": "1", "second": "1"}]
    assert infer(store_client, "/models/second/infer")[:2] == ("1", 7.0)
    assert infer(store_client)[:2] == ("1", 1.0)
    assert store_client.get("/models/second").get_json()["name"] == "second"
    pushed = push(store_client, tiny_weights(8.0), model="second").get_json()
    assert pushed["version"] == 2 and infer(store_client, "/models/second/infer")[:2] == ("2", 8.0)
    assert infer(store_client)[:2] == ("1", 1.0)  # the other model is untouched

    unloaded = store_client.post("/models/second/unload?wait_s=5").get_json()
    assert unloaded["loaded"] is False and unloaded["all_workers"] is True
    response = store_client.post("/models/second/infer", data=dict_to_binary(fake_observation(0)), headers=BINARY)
    assert response.status_code == 404 and "not loaded" in response.get_json()["detail"]
    states = {m["name"]: m["state"] for m in store_client.get("/models").get_json()["models"]}
    assert states == {"default": "serving", "second": "unloaded"}
    reloaded = store_client.post("/models/second/load?wait_s=5").get_json()
    assert reloaded["all_workers"] is True and infer(store_client, "/models/second/infer")[:2] == ("2", 8.0)


def test_unknown_models_and_unloading_the_default(store_client):
    assert store_client.post("/models/default/unload").status_code == 409
    assert store_client.post("/models/nope/unload").status_code == 404
    assert store_client.post("/models/nope/load").status_code == 404
    response = store_client.post("/models/nope/infer", data=dict_to_binary(fake_observation(0)), headers=BINARY)
    assert response.status_code == 404
    assert store_client.get("/models/nope").status_code == 404


def pushes_under_load(store_app, tags: list[float]) -> tuple[list, set]:
    """Push each tag as the next version while 4 threads infer; return (mismatches, versions seen).

    A mismatch is an answer whose action is not the tag of the version it names.
    """
    store_client = store_app.test_client()
    version, value, _ = infer(store_client)
    expected = {version: value}
    stop, errors, seen = threading.Event(), [], set()

    def load():
        local = store_app.test_client()
        while not stop.is_set():
            version, value, _ = infer(local)
            seen.add(version)
            if version in expected and expected[version] != value:
                errors.append((version, value))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for tag in tags:
            answer = push(store_client, tiny_weights(tag)).get_json()
            assert answer["all_workers"], answer
            expected[str(answer["version"])] = tag
    finally:
        stop.set()
        for t in threads:
            t.join()
    return errors, seen


def test_requests_during_updates_always_match_their_version(store_app):
    """No answer mixes versions: each action equals the tag of the version it names."""
    errors, seen = pushes_under_load(store_app, [10.0 * i for i in range(2, 8)])
    assert errors == [] and len(seen) >= 3


def test_cache_hits_misses_and_a_new_version_invalidates(tmp_path, tiny_models):
    store_app = make_store_app(tmp_path, tiny_models, cache_size=8, cache_ttl_s=60)
    store_client = store_app.test_client()
    first = infer(store_client)[2]
    again = infer(store_client)[2]
    other = infer(store_client, obs=fake_observation(1))[2]
    assert (first.headers["X-Cache"], again.headers["X-Cache"], other.headers["X-Cache"]) == ("miss", "hit", "miss")
    assert again.get_data() == first.get_data() and "X-Batch-Size" not in again.headers
    assert push(store_client, tiny_weights(9.0)).status_code == 200
    version, value, after = infer(store_client)
    assert (version, value, after.headers["X-Cache"]) == ("2", 9.0, "miss")
    assert infer(store_client)[2].headers["X-Cache"] == "hit"
    runtime_of(store_app).stop(5)


def test_cache_is_off_by_default(store_client):
    assert "X-Cache" not in infer(store_client)[2].headers
    assert "X-Cache" not in infer(store_client)[2].headers


def test_a_version_that_fails_to_load_in_a_worker_keeps_the_old_one(store_client, store_app):
    """A published version that this worker cannot load (e.g. removed files): it reports the
    problem, keeps serving, and a wait says so."""
    runtime = runtime_of(store_app)
    store = runtime.store
    staged = store.stage("default", store.version_dir("default", 1))
    with open(os.path.join(staged, "raise_on_load"), "w") as fh:
        fh.write("1")
    pointer = store.publish("default", staged)  # bypasses validation, as a bad manual copy would
    from policy_server.app.model_admin import ModelAdmin

    report = ModelAdmin(runtime.config, store, runtime.follower, runtime.board).wait_for(pointer, 5)
    assert report["all_workers"] is False and "refuses to load" in report["workers"][0]["problem"]
    assert infer(store_client)[:2] == ("1", 1.0)
    states = {m["name"]: m for m in store_client.get("/models").get_json()["models"]}
    assert states["default"]["state"] == "failed" and states["default"]["version"] == "2"


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_hot_swap_on_cuda_under_concurrent_requests(tmp_path, tiny_models):
    """The pipelined CUDA executor: weight pushes while requests run; every answer matches its version."""
    store_app = make_store_app(tmp_path, tiny_models, device="cuda")
    assert store_app.test_client().get("/model_info").get_json()["device"].startswith("cuda")
    errors, _ = pushes_under_load(store_app, [100.0 + i for i in range(2, 6)])
    assert errors == [] and infer(store_app.test_client())[:2] == ("5", 105.0)
    runtime_of(store_app).stop(5)


def test_updates_show_in_the_metrics(store_client):
    def scrape():
        return store_client.get("/metrics").get_data(as_text=True)

    before = scrape()
    assert push(store_client, tiny_weights(2.0)).status_code == 200
    assert push(store_client, _nan_weights()).status_code == 422
    after = scrape()
    assert (
        metric(after, "policy_model_reloads_total", model="default")
        - metric(before, "policy_model_reloads_total", model="default")
        == 1
    )
    assert (
        metric(after, "policy_model_updates_refused_total") - metric(before, "policy_model_updates_refused_total") == 1
    )
    assert metric(after, "policy_model_version", model="default") == 2
