"""Episodes on one in-process worker over a model store: pins across updates, retention and its
end, canary assignment, promotion, outcomes, the headers refused, and the openpi connection's
pin. Every action of the tiny model equals its weights' tag, so each answer proves which
version computed it (tests/tiny_model.py); the live, multi-worker checks are in
test_episodes_live.py."""

from __future__ import annotations

import json
import time

import pytest
from prometheus_client import REGISTRY

import openpi_wire
from binary_protocol import dict_to_binary
from policy_server.inputs.episodes import canary_share
from policy_server.openpi.session import OpenpiSession
from tests.support.apps import runtime_of
from tests.support.fakes import fake_observation
from tests.support.store_app import BINARY, infer, make_store_app, push
from tests.support.tiny_model import tiny_weights
from tests.support.wait import eventually

RETAIN_S = 0.6


@pytest.fixture
def app(tmp_path, tiny_models):  # version 1 answers 1.0
    app = make_store_app(tmp_path, tiny_models, retain_previous_s=RETAIN_S)
    yield app
    runtime_of(app).stop(5)


@pytest.fixture
def client(app):
    return app.test_client()


def pinned(client, version, episode=None, route="/infer"):
    headers = {"X-Model-Version": str(version)}
    if episode is not None:
        headers["X-Episode-Id"] = episode
    return client.post(route, data=dict_to_binary(fake_observation(0)), headers={**BINARY, **headers})


def detail(client, name="default"):
    response = client.get(f"/models/{name}")
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_a_pin_is_answered_by_exactly_its_version_across_an_update_and_a_version_not_served_is_409(app, client):
    batches = runtime_of(app).batcher
    assert push(client, tiny_weights(2.0)).status_code == 200  # version 2
    assert infer(client)[:2] == ("2", 2.0)
    assert infer(client, headers={"X-Model-Version": "1"})[:2] == ("1", 1.0)  # the retained version
    assert infer(client, "/models/default/infer", headers={"X-Model-Version": "2"})[:2] == ("2", 2.0)
    before = batches.requests
    refused = pinned(client, 9)
    assert refused.status_code == 409
    assert refused.get_json() == {
        "error": "version not served", "model": "default", "version": "9", "served_versions": ["2", "1"],
        "detail": refused.get_json()["detail"],
    }
    assert "does not serve version 9 (it serves 2, 1)" in refused.get_json()["detail"]
    assert batches.requests == before  # nothing computed
    info = detail(client)
    assert (info["version"], info["stable_version"], info["canary"]) == ("2", "2", None)
    assert info["retained"]["version"] == "1" and info["retain_previous_s"] == RETAIN_S
    held = {v["version"]: v for v in info["held_versions"]}
    assert {v: h["role"] for v, h in held.items()} == {"2": "stable", "1": "retained"}
    assert held["1"]["weight_bytes"] == (70 * 7 + 70) * 4 and info["held_bytes"] == 2 * held["1"]["weight_bytes"]


def test_the_retained_version_stays_while_pinned_requests_come_and_goes_a_window_after_the_last(app, client):
    assert push(client, tiny_weights(2.0)).status_code == 200
    runtime = runtime_of(app)
    keep_until = time.monotonic() + 2.5 * RETAIN_S  # pinned requests past the first window keep it
    while time.monotonic() < keep_until:
        assert infer(client, headers={"X-Model-Version": "1"})[:2] == ("1", 1.0)
        time.sleep(RETAIN_S / 6)
    last = time.monotonic()
    eventually(lambda: runtime.held("default").retained is None, 10, "the retained version unloaded")
    assert time.monotonic() - last >= RETAIN_S * 0.9
    assert pinned(client, 1).status_code == 409
    after = detail(client)
    assert [v["version"] for v in after["held_versions"]] == ["2"]
    assert after["retained"] is None  # the pointer still names version 1; no longer held, it is not listed
    assert runtime.store.pinned_use("default", 1) is not None  # the fleet was told of the use


def test_without_retention_the_superseded_version_is_gone_at_once(tmp_path, tiny_models):
    app = make_store_app(tmp_path, tiny_models, retain_previous_s=0)
    try:
        client = app.test_client()
        assert push(client, tiny_weights(2.0)).status_code == 200
        assert pinned(client, 1).status_code == 409 and infer(client)[:2] == ("2", 2.0)
    finally:
        runtime_of(app).stop(5)


