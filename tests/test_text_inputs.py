"""Text inputs (a task instruction, ``prompt``): the contract, validation, batching across
prompts, the response cache key, and every wire against a live server with the shipped
instructed policy (wire format v1, OIP JSON and binary BYTES, openpi's WebSocket)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import requests
import torch

import openpi_wire
from binary_protocol import dict_to_binary
from policy_server.contract import TensorSpec, TextSpec
from policy_server.errors import InvalidInput, ModelError
from policy_server.inputs.tensors import complete_inputs
from policy_server.model.loader import describe
from policy_server.oip.bytes_tensors import encode_texts
from policy_server.serving.batcher import Batcher, compatibility_key
from policy_server.serving.executor import BatchExecutor
from policy_server.serving.response_cache import input_digest
from request_tools import PolicyClient, PolicyServerError
from tests.support.apps import make_app
from tests.support.raw_websocket import RawWebSocket, frame
from tests.support.serving import run_server


class Echo:
    """``y = x + the sum of the prompt's UTF-8 bytes``: any mix-up of texts shows."""

    input_spec = (TensorSpec("x", "float32", (2,)), TextSpec("prompt", max_bytes=16))
    output_spec = (TensorSpec("y", "float32", (2,)),)

    def forward(self, batch):
        total = torch.tensor([float(sum(t.encode())) for t in batch["prompt"]], dtype=torch.float32)
        return {"y": batch["x"] + total[:, None]}


def expected(x, prompt):
    return x + float(sum(prompt.encode()))


# -- the contract and validation ----------------------------------------------------------


def test_a_text_spec_declares_its_length_and_default():
    assert TextSpec("prompt", 64).to_json() == {"name": "prompt", "dtype": "text", "shape": [], "max_bytes": 64}
    assert TextSpec("prompt", 8, optional=True, default="go").to_json()["default"] == "go"
    for bad in ({"max_bytes": 0}, {"max_bytes": 1 << 17}, {"max_bytes": 2, "default": "far"}):
        with pytest.raises(ValueError):
            TextSpec("prompt", **{"max_bytes": 8, **bad})
    loaded = describe(Echo(), name="echo", version="1", device="cpu")
    assert loaded.info()["inputs"][1] == {"name": "prompt", "dtype": "text", "shape": [], "max_bytes": 16}

    class TextOut(Echo):
        output_spec = (TextSpec("words"),)

    with pytest.raises(ModelError, match="output_spec must be a non-empty sequence of TensorSpec"):
        describe(TextOut(), name="bad", version="1", device="cpu")


@pytest.mark.parametrize(
    "value, rows, fragment",
    [
        (3, None, "input 'prompt': expected text (a string), got int"),
        (np.zeros(3), None, "expected text (a string), got ndarray"),
        ("é" * 9, None, "18 bytes of text; the model takes at most 16"),
        ("\udc80 dangling", None, "input 'prompt': text is not valid UTF-8"),
        (["ok", 5], 2, "input 'prompt' row 1: expected text (a string), got int"),
        (["ok"], 2, "needs a list of 2 texts"),
        ("one", 2, "needs a list of 2 texts"),
    ],
)
def test_bad_text_is_422_naming_the_field_and_row(value, rows, fragment):
    x = np.zeros((2,) if rows is None else (rows, 2), np.float32)
    with pytest.raises(InvalidInput) as refused:
        complete_inputs({"x": x, "prompt": value}, Echo.input_spec, rows)
    assert fragment in refused.value.detail


def test_a_required_text_is_named_when_missing_and_an_optional_one_filled():
    with pytest.raises(InvalidInput, match="missing input 'prompt'"):
        complete_inputs({"x": np.zeros(2, np.float32)}, Echo.input_spec)
    spec = (Echo.input_spec[0], TextSpec("prompt", 16, optional=True, default="idle"))
    assert complete_inputs({"x": np.zeros(2, np.float32)}, spec)["prompt"] == "idle"
    assert complete_inputs({"x": np.zeros((3, 2), np.float32)}, spec, 3)["prompt"] == ["idle"] * 3


