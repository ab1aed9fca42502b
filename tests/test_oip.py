"""Open Inference Protocol v2: the codec and routes in-process (hostile bodies included), and
conformance against Triton's official client (tritonclient) and a hand-built raw-socket request
on a real gunicorn."""

from __future__ import annotations

import json
import logging
import socket

import numpy as np
import pytest

from policy_server.errors import BadRequest, PayloadTooLarge
from policy_server.oip import codec as oip
from request_tools import PolicyClient
from tests.support.apps import make_app, runtime_of
from tests.support.fakes import expected_action, fake_observation
from tests.support.prometheus import metric
from tests.support.serving import run_server

KEY = "oip-test-key-0123"


def oip_body(obs, *, binary=("image",), outputs=None, parameters=None, rows=1, **extra):
    """A request for ``obs`` (one observation, repeated ``rows`` times): (body, header length or None)."""
    inputs, chunks = [], []
    for name, value in obs.items():
        batch = np.stack([value] * rows)
        entry = {"name": name, "datatype": oip.datatype_of(batch.dtype), "shape": list(batch.shape)}
        if name in binary:
            raw = batch.astype(batch.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = batch.ravel().tolist()
        inputs.append(entry)
    header = {"inputs": inputs, **extra}
    if outputs is not None:
        header["outputs"] = outputs
    if parameters is not None:
        header["parameters"] = parameters
    encoded = json.dumps(header).encode()
    return encoded + b"".join(chunks), (len(encoded) if chunks else None)


def post(client, path, body, header_length=None, headers=None):
    headers = dict(headers or {})
    if header_length is not None:
        headers[oip.HEADER_LENGTH] = str(header_length)
    return client.post(path, data=body, headers=headers, environ_overrides={"CONTENT_LENGTH": str(len(body))})


def split_response(response):
    length = response.headers.get(oip.HEADER_LENGTH)
    if length is None:
        return response.get_json(), b""
    return json.loads(response.data[: int(length)]), response.data[int(length):]


@pytest.fixture(scope="module")
def app():
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


# -- codec ---------------------------------------------------------------------------


def test_datatypes_map_both_ways():
    assert oip.datatype_of("float32") == "FP32" and oip.datatype_of(">f4") == "FP32"
    assert oip.datatype_of("uint8") == "UINT8" and oip.datatype_of("bool") == "BOOL"
    with pytest.raises(ValueError):
        oip.datatype_of("complex64")


def test_binary_inputs_are_views_into_the_body_and_json_inputs_are_typed():
    obs = fake_observation(2)
    body, length = oip_body(obs)
    request = oip.decode_request(body, length, 1 << 20)
    assert request.inputs["image"].base is not None and not request.inputs["image"].flags.writeable
    np.testing.assert_array_equal(request.inputs["image"][0], obs["image"])
    assert request.inputs["state"].dtype == np.float32
    np.testing.assert_array_equal(request.inputs["state"][0], obs["state"])


@pytest.mark.parametrize(
    "data, datatype, fragment",
    [
        ([1.5, 2.0], "INT32", "holds float64"),
        ([300, 1], "UINT8", "does not fit"),
        ([-1, 1], "UINT8", "does not fit"),
        (["a", "b"], "FP32", "holds str"),
        ([[1.0], [2.0, 3.0]], "FP32", "rectangular"),
        ([1.0, 2.0, 3.0], "FP32", "3 elements"),
        ([True, False], "FP32", "holds bool"),
    ],
)
def test_json_data_is_strictly_typed(data, datatype, fragment):
    header = {"inputs": [{"name": "x", "datatype": datatype, "shape": [2], "data": data}]}
    with pytest.raises(BadRequest, match=fragment):
        _ = oip.decode_request(json.dumps(header).encode(), None, 1 << 20).inputs


def test_binary_bool_bytes_must_be_0_or_1():
    header = json.dumps({"inputs": [{"name": "b", "datatype": "BOOL", "shape": [3],
                                     "parameters": {"binary_data_size": 3}}]}).encode()
    assert oip.decode_request(header + b"\x00\x01\x01", len(header), 1 << 20).inputs["b"].tolist() == [
        False,
        True,
        True,
    ]
    with pytest.raises(BadRequest, match="0 or 1"):
        _ = oip.decode_request(header + b"\x00\x02\x01", len(header), 1 << 20).inputs


def test_response_json_and_binary_outputs():
    outputs = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([[1, 2]], dtype=np.int32)}
    body, length = oip.encode_response("m", "3", outputs, {"a": True, "b": False}, "req-1")
    header = json.loads(body[:length])
    assert header["id"] == "req-1" and header["model_version"] == "3"
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 24
    np.testing.assert_array_equal(np.frombuffer(body[length:], "<f4").reshape(2, 3), outputs["a"])
    assert header["outputs"][1] == {"name": "b", "datatype": "INT32", "shape": [1, 2], "data": [1, 2]}
    body, length = oip.encode_response("m", "3", outputs, {}, None)
    assert length is None and "id" not in json.loads(body)