def test_a_canary_assigns_episodes_by_their_hash_and_ends_promoted_or_retained(app, client):
    assert push(client, tiny_weights(3.0), canary=0.4).status_code == 200  # version 2, the candidate
    info = detail(client)
    assert (info["stable_version"], info["canary"]["version"], info["canary"]["fraction"]) == ("1", "2", 0.4)
    ids = [f"ep-{i}" for i in range(60)]
    got = {e: infer(client, headers={"X-Episode-Id": e})[:2] for e in ids}
    expected = {e: ("2", 3.0) if canary_share("default", "2", e) < 0.4 else ("1", 1.0) for e in ids}
    assert got == expected and 10 < sum(v == "2" for v, _ in got.values()) < 40
    assert all(infer(client)[:2] == ("1", 1.0) for _ in range(5))  # no episode id: the stable version
    assert infer(client, headers={"X-Model-Version": "1", "X-Episode-Id": "ep-0"})[:2] == ("1", 1.0)  # a pin wins
    conflict = push(client, tiny_weights(4.0))
    assert conflict.status_code == 409 and "runs a canary of version 2" in conflict.get_json()["detail"]
    ended = client.post("/update_model?wait_s=5", json={"canary": 0}).get_json()
    assert (ended["version"], ended["canary"], ended["retained"]["version"], ended["all_workers"]) == (1, None, 2, True)
    assert all(infer(client, headers={"X-Episode-Id": e})[:2] == ("1", 1.0) for e in ids[:10])
    assert infer(client, headers={"X-Model-Version": "2"})[:2] == ("2", 3.0)  # its episodes finish on it
    again = client.post("/update_model?wait_s=5", json={"version": 2, "canary": 0.5}).get_json()
    assert again["canary"] == {"version": 2, "fraction": 0.5} and again["all_workers"]
    promoted = client.post("/update_model?wait_s=5", json={"version": 2}).get_json()
    assert (promoted["version"], promoted["previous"], promoted["canary"], promoted["retained"]["version"]) == \
        (2, 1, None, 1)
    assert infer(client)[:2] == ("2", 3.0) and infer(client, headers={"X-Model-Version": "1"})[:2] == ("1", 1.0)


@pytest.mark.parametrize("body, status, words", [
    ({"canary": 1.0}, 400, "canary must be a number in [0, 1)"),
    ({"canary": 0.3}, 409, "runs no canary"),
    ({"version": 1, "canary": 0.3}, 409, "stable version"),
    ({"version": 7, "canary": 0.3}, 404, "no version 7"),
    ({"model_path": "tiny", "canary": 0}, 400, "canary 0 ends a canary"),
    ({"model_path": "tiny", "version": 1}, 400, "give exactly one of"),
])
def test_canary_commands_that_cannot_be_done_are_refused_naming_why(client, body, status, words):
    response = client.post("/update_model?wait_s=0", json=body)
    assert response.status_code == status and words in response.get_json()["detail"], response.get_json()


@pytest.mark.parametrize("headers, named", [
    ({"X-Model-Version": "v2"}, "X-Model-Version"),
    ({"X-Model-Version": "1.5"}, "X-Model-Version"),
    ({"X-Episode-Id": "has space"}, "X-Episode-Id"),
    ({"X-Episode-Id": "x" * 129}, "X-Episode-Id"),
    ({"X-Episode-Id": "a/b"}, "X-Episode-Id"),
])
def test_bad_headers_are_400_naming_the_header_on_every_http_wire(client, headers, named):
    for route in ("/infer", "/models/default/infer"):
        response = client.post(route, data=dict_to_binary(fake_observation(0)), headers={**BINARY, **headers})
        assert response.status_code == 400 and named in response.get_json()["detail"], response.get_json()
    response = client.post("/v2/models/default/infer", data=oip_json(), headers={**headers,
                           "Content-Type": "application/json"})
    assert response.status_code == 400 and named in response.get_json()["detail"], response.get_json()


def oip_json(**parameters) -> bytes:
    obs = fake_observation(0)
    inputs = [{"name": k, "datatype": "FP32" if v.dtype.kind == "f" else "UINT8", "shape": [1, *v.shape],
               "data": v.ravel().tolist()} for k, v in obs.items()]
    return json.dumps({"inputs": inputs, "parameters": parameters}).encode()


def oip_answer(response) -> tuple[str, float]:
    assert response.status_code == 200, response.get_json()
    answer = response.get_json()
    return answer["model_version"], answer["outputs"][0]["data"][0]


def test_oip_pins_by_its_versioned_route_and_takes_the_episode_as_a_parameter(app, client):
    assert push(client, tiny_weights(3.0), canary=0.5).status_code == 200
    assert oip_answer(client.post("/v2/models/default/versions/1/infer", data=oip_json())) == ("1", 1.0)
    assert oip_answer(client.post("/v2/models/default/versions/2/infer", data=oip_json())) == ("2", 3.0)
    assert client.post("/v2/models/default/versions/5/infer", data=oip_json()).status_code == 409
    for episode in ("a", "b", "c", "d", "e", "f"):
        want = "2" if canary_share("default", "2", episode) < 0.5 else "1"
        assert oip_answer(client.post("/v2/models/default/infer", data=oip_json(episode_id=episode)))[0] == want
    bad = client.post("/v2/models/default/infer", data=oip_json(episode_id="no spaces"))
    assert bad.status_code == 400 and "parameter 'episode_id'" in bad.get_json()["detail"]
    assert client.get("/v2/models/default/versions/2/ready").get_json()["ready"] is True
    assert client.get("/v2/models/default").get_json()["versions"] == ["1", "2"]  # what a request may pin