def test_texts_never_split_a_batch_and_key_the_cache():
    a = {"x": np.zeros(2, np.float32), "prompt": "left"}
    b = {"x": np.zeros(2, np.float32), "prompt": "right"}
    assert compatibility_key(a, "m") == compatibility_key(b, "m")
    assert input_digest(a) != input_digest(b) and input_digest(a) == input_digest(dict(a))
    assert input_digest({"x": a["x"], "prompt": ["ab", "c"]}) != input_digest({"x": a["x"], "prompt": ["a", "bc"]})


def test_a_batch_mixing_four_prompts_answers_each_as_alone():
    executor = BatchExecutor(describe(Echo(), name="echo", version="1", device="cpu"), max_batch_size=4)
    batcher = Batcher(executor, max_batch_size=4)
    gate = threading.Event()
    real_launch = executor.launch

    def gated(batch):
        gate.wait(10)
        return real_launch(batch)

    executor.launch = lambda requests: gated([r.inputs for r in requests])
    executor.finish = (lambda finish: lambda handle: (finish(handle), "1"))(executor.finish)
    prompts = ["reach red", "go blue", "", "é"]
    rng = np.random.default_rng(0)
    rows = [{"x": rng.standard_normal(2).astype(np.float32), "prompt": p} for p in prompts]
    queued = [batcher.submit(row, deadline=time.monotonic() + 30) for row in rows]
    batcher.start()
    gate.set()
    try:
        answers = [batcher.wait(r)[0]["y"] for r in queued]
    finally:
        batcher.stop(5)
    assert [r.batch_size for r in queued] == [4] * 4
    for row, answer in zip(rows, answers, strict=True):
        np.testing.assert_allclose(answer, expected(row["x"], row["prompt"]), atol=1e-5)


