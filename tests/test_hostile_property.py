"""Structurally hostile bodies, generated: every field of an Open Inference Protocol request, of
an encoded-image marker and of an openpi frame takes values of the wrong kind, wrong size or
absurd range. Every one is answered 4xx naming what is wrong (JSON over HTTP, a text frame and
a close on openpi's wire), or 200 when it happens to be valid, never 5xx, and the worker
answers a good request exactly as before."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import openpi_wire
from binary_protocol import dict_to_binary
from policy_client.image_codecs import encode_array
from policy_server.oip import codec as oip
from policy_server.oip import json_data as oip_json
from tests.support.apps import make_app, runtime_of
from tests.support.fakes import FakePolicy, expected_action, fake_observation

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HUGE = 2**31 - 1
WRONG_KINDS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=8),
    st.lists(st.integers(0, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@pytest.fixture(scope="module")
def client():
    policy = FakePolicy()
    policy.encoded_inputs = ("image",)
    return make_app(policy).test_client()


def assert_refused_or_served(response) -> None:
    assert response.status_code < 500, response.get_data(as_text=True)
    if response.status_code != 200:
        payload = response.get_json()
        assert set(payload) >= {"error", "detail"} and payload["error"], payload


def assert_worker_unchanged(client) -> None:
    obs = fake_observation(7)
    body = dict_to_binary(obs)
    response = client.post("/infer", data=body, environ_overrides={"CONTENT_LENGTH": str(len(body))})
    assert response.status_code == 200
    from binary_protocol import binary_to_dict

    np.testing.assert_array_equal(binary_to_dict(response.data)["action"], expected_action(obs))


# -- Open Inference Protocol --------------------------------------------------------


def valid_request() -> tuple[dict, bytes]:
    """A request the fake model serves: state as JSON, the image as binary data, both outputs asked."""
    obs = fake_observation(3)
    header = {
        "id": "r-1",
        "parameters": {"timeout": 5_000_000, "binary_data_output": False},
        "inputs": [
            {"name": "state", "datatype": "FP32", "shape": [1, 6], "data": obs["state"].tolist()},
            {"name": "image", "datatype": "UINT8", "shape": [1, 8, 8, 3], "parameters": {"binary_data_size": 192}},
        ],
        "outputs": [{"name": "action", "parameters": {"binary_data": True}}],
    }
    return header, obs["image"].tobytes()


# Where a mutation may land in valid_request(), and the values it may put there.
PATHS = [
    ("id",), ("parameters",), ("parameters", "timeout"), ("parameters", "binary_data_output"), ("inputs",),
    ("inputs", 0), ("inputs", 1), ("inputs", 0, "name"), ("inputs", 1, "name"), ("inputs", 0, "datatype"),
    ("inputs", 1, "datatype"), ("inputs", 0, "shape"), ("inputs", 1, "shape"), ("inputs", 0, "shape", 0),
    ("inputs", 0, "shape", 1), ("inputs", 1, "shape", 3), ("inputs", 0, "data"), ("inputs", 0, "data", 2),
    ("inputs", 1, "data"), ("inputs", 0, "parameters"), ("inputs", 1, "parameters"),
    ("inputs", 1, "parameters", "binary_data_size"), ("outputs",), ("outputs", 0), ("outputs", 0, "name"),
    ("outputs", 0, "parameters"), ("outputs", 0, "parameters", "binary_data"),
]
VALUES = st.one_of(
    WRONG_KINDS,
    st.sampled_from([0, 1, 2, 6, 192, HUGE, 2**40, -1, 10**400, float("inf"), "FP32", "UINT8", "BYTES", "",
                     [0, HUGE, HUGE, HUGE], [2, 6], [1, 6, 1], [[0.0] * 6], [float("nan")] * 6, [1e400] * 6,
                     [[[0]]], ["a"] * 6, [True] * 6, {"binary_data_size": 0}, [{"name": "action"}] * 70]),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=12),
)


def mutate(header: dict, path: tuple, value, delete: bool) -> None:
    """Put ``value`` at ``path`` in ``header`` (or delete what is there), wherever the path still leads."""
    target = header
    for key in path[:-1]:
        try:
            target = target[key]
        except (KeyError, IndexError, TypeError):
            return
    key = path[-1]
    if isinstance(target, dict) or (isinstance(target, list) and isinstance(key, int) and key < len(target)):
        if delete and isinstance(target, dict):
            target.pop(key, None)
        else:
            target[key] = value


def post_oip(client, body: bytes, header_length: int | None):
    headers = {oip.HEADER_LENGTH: str(header_length)} if header_length is not None else {}
    return client.post(
        "/v2/models/default/infer", data=body, headers=headers,
        environ_overrides={"CONTENT_LENGTH": str(len(body))},
    )


@SETTINGS
@given(
    mutations=st.lists(st.tuples(st.sampled_from(PATHS), VALUES, st.booleans()), min_size=1, max_size=3),
    tail=st.one_of(st.none(), st.binary(max_size=400)),
    all_json=st.booleans(),
)
def test_hostile_oip_bodies_are_4xx_never_5xx(client, mutations, tail, all_json):
    header, pixels = valid_request()
    for path, value, delete in mutations:
        mutate(header, path, value, delete)
    try:
        encoded = json.dumps(header).encode()
    except (ValueError, OverflowError):
        return
    binary = pixels if tail is None else tail
    if all_json:  # no binary part: a header that still declares binary data is refused for it
        response = post_oip(client, encoded, None)
    else:
        response = post_oip(client, encoded + binary, len(encoded))
    timeout = header.get("parameters", {}).get("timeout") if isinstance(header.get("parameters"), dict) else None
    if response.status_code == 504:  # a mutated timeout of a few microseconds: a deadline, rightly missed
        assert isinstance(timeout, int) and timeout < 1_000_000, (timeout, response.get_data(as_text=True))
        return
    assert_refused_or_served(response)


@pytest.mark.parametrize(
    "tensor, fragment",
    [
        ({"datatype": ["FP32"]}, "unsupported datatype 'list'"),
        ({"datatype": {"FP32": 1}}, "unsupported datatype 'dict'"),
        ({"shape": [0, HUGE, HUGE, HUGE], "data": []}, "larger than any tensor"),
        ({"shape": [0, HUGE, HUGE, HUGE], "parameters": {"binary_data_size": 0}, "data": None}, "larger than any"),
        ({"data": "not an array"}, "'data' must be an array"),
        ({"name": 7}, "'name' must be a string"),
    ],
)
def test_the_faults_of_the_red_team_name_the_field(client, tensor, fragment):
    state = {"name": "state", "datatype": "FP32", "shape": [1, 6], "data": [0.0] * 6}
    state.update(tensor)
    if state.get("data", 0) is None:
        del state["data"]
    image = {"name": "image", "datatype": "UINT8", "shape": [1, 8, 8, 3], "data": [0] * 192}
    response = post_oip(client, json.dumps({"inputs": [state, image]}).encode(), None)
    assert response.status_code == 400, response.get_data(as_text=True)
    assert fragment in response.get_json()["detail"]
    assert_worker_unchanged(client)


@pytest.mark.parametrize("timeout", [10**400, 10**13, -1, 0, 1.5, True, "soon"])
def test_a_timeout_parameter_of_any_kind_or_size_is_400(client, timeout):
    body = json.dumps({"inputs": [{"name": "state", "datatype": "FP32", "shape": [1, 6], "data": [0.0] * 6}],
                       "parameters": {"timeout": timeout}}).encode()
    response = post_oip(client, body, None)
    assert response.status_code == 400 and "timeout" in response.get_json()["detail"]


def test_declared_shapes_are_checked_against_the_spec_before_any_data_converts(client, monkeypatch):
    """A body of many numbers for a shape the model does not take is refused from
    its declaration: the data is never converted."""
    monkeypatch.setattr(oip_json, "_json_step", lambda *a, **k: pytest.fail("data was converted"))
    big = {"name": "state", "datatype": "FP32", "shape": [1, 150_000], "data": [0.0] * 150_000}
    response = post_oip(client, json.dumps({"inputs": [big]}).encode(), None)
    assert response.status_code == 422 and "expected shape [-1, 6]" in response.get_json()["detail"]
    extra = {"name": "extra", "datatype": "FP32", "shape": [1, 100_000], "data": [0.0] * 100_000}
    response = post_oip(client, json.dumps({"inputs": [extra]}).encode(), None)
    assert response.status_code == 422 and "unexpected input 'extra'" in response.get_json()["detail"]


def test_nested_and_flat_json_convert_alike_in_steps(monkeypatch):
    monkeypatch.setattr(oip_json, "JSON_STEP_ELEMENTS", 7)  # many steps for a small tensor
    values = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    for data in (values.ravel().tolist(), values.tolist()):
        header = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3, 4], "data": data}]}
        decoded = oip.decode_request(json.dumps(header).encode(), None, 1 << 20)
        np.testing.assert_array_equal(decoded.inputs["x"], values)
    ragged = values.tolist()
    ragged[1][2] = ragged[1][2][:3]
    header = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3, 4], "data": ragged}]}
    with pytest.raises(oip.BadRequest, match="rectangular"):
        _ = oip.decode_request(json.dumps(header).encode(), None, 1 << 20).inputs


# -- encoded-image markers ----------------------------------------------------------


def codecs():
    return st.one_of(
        st.sampled_from(["jpeg", "png"]), st.sampled_from(["webp", "", "JPEG"]), st.integers(), st.none(),
        st.lists(st.integers(0, 3)), st.builds(lambda n: np.arange(n), st.integers(0, 3)), st.binary(max_size=4),
    )


def payloads():
    image = fake_observation()["image"]
    good = [np.frombuffer(encode_array(image, codec, 90), np.uint8) for codec in ("png", "jpeg")]
    return st.one_of(
        st.sampled_from(good),
        st.binary(max_size=300).map(lambda b: np.frombuffer(b, np.uint8)),
        st.binary(min_size=8, max_size=64).map(lambda b: np.frombuffer(b[: len(b) // 4 * 4], np.float32)),
        st.just(np.zeros((4, 4), np.uint8)),
        st.text(max_size=4), st.binary(max_size=8), st.none(), st.integers(), st.lists(st.integers(0, 3), max_size=3),
    )


def markers():
    return st.one_of(
        st.fixed_dictionaries({"codec": codecs(), "data": payloads()}),
        st.fixed_dictionaries({"codec": codecs()}, optional={"data": payloads(), "extra": st.integers()}),
    )


@SETTINGS
@given(marker=markers(), rows=st.one_of(st.none(), st.integers(1, 4), st.just(10**6)), listed=st.booleans())
def test_hostile_image_markers_are_4xx_never_5xx(client, marker, rows, listed):
    obs = fake_observation()
    value = [marker] * (rows if rows and rows < 10 else 2) if listed else marker
    state = np.stack([obs["state"]] * rows) if rows and rows < 10 else obs["state"]
    try:
        body = dict_to_binary({"state": state, "image": value})
    except (ValueError, TypeError):  # the client's encoder refuses it: nothing to send
        return
    headers = {"X-Batch-Rows": str(rows)} if rows else {}
    response = client.post("/infer", data=body, headers=headers, environ_overrides={"CONTENT_LENGTH": str(len(body))})
    assert_refused_or_served(response)


def test_after_every_generated_body_the_worker_answers_as_before(client):
    assert_worker_unchanged(client)
    assert not runtime_of(client.application).batcher_lost


# -- openpi's WebSocket wire ----------------------------------------------------------


def openpi_array(dtype: str, data: bytes, shape) -> dict:
    return {"__ndarray__": True, "data": data, "dtype": dtype, "shape": shape}


ARRAY_VALUES = {
    "__ndarray__": st.one_of(st.just(True), WRONG_KINDS),
    "dtype": st.one_of(
        st.sampled_from(["<f4", "|O8", "|O", "<f8", ">f4", "=f4", "|u1", "<i8", "|b1", "<c8", "|V8", "<U4",
                         "<M8", "|S4", "<f16", "<f3", "f4", "<f 4", "<f4\x00", "<f04", "|i4", "<u128"]),
        WRONG_KINDS, st.binary(max_size=6),
    ),
    "shape": st.one_of(
        st.sampled_from([[6], [1, 6], [0, HUGE, HUGE], [-1], [HUGE, HUGE], [6.0], [True], [2**64], [[6]], [0] * 40]),
        WRONG_KINDS,
    ),
    "data": st.one_of(st.binary(max_size=64), WRONG_KINDS, st.just(b"\x41" * 48)),
    "extra": WRONG_KINDS,
}
FIELD_VALUES = st.one_of(
    WRONG_KINDS,
    st.binary(max_size=16),
    st.sampled_from([b"\xff\xfe", "\udcff", "x" * 70_000, [[[[[[[]]]]]]], {"cam": {"x": {}}},
                     openpi_array("<f4", b"\0" * 8, [2]), openpi_array("<i8", b"\0" * 8, [])]),
)


@st.composite
def openpi_frames(draw) -> bytes:
    """A valid observation map, then a few fields or array members replaced, added or removed."""
    import msgpack

    obs = fake_observation(4)
    frame = {
        "state": openpi_array("<f4", obs["state"].tobytes(), list(obs["state"].shape)),
        "image": openpi_array("|u1", obs["image"].tobytes(), list(obs["image"].shape)),
    }
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["state", "image", "prompt", "deadline_ms", "session_id", "model_version",
                                      "endpoint", "images", "other"]))
        if where in ("state", "image") and isinstance(frame[where], dict) and draw(st.booleans()):
            member = draw(st.sampled_from(sorted(ARRAY_VALUES)))
            if draw(st.booleans()) and member != "extra":
                frame[where].pop(member, None)
            else:
                frame[where][member] = draw(ARRAY_VALUES[member])
        else:
            frame[where] = draw(FIELD_VALUES)
    try:
        payload = msgpack.packb(frame, use_bin_type=True)
    except (ValueError, TypeError, OverflowError):  # a value msgpack cannot write: send garbage instead
        payload = draw(st.binary(max_size=64))
    return payload[: draw(st.integers(0, len(payload)))] if draw(st.integers(0, 9)) == 0 else payload


@SETTINGS
@given(payload=openpi_frames())
def test_hostile_openpi_frames_are_refused_4xx_never_5xx(client, payload):
    from policy_server.openpi.session import OpenpiSession

    runtime = runtime_of(client.application)
    session = OpenpiSession(runtime, runtime.config, None, "ws:/", "127.0.0.1", observe=lambda **_: None)
    assert session.greeting() is not None
    reply = session.handle(payload, time.monotonic())
    if reply.data == "reset successful":  # a generated endpoint that happens to be RoboArena's reset
        return
    if isinstance(reply.data, str):  # a refusal: a text frame naming what is wrong, then close
        status = reply.data.split(" ", 1)[0]
        if status == "504":  # a generated deadline_ms too short for this box: rightly missed
            import msgpack

            deadline = msgpack.unpackb(payload)["deadline_ms"]
            assert isinstance(deadline, (int, float)) and deadline < 1_000, (deadline, reply.data)
            return
        assert status.isdigit() and 400 <= int(status) < 500 and status != "499", reply.data
        assert "Traceback" not in reply.data and reply.close is not None, reply.data
    else:
        answer = openpi_wire.decode(reply.data)
        assert answer["actions"].shape == answer["action"].shape and np.isfinite(answer["actions"]).all()