def test_outcomes_are_counted_per_version_and_bad_reports_refused_naming_the_field(app, client):
    def count(version, outcome):
        labels = {"model": "default", "version": version, "outcome": outcome}
        return REGISTRY.get_sample_value("policy_episode_outcomes_total", labels) or 0.0

    assert push(client, tiny_weights(2.0)).status_code == 200
    before = (count("1", "success"), count("2", "failure"))
    for body in ({"episode_id": "e1", "version": 1, "success": True, "return": -2.5},
                 {"episode_id": "e2", "version": "2", "success": False}):
        answer = client.post("/models/default/outcomes", json=body)
        assert answer.status_code == 200, answer.get_json()
    assert (count("1", "success"), count("2", "failure")) == (before[0] + 1, before[1] + 1)
    assert REGISTRY.get_sample_value("policy_episode_return_sum", {"model": "default", "version": "1"}) <= -2.5
    refusals = [
        ({"version": 1, "success": True}, 400, "episode_id is required"),
        ({"episode_id": None, "version": 1, "success": True}, 400, "episode_id is required"),
        ({"episode_id": "e3", "version": 1, "success": True, "return": 10 ** 400}, 400, "return must be"),
        ({"episode_id": "e3", "version": 1, "success": True, "return": True}, 400, "return must be"),
        ({"episode_id": "e 3", "version": 1, "success": True}, 400, "episode_id must be"),
        ({"episode_id": "e3", "version": 1, "success": 1}, 400, "success must be true or false"),
        ({"episode_id": "e3", "version": 1, "success": True, "return": "nan"}, 400, "return must be"),
        ({"episode_id": "e3", "version": 1, "success": True, "extra": 1}, 400, "unknown field 'extra'"),
        ({"episode_id": "e3", "version": 77, "success": True}, 404, "no version 77"),
        ({"episode_id": "e3", "version": [1], "success": True}, 400, "version must be"),
    ]
    for body, status, words in refusals:
        response = client.post("/models/default/outcomes", json=body)
        assert response.status_code == status and words in response.get_json()["detail"], (body, response.get_json())
    assert client.post("/models/nope/outcomes", json={"episode_id": "e", "version": 1, "success": True}) \
        .status_code == 404
    assert client.post("/models/default/outcomes", data="x", content_type="text/plain").status_code == 415


def test_an_openpi_connection_holds_its_first_answers_version_until_a_reset_or_a_new_session(app, client):
    runtime = runtime_of(app)
    config = runtime.config
    session = OpenpiSession(runtime, config, None, "ws:/", "127.0.0.1", observe=lambda **_: None)
    session.greeting()

    def frame(**fields):
        reply = session.handle(openpi_wire.encode({**fake_observation(0), **fields}), time.monotonic())
        if isinstance(reply.data, str):
            return reply.data
        answer = openpi_wire.decode(reply.data)
        return answer["model_version"], float(answer["actions"].flat[0])

    assert frame(session_id="run-1") == ("1", 1.0)
    assert push(client, tiny_weights(2.0)).status_code == 200
    assert frame() == ("1", 1.0)  # the connection holds version 1
    assert session.handle(openpi_wire.encode({"endpoint": "reset"}), time.monotonic()).data == "reset successful"
    assert frame() == ("2", 2.0)  # a new episode: pinned anew
    assert frame(model_version=1) == ("1", 1.0)  # a frame may pin itself
    assert frame(session_id="run-2") == ("2", 2.0)  # another session: its first answer pins it
    assert frame(model_version=8).startswith("409 version not served: model 'default' does not serve version 8")
    assert frame(model_version="x").startswith("400 bad request: model_version must be")
    assert frame(session_id=42) == ("2", 2.0)  # a number is its digits: another session
    for bad in ("", "é ü", "a" * 129, 1.5, [1]):  # as X-Episode-Id: 400 naming the field
        assert frame(session_id=bad).startswith("400 bad request: session_id must be 1-128 characters"), bad


def test_a_pin_to_a_version_the_store_names_but_this_worker_has_not_loaded_yet_is_503_not_409(tmp_path, tiny_models):
    app = make_store_app(tmp_path, tiny_models, store_poll_ms=60_000)  # the watcher does not poll here
    try:
        client, runtime = app.test_client(), runtime_of(app)
        store = runtime.store
        store.publish("default", store.stage("default", str(tiny_models / "tiny")), canary=0.5)  # another instance
        waiting = pinned(client, 2)
        assert waiting.status_code == 503 and waiting.headers["Retry-After"] == "1"
        assert "version 2 is loading on this worker" in waiting.get_json()["detail"]
        assert pinned(client, 3).status_code == 409  # a version the store does not name
        runtime.follower.sync()
        assert infer(client, headers={"X-Model-Version": "2"})[:2] == ("2", 1.0)
    finally:
        runtime_of(app).stop(5)