def test_header_length_checks():
    assert oip.parse_header_length(None, 10, 100) is None
    with pytest.raises(BadRequest, match="past the end"):
        oip.parse_header_length("11", 10, 100)
    with pytest.raises(PayloadTooLarge):
        oip.parse_header_length("1000", 5000, 100)
    for raw in ("x", "-1", "0", "+3", "3_1", "\u0663"):
        with pytest.raises(BadRequest, match="Inference-Header-Content-Length must be a positive integer"):
            oip.parse_header_length(raw, 10, 100)


# -- routes in-process ---------------------------------------------------------------


def test_metadata_live_ready(client):
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    meta = client.get("/v2/models/default").get_json()
    assert meta["versions"] == ["fake-1"]
    assert meta["inputs"] == [
        {"name": "state", "datatype": "FP32", "shape": [-1, 6]},
        {"name": "image", "datatype": "UINT8", "shape": [-1, 8, 8, 3]},
    ]
    assert meta["outputs"] == [{"name": "action", "datatype": "FP32", "shape": [-1, 10, 7]}]
    assert client.get("/v2/models/default/versions/fake-1").get_json() == meta
    assert client.get("/v2/models/default/ready").get_json()["ready"] is True
    assert "binary_tensor_data" in client.get("/v2").get_json()["extensions"]


def test_infer_json_and_binary(client):
    obs = fake_observation(3)
    body, length = oip_body(obs, binary=(), outputs=[{"name": "action"}], id="abc")
    response = post(client, "/v2/models/default/infer", body, length)
    assert response.status_code == 200 and response.mimetype == "application/json"
    header, _ = split_response(response)
    assert header["id"] == "abc" and header["model_name"] == "default" and header["model_version"] == "fake-1"
    action = np.array(header["outputs"][0]["data"], np.float32).reshape(header["outputs"][0]["shape"])
    np.testing.assert_allclose(action[0], expected_action(obs), atol=1e-5)
    body, length = oip_body(obs, parameters={"binary_data_output": True})
    response = post(client, "/v2/models/default/versions/fake-1/infer", body, length)
    assert response.status_code == 200 and response.headers["X-Model-Version"] == "fake-1"
    header, raw = split_response(response)
    np.testing.assert_array_equal(np.frombuffer(raw, "<f4").reshape(1, 10, 7)[0], expected_action(obs))