def test_oip_bytes_json_may_be_flat_or_nested_as_its_shape():
    client = make_app(Echo()).test_client()
    x = {"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1.0, 2.0], [3.0, 4.0]]}
    for prompt in ({"shape": [2, 1], "data": [["ab"], ["c"]]}, {"shape": [2, 1], "data": ["ab", "c"]},
                   {"shape": [2], "data": ["ab", "c"]}):
        body = json.dumps({"inputs": [x, {"name": "prompt", "datatype": "BYTES", **prompt}]}).encode()
        answer = client.post("/v2/models/default/infer", data=body,
                             environ_overrides={"CONTENT_LENGTH": str(len(body))})
        assert answer.status_code == 200, (prompt, answer.get_json())
        y = np.array(answer.get_json()["outputs"][0]["data"], np.float32).reshape(2, 2)
        np.testing.assert_allclose(y, [expected(np.array([1.0, 2.0]), "ab"), expected(np.array([3.0, 4.0]), "c")])


def test_in_process_every_wire_refuses_bad_text_with_422():
    client = make_app(Echo()).test_client()
    body = dict_to_binary({"x": np.zeros(2, np.float32), "prompt": "x" * 17})
    answer = client.post("/infer", data=body, environ_overrides={"CONTENT_LENGTH": str(len(body))})
    assert answer.status_code == 422 and "17 bytes of text" in answer.get_json()["detail"]
    x = {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [0.0, 0.0]}
    for prompt, fragment in [
        ({"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["x" * 17]}, "17 bytes of text"),
        ({"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["\udc80"]}, "not valid UTF-8"),
        ({"name": "prompt", "datatype": "FP32", "shape": [1], "data": [1.0]}, "expected datatype BYTES"),
        ({"name": "prompt", "datatype": "BYTES", "shape": [1, 2], "data": ["a", "b"]}, "expected datatype BYTES"),
        ({"name": "prompt", "datatype": "BYTES", "shape": [1], "data": [5]}, "row 0: expected text (a string)"),
        ({"name": "prompt", "datatype": "BYTES", "shape": [1], "data": [None]}, "got NoneType"),
    ]:
        body = json.dumps({"inputs": [x, prompt]}).encode()
        answer = client.post("/v2/models/default/infer", data=body,
                             environ_overrides={"CONTENT_LENGTH": str(len(body))})
        assert answer.status_code == 422 and fragment in answer.get_json()["detail"], answer.get_json()
    header = json.dumps({"inputs": [x, {"name": "prompt", "datatype": "BYTES", "shape": [1],
                                        "parameters": {"binary_data_size": 6}}]}).encode()
    body = header + b"\x02\x00\x00\x00\xff\xfe"
    answer = client.post("/v2/models/default/infer", data=body,
                         headers={"Inference-Header-Content-Length": str(len(header))},
                         environ_overrides={"CONTENT_LENGTH": str(len(body))})
    assert answer.status_code == 422 and "input 'prompt' row 0: text is not valid UTF-8" in answer.get_json()["detail"]


# -- the shipped instructed policy, live ------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    args = ("--model-path", "models/instructed", "--model-name", "instructed", "--cache-size", "64")
    with run_server(tmp_path_factory.mktemp("text"), workers=2, args=args) as running:
        yield running


def observation():
    from examples.reacher_instructed import InstructedReacherEnv

    return InstructedReacherEnv(seed=5).reset()


def oip_action(server, obs, binary_text: bool) -> np.ndarray:
    texts = encode_texts([obs["prompt"]])
    prompt = ({"name": "prompt", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(texts)}}
              if binary_text else {"name": "prompt", "datatype": "BYTES", "shape": [1, 1], "data": [obs["prompt"]]})
    header = json.dumps({"inputs": [
        {"name": "state", "datatype": "FP32", "shape": [1, 6], "data": obs["state"].tolist()},
        {"name": "image", "datatype": "UINT8", "shape": [1, 480, 640, 3], "parameters": {"binary_data_size": 921600}},
        prompt,
    ]}).encode()
    body = header + obs["image"].tobytes() + (texts if binary_text else b"")
    answer = requests.post(server.base_url + "/v2/models/instructed/infer", data=body, timeout=30,
                           headers={"Inference-Header-Content-Length": str(len(header))})
    assert answer.status_code == 200, answer.text
    return np.array(answer.json()["outputs"][0]["data"], np.float32).reshape(10, 7)


@pytest.mark.integration
def test_the_same_observation_and_prompt_give_the_same_action_on_every_wire(server):
    obs = observation()
    with PolicyClient(server.base_url, model="instructed") as client:
        assert {"name": "prompt", "dtype": "text", "shape": [], "max_bytes": 128} in client.model_info()["inputs"]
        pickled = client.infer(obs)["action"]
        rows = client.infer_batch([obs, {**obs, "prompt": "go to the other one"}])["action"]
    np.testing.assert_allclose(rows[0], pickled, atol=1e-5)
    np.testing.assert_allclose(oip_action(server, obs, binary_text=False), pickled, atol=1e-5)
    np.testing.assert_allclose(oip_action(server, obs, binary_text=True), pickled, atol=1e-5)
    meta = requests.get(server.base_url + "/v2/models/instructed", timeout=10).json()
    assert {"name": "prompt", "datatype": "BYTES", "shape": [-1]} in meta["inputs"]
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    openpi = WebsocketClientPolicy(f"ws://127.0.0.1:{server.port}/models/instructed/infer")
    assert {"name": "prompt", "dtype": "text", "shape": [], "max_bytes": 128} in openpi.get_server_metadata()["inputs"]
    np.testing.assert_allclose(openpi.infer(obs)["actions"], pickled, atol=1e-5)


@pytest.mark.integration
def test_two_prompts_on_one_observation_give_different_actions(server):
    obs = observation()
    with PolicyClient(server.base_url, model="instructed") as client:
        red = client.infer({**obs, "prompt": "reach the red target"})["action"]
        blue = client.infer({**obs, "prompt": "reach the blue target"})["action"]
    assert np.abs(red - blue).max() > 0.1


@pytest.mark.integration
def test_bad_text_on_the_openpi_wire_is_a_text_frame_naming_the_field(server):
    from openpi_client import msgpack_numpy

    obs = observation()
    cases = [
        ({**obs, "prompt": "x" * 200}, "200 bytes of text; the model takes at most 128"),
        ({**obs, "prompt": 7}, "input 'prompt': expected text (a string), got int"),
        ({k: v for k, v in obs.items() if k != "prompt"}, "missing input 'prompt'"),
    ]
    for request, fragment in cases:
        with RawWebSocket(server.port, "/models/instructed/infer") as ws:
            ws.messages(1)
            ws.send(frame(msgpack_numpy.packb(request)))
            got = ws.until_closed()
        assert got[0].startswith("422 invalid input") and fragment in got[0], got
        assert got[-1][:2] == ("close", 1011)
    bad_utf8 = msgpack_numpy.packb({**obs, "prompt": "PLACEHOLDER"}).replace(b"\xabPLACEHOLDER", b"\xa2\xff\xfe")
    with RawWebSocket(server.port, "/models/instructed/infer") as ws:
        ws.messages(1)
        ws.send(frame(bad_utf8))
        got = ws.until_closed()
    assert "input 'prompt': text is not valid UTF-8" in got[0], got
    assert openpi_wire.decode(openpi_wire.encode({"prompt": "ok"})) == {"prompt": "ok"}


@pytest.mark.integration
def test_the_runner_carries_the_instruction_and_an_observation_field_changes_it(server):
    from robot_loop import ChunkRunner

    obs = {k: v for k, v in observation().items() if k != "prompt"}
    seen = []

    class Recording:
        def __init__(self, client):
            self.client = client

        def model_info(self):
            return self.client.model_info()

        def __call__(self, request, *, deadline_s=None):
            seen.append(request.get("prompt"))
            return self.client.infer(request, deadline_s=deadline_s)

    with PolicyClient(server.base_url, model="instructed") as client:
        with ChunkRunner(Recording(client), rate_hz=50, max_in_flight=1) as runner:
            runner.set_instruction("reach the red target")
            for _ in range(12):
                runner.act(obs)
            runner.act({**obs, "prompt": "reach the blue target"})
            for _ in range(12):
                runner.act(obs)
            runner.reset(instruction="touch the red disc")
            runner.act(obs)
    assert seen[0] == "reach the red target" and seen[-1] == "touch the red disc"
    assert "reach the blue target" in seen and seen.index("reach the blue target") < len(seen) - 1
    assert runner.stats.failures == 0


@pytest.mark.integration
def test_the_response_cache_keys_on_the_text(server):
    obs = observation()
    body = dict_to_binary(obs)
    other = dict_to_binary({**obs, "prompt": obs["prompt"] + " now"})
    url = server.base_url + "/infer"
    seen = [requests.post(url, data=data, timeout=30).headers.get("X-Cache") for data in (body, body, other, other)]
    # two workers: a repeat hits when it lands on the worker that computed it; a new text never does
    assert seen[0] in ("miss", "hit") and seen[2] == "miss", seen


@pytest.mark.integration
def test_the_sim_loop_closes_the_instructed_loop_through_the_server(server, tmp_path):
    from examples import sim_loop

    result = sim_loop.main(["--url", server.base_url, "--models", "instructed", "--episodes", "2",
                            "--skip-in-process", "--json", str(tmp_path / "sim.json")])
    report = next(r for r in result["reports"] if r["path"] == "server")
    assert report["episodes"] == 2 and report["successes"] == 2 and report["failures"] == 0, report


def test_our_websocket_client_retries_a_503_frame_within_the_deadline(monkeypatch):
    """An overloaded or loading server answers a frame "503 ..." and closes; the client waits
    and sends it again on a new connection, as the HTTP client retries a 503."""
    from policy_client import websocket_client

    class Socket:
        def __init__(self, answer):
            self.answer, self.sent = answer, []

        def send(self, frame):
            self.sent.append(frame)

        def recv(self, timeout=None):
            return self.answer

        def close(self):
            pass

    answers = iter([Socket("503 overloaded: 64 requests held by this worker"),
                    Socket(openpi_wire.encode({"y": np.ones(2, np.float32)}))])
    client = PolicyClient("ws://127.0.0.1:1", check_spec=False, retries=2)
    monkeypatch.setattr(client, "_socket", lambda model, deadline: next(answers))
    monkeypatch.setattr(websocket_client.time, "sleep", lambda s: None)
    assert client.infer({"x": np.zeros(2, np.float32)})["y"].tolist() == [1.0, 1.0]
    client = PolicyClient("ws://127.0.0.1:1", check_spec=False, retries=0)
    monkeypatch.setattr(client, "_socket", lambda model, deadline: Socket("503 overloaded: busy"))
    with pytest.raises(PolicyServerError) as refused:
        client.infer({"x": np.zeros(2, np.float32)})
    assert refused.value.status == 503