def test_batch_dimension_is_a_vectorized_request(client):
    observations = [fake_observation(s) for s in range(5)]
    stacked = {k: np.stack([o[k] for o in observations]) for k in observations[0]}
    header = {
        "inputs": [
            {"name": "state", "datatype": "FP32", "shape": [5, 6], "data": stacked["state"].ravel().tolist()},
            {"name": "image", "datatype": "UINT8", "shape": [5, 8, 8, 3], "parameters": {"binary_data_size": 5 * 192}},
        ]
    }
    encoded = json.dumps(header).encode()
    response = post(client, "/v2/models/default/infer", encoded + stacked["image"].tobytes(), len(encoded))
    assert response.status_code == 200
    out = split_response(response)[0]["outputs"][0]
    action = np.array(out["data"], np.float32).reshape(out["shape"])
    assert action.shape == (5, 10, 7)
    for i, obs in enumerate(observations):
        np.testing.assert_allclose(action[i], expected_action(obs), atol=1e-5)
    assert int(response.headers["X-Batch-Size"]) <= 4  # split over batches of at most the cap


def test_access_log_metrics_and_stats_count_oip_requests(caplog):
    client = make_app().test_client()
    caplog.set_level(logging.INFO, logger="policy_server.access")
    before = client.get("/metrics").get_data(as_text=True)
    body, length = oip_body(fake_observation())
    post(client, "/v2/models/default/infer", body, length, {"X-Request-Id": "oip-1"})
    post(client, "/v2/models/default/infer", b'{"inputs": []}', None, {"X-Request-Id": "oip-2"})
    client.get("/v2/health/ready")  # a probe: DEBUG only
    after = client.get("/metrics").get_data(as_text=True)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "policy_server.access"]
    route = "/v2/models/<name>/infer"
    assert [(line["request_id"], line["route"], line["status"]) for line in lines] == [
        ("oip-1", route, 200),
        ("oip-2", route, 400),
    ]
    assert lines[0]["model"] == "default" and lines[0]["version"] == "fake-1" and lines[0]["batch_size"] == 1
    for status, count in (("200", 1), ("400", 1)):
        assert (
            metric(after, "policy_requests_total", route=route, status=status)
            - metric(before, "policy_requests_total", route=route, status=status)
            == count
        )
    stats = client.get("/stats").get_json()
    assert (stats["total_requests"], stats["failed_requests"]) == (2, 1)


def test_timeout_parameter_is_a_deadline_in_microseconds(client):
    body, length = oip_body(fake_observation(), parameters={"timeout": 1})
    response = post(client, "/v2/models/default/infer", body, length)
    assert response.status_code == 504 and "deadline" in response.get_json()["error"]


def test_keys_apply_and_probes_stay_open():
    client = make_app(api_key=KEY).test_client()
    body, length = oip_body(fake_observation())
    assert post(client, "/v2/models/default/infer", body, length).status_code == 401
    assert client.get("/v2/models/default").status_code == 401
    assert client.get("/v2/health/ready").status_code == 200 and client.get("/v2/health/live").status_code == 200
    assert post(client, "/v2/models/default/infer", body, length, {"X-API-Key": KEY}).status_code == 200


def test_every_503_says_when_to_come_back_as_on_our_own_routes(tmp_path):
    """A model that failed to load: readiness and inference are 503, each with Retry-After
    (the client retries only a 503 that carries it), on the OIP routes as on ours."""
    from policy_server.config import ServerConfig
    from server import create_app

    app = create_app(ServerConfig(model_path=str(tmp_path)))  # not a model directory
    runtime_of(app).start(block=True)
    client = app.test_client()
    body, length = oip_body(fake_observation())
    answers = {
        "/ready": client.get("/ready"),
        "/v2/health/ready": client.get("/v2/health/ready"),
        "/v2/models/default/ready": client.get("/v2/models/default/ready"),
        "/v2/models/default/infer": post(client, "/v2/models/default/infer", body, length),
    }
    assert {path: (r.status_code, r.headers.get("Retry-After")) for path, r in answers.items()} == {
        path: (503, "1") for path in answers
    }
    assert "failed to load" in answers["/v2/models/default/infer"].get_json()["error"]
    assert client.get("/v2/health/live").status_code == 200  # alive: only readiness fails


def _header(obs_header: dict) -> bytes:
    return json.dumps(obs_header).encode()


def _hostile_cases():
    state = {"name": "state", "datatype": "FP32", "shape": [1, 6], "data": [0.0] * 6}
    image = {"name": "image", "datatype": "UINT8", "shape": [1, 8, 8, 3], "parameters": {"binary_data_size": 192}}
    pixels = bytes(192)
    ok = _header({"inputs": [state, image]})
    lying = _header({"inputs": [state, {**image, "parameters": {"binary_data_size": 10**9}}]})
    short = _header({"inputs": [state, {**image, "parameters": {"binary_data_size": 100}}]})
    return {
        # (body, header length, expected status, fragment)
        "lying binary_data_size": (lying + pixels, len(lying), 400, "binary_data_size"),
        "size disagrees with shape": (short + pixels[:100], len(short), 400, "is not 192 x 1 bytes"),
        "more bytes than declared": (ok + pixels + b"x", len(ok), 400, "declare 192 bytes"),
        "fewer bytes than declared": (ok + pixels[:-1], len(ok), 400, "declare 192 bytes"),
        "header length past the body": (ok + pixels, len(ok) + 500, 400, "past the end"),
        "header length cuts the JSON": (ok + pixels, len(ok) - 3, 400, "does not parse"),
        "unknown datatype": (_header({"inputs": [{**state, "datatype": "FP8"}]}), None, 400, "unsupported datatype"),
        "BYTES for a tensor input": (
            _header({"inputs": [{**state, "datatype": "BYTES", "data": ["a"] * 6}]}), None, 422,
            "expected datatype FP32",
        ),
        "shape and data disagree": (
            _header({"inputs": [{**state, "shape": [2, 6]}]}),
            None,
            400,
            "shape [2, 6] needs 12",
        ),
        "negative dimension": (_header({"inputs": [{**state, "shape": [-1, 6]}]}), None, 400, "non-negative"),
        "binary data without the header length": (ok + pixels, None, 400, "does not parse"),
        "spec datatype mismatch": (
            _header({"inputs": [{**state, "datatype": "FP64"}]}),
            None,
            422,
            "expected datatype FP32",
        ),
        "per-sample shape mismatch": (
            _header({"inputs": [{**state, "shape": [1, 3, 2]}, {**image, "data": [0] * 192, "parameters": {}}]}),
            None,
            422,
            "state",
        ),
        "batch dimensions disagree": (
            _header(
                {
                    "inputs": [
                        {**state, "shape": [2, 6], "data": [0.0] * 12},
                        {**image, "data": [0] * 192, "parameters": {}},
                    ]
                }
            ),
            None,
            422,
            "batch dimension",
        ),
        "zero rows": (_header({"inputs": [{**state, "shape": [0, 6], "data": []}]}), None, 422, "at least 1"),
        "missing input": (_header({"inputs": [state]}), None, 422, "missing input 'image'"),
        "unknown output": (
            _header({"inputs": [state, {**image, "data": [0] * 192, "parameters": {}}], "outputs": [{"name": "nope"}]}),
            None,
            400,
            "no output 'nope'",
        ),
        "not JSON": (b"\x80\x05garbage", None, 400, "does not parse"),
        "JSON array": (b"[1, 2]", None, 400, "must be an object"),
        "deep nesting": (b'{"inputs": ' + b"[" * 100000 + b"]" * 100000 + b"}", None, 400, ""),
        "no inputs": (b'{"inputs": []}', None, 400, "'inputs'"),
        "both data and binary": (
            _header({"inputs": [{**image, "data": [0] * 192}]}) + pixels,
            len(_header({"inputs": [{**image, "data": [0] * 192}]})),
            400,
            "both",
        ),
        "timeout not a number": (_header({"inputs": [state], "parameters": {"timeout": "soon"}}), None, 400, "timeout"),
    }


@pytest.mark.parametrize("case", sorted(_hostile_cases()))
def test_hostile_bodies_are_4xx(client, case):
    body, length, status, fragment = _hostile_cases()[case]
    response = post(client, "/v2/models/default/infer", body, length)
    assert response.status_code == status, response.get_data(as_text=True)
    payload = response.get_json()
    assert fragment in payload["error"], payload
    assert post(client, "/v2/models/default/infer", *oip_body(fake_observation())).status_code == 200


def test_huge_json_header_is_413_before_parsing():
    client = make_app(oip_max_json_bytes=1000).test_client()
    body = json.dumps(
        {"inputs": [{"name": "state", "datatype": "FP32", "shape": [1, 6], "data": [0.0] * 6}], "pad": "x" * 2000}
    ).encode()
    assert post(client, "/v2/models/default/infer", body).status_code == 413
    assert post(client, "/v2/models/default/infer", body + b"\0" * 10, len(body)).status_code == 413


def test_a_version_not_served_is_409_a_malformed_one_400_and_an_unknown_model_404(client):
    body, length = oip_body(fake_observation())
    response = post(client, "/v2/models/default/versions/7/infer", body, length)
    assert response.status_code == 409, response.get_json()
    answer = response.get_json()
    assert (answer["version"], answer["served_versions"]) == ("7", ["fake-1"])
    assert "does not serve version 7" in answer["error"]
    response = post(client, "/v2/models/default/versions/seven/infer", body, length)
    assert response.status_code == 400 and "the version in the path" in response.get_json()["detail"]
    assert post(client, "/v2/models/nope/infer", body, length).status_code == 404
    assert client.get("/v2/models/default/versions/7").status_code == 404
    assert client.get("/v2/models/default/versions/7/ready").status_code == 404


# -- conformance over a real server -------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # a generous deadline: conformance, not speed, is checked here, and a busy CI box is slow
    # JSON images too: three 640x480 rows as JSON numbers are 10 MB, over the 1 MiB default
    args = ("--api-key", KEY, "--deadline-ms", "30000", "--oip-max-json-bytes", str(16 << 20))
    with run_server(tmp_path_factory.mktemp("oip"), workers=1, args=args) as running:
        PolicyClient(running.base_url, api_key=KEY, timeout_s=120).load_model("transformer", "transformer", wait_s=120)
        yield running


@pytest.mark.integration
def test_the_instance_totals_count_oip_requests(server):
    """Under gunicorn /stats totals come from policy_requests_total (dead workers included):
    OIP inference counts there as /infer does."""
    import requests

    def totals():
        stats = requests.get(server.base_url + "/stats", headers={"X-API-Key": KEY}, timeout=30).json()
        return stats["total_requests"], stats["failed_requests"]

    before = totals()
    info = PolicyClient(server.base_url, api_key=KEY).model_info()
    body, length = oip_body(_observation(info["inputs"], 0))
    headers = {"X-API-Key": KEY, oip.HEADER_LENGTH: str(length)}
    url = server.base_url + "/v2/models/default/infer"
    assert requests.post(url, data=body, headers=headers, timeout=60).status_code == 200
    assert requests.post(url, data=b'{"inputs": []}', headers={"X-API-Key": KEY}, timeout=60).status_code == 400
    after = totals()
    assert (after[0] - before[0], after[1] - before[1]) == (2, 1)


def _observation(spec_inputs, seed):
    rng = np.random.default_rng(seed)
    obs = {}
    for entry in spec_inputs:
        if entry.get("optional"):
            continue
        shape = tuple(entry["shape"])
        if entry["dtype"] == "uint8":
            obs[entry["name"]] = rng.integers(0, 256, shape, dtype=np.uint8)
        else:
            obs[entry["name"]] = rng.standard_normal(shape).astype(entry["dtype"])
    return obs


@pytest.mark.integration
@pytest.mark.parametrize("model", ["default", "transformer"])
def test_tritonclient_conformance(server, model):
    httpclient = pytest.importorskip("tritonclient.http")
    headers = {"X-API-Key": KEY}
    triton = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    ours = PolicyClient(server.base_url, api_key=KEY)
    try:
        assert triton.is_server_live() and triton.is_server_ready()
        assert triton.is_model_ready(model, headers=headers)
        meta = triton.get_model_metadata(model, headers=headers)
        info = ours.model_info(model)
        assert meta["versions"] == [info["version"]]
        assert {i["name"]: i["shape"] for i in meta["inputs"]} == {i["name"]: [-1, *i["shape"]] for i in info["inputs"]}
        assert triton.get_server_metadata(headers=headers)["extensions"] == ["binary_tensor_data"]
        observations = [_observation(info["inputs"], seed) for seed in range(3)]
        expected = np.stack([ours.infer(o, model)["action"] for o in observations])
        for binary_in in (False, True):
            for binary_out in (False, True):
                for rows in (1, 3):
                    inputs = []
                    for name in observations[0]:
                        batch = np.stack([o[name] for o in observations[:rows]])
                        tensor = httpclient.InferInput(name, list(batch.shape), oip.datatype_of(batch.dtype))
                        tensor.set_data_from_numpy(batch, binary_data=binary_in)
                        inputs.append(tensor)
                    result = triton.infer(
                        model,
                        inputs,
                        model_version=info["version"],
                        headers=headers,
                        outputs=[httpclient.InferRequestedOutput("action", binary_data=binary_out)],
                    )
                    action = result.as_numpy("action")
                    assert action.shape == (rows, *expected.shape[1:])
                    np.testing.assert_allclose(action, expected[:rows], atol=1e-5, rtol=0)
        with pytest.raises(Exception, match="not served"):
            triton.infer(model, inputs, model_version="999999", headers=headers)
    finally:
        triton.close()
        ours.close()


def _http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, body = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        while len(body) < int(headers["content-length"]):
            body += sock.recv(65536)
        return int(lines[0].split()[1]), headers, body


@pytest.mark.integration
def test_hand_built_binary_request_as_a_cpp_node_sends_it(server):
    """No client library: the bytes a C++ node would write (JSON header, then raw tensors)."""
    ours = PolicyClient(server.base_url, api_key=KEY)
    obs = _observation(ours.model_info()["inputs"], 7)
    expected = ours.infer(obs)["action"]
    header = (
        '{"id":"cpp-1","inputs":['
        '{"name":"state","datatype":"FP32","shape":[1,6],"parameters":{"binary_data_size":24}},'
        '{"name":"image","datatype":"UINT8","shape":[1,480,640,3],"parameters":{"binary_data_size":921600}}],'
        '"outputs":[{"name":"action","parameters":{"binary_data":true}}]}'
    ).encode()
    body = header + obs["state"].astype("<f4").tobytes() + obs["image"].tobytes()
    request = (
        f"POST /v2/models/default/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {KEY}\r\n"
        f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(header)}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    status, headers, answer = _http(server.port, request)
    assert status == 200, answer[:300]
    length = int(headers["inference-header-content-length"])
    meta = json.loads(answer[:length])
    assert meta["id"] == "cpp-1" and meta["outputs"][0]["shape"] == [1, 10, 7]
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == len(answer) - length == 280
    action = np.frombuffer(answer[length:], "<f4").reshape(1, 10, 7)
    np.testing.assert_allclose(action[0], expected, atol=1e-5, rtol=0)
    ours.close()


@pytest.mark.integration
def test_hostile_bodies_over_the_wire_leave_the_worker_serving(server):
    pids = server.ready_workers()
    for case, (body, length, _status, _) in sorted(_hostile_cases().items()):
        extra = f"Inference-Header-Content-Length: {length}\r\n" if length is not None else ""
        request = (
            f"POST /v2/models/default/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {KEY}\r\n{extra}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        got, _, answer = _http(server.port, request)
        assert 400 <= got < 500, (case, got, answer[:200])
    with PolicyClient(server.base_url, api_key=KEY) as ours:
        obs = _observation(ours.model_info()["inputs"], 1)
        assert ours.infer(obs)["action"].shape == (10, 7)
    assert server.ready_workers() == pids  # no worker died and was replaced
    assert "Traceback" not in server.log()
