"""Every route and status code through Flask's test client, with a fake policy."""

from __future__ import annotations

import io
import logging
import os
import threading

import numpy as np
import pytest
import torch

from binary_protocol import binary_to_dict, dict_to_binary
from policy_server.config import ServerConfig
from policy_server.contract import TensorSpec
from server import create_app
from tests.support.apps import assert_error, make_app, runtime_of
from tests.support.fakes import FAKE_OUTPUTS, FakePolicy, expected_action, fake_observation
from tests.support.wait import eventually

KEY = "test-key-0123456789"


def post_infer(client, body: bytes, **kwargs):
    # An explicit length, as every real HTTP client sends, also for an empty body.
    return client.post(
        "/infer", data=body, content_type="application/octet-stream",
        environ_overrides={"CONTENT_LENGTH": str(len(body))}, **kwargs,
    )


def test_infer_answers_the_policy_output_with_headers(client):
    obs = fake_observation(1)
    response = post_infer(client, dict_to_binary(obs))
    assert response.status_code == 200
    assert response.mimetype == "application/octet-stream"
    assert response.headers["X-Model-Version"] == "fake-1"
    stages = [part.split(";")[0].strip() for part in response.headers["Server-Timing"].split(",")]
    assert stages == ["read", "decode", "queue", "compute", "encode"]
    assert response.headers["X-Batch-Size"] == "1"
    outputs = binary_to_dict(response.get_data())
    assert set(outputs) == {"action"}
    assert outputs["action"].dtype == np.float32 and outputs["action"].shape == (10, 7)
    np.testing.assert_allclose(outputs["action"], expected_action(obs), rtol=1e-6)


def test_big_endian_inputs_are_accepted(client):
    obs = fake_observation(2)
    big = {"state": obs["state"].astype(">f4"), "image": obs["image"]}
    response = post_infer(client, dict_to_binary(big))
    assert response.status_code == 200
    np.testing.assert_allclose(binary_to_dict(response.get_data())["action"], expected_action(obs), rtol=1e-6)


def test_health_ready_and_model_info(client):
    assert client.get("/health").get_json() == {"status": "ok"}
    assert client.get("/ready").get_json() == {"status": "ready", "model": "default", "version": "fake-1"}
    info = client.get("/model_info").get_json()
    assert info["name"] == "default" and info["version"] == "fake-1"
    assert info["inputs"][0] == {"name": "state", "dtype": "float32", "shape": [6]}
    assert info["outputs"] == [{"name": "action", "dtype": "float32", "shape": [10, 7]}]


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"", "neither"),
        (b"GET / HTTP/1.1\r\n", "neither"),
        (b"PK5F\x02" + bytes(23), "version 2"),
        (dict_to_binary({"x": np.zeros(3)})[:-1], "body has"),
        (b"\x80\x05\x8c\x02os\x8c\x06system\x93\x8c\x04true\x85R.", "os.system is not allowed"),
    ],
    ids=["empty", "garbage", "version", "truncated", "unsafe-pickle"],
)
def test_malformed_or_unsafe_body_is_400(client, body, fragment):
    assert_error(post_infer(client, body), 400, "bad request", fragment)


@pytest.mark.parametrize(
    "change, fragments",
    [
        (lambda o: o.pop("image"), ["missing input 'image'"]),
        (lambda o: o.update(extra=np.zeros(1)), ["unexpected input 'extra'"]),
        (lambda o: o.update(state=o["state"].astype(np.float64)), ["'state'", "float32", "float64"]),
        (lambda o: o.update(image=np.zeros((8, 8, 4), np.uint8)), ["'image'", "[8, 8, 3]", "[8, 8, 4]"]),
        (lambda o: o.update(state=[1.0] * 6), ["'state'", "array"]),
    ],
    ids=["missing", "extra", "dtype", "shape", "not-array"],
)
def test_input_not_matching_the_spec_is_422(client, change, fragments):
    obs = fake_observation()
    change(obs)
    assert_error(post_infer(client, dict_to_binary(obs)), 422, "invalid input", *fragments)


def test_missing_content_length_is_411(client):
    response = client.post(
        "/infer", input_stream=io.BytesIO(b"abc"), headers={"Transfer-Encoding": "chunked"},
        content_type="application/octet-stream", environ_overrides={"CONTENT_LENGTH": ""},
    )
    assert_error(response, 411, "Content-Length")


def test_body_over_the_limit_is_413_and_not_read():
    app = make_app(max_body_bytes=1000)
    stream = io.BytesIO(bytes(2000))
    response = app.test_client().post("/infer", input_stream=stream, content_length=2000)
    assert_error(response, 413, "2000", "1000")
    assert stream.tell() == 0


@pytest.mark.parametrize("length, fragment", [("abc", "not an integer"), ("-5", "negative"), ("100", "ended after 10")])
def test_bad_content_length_is_400(client, length, fragment):
    response = client.post("/infer", input_stream=io.BytesIO(bytes(10)), environ_overrides={"CONTENT_LENGTH": length})
    assert_error(response, 400, fragment)


def test_unknown_route_and_wrong_method_are_json(client):
    assert_error(client.get("/nope"), 404, "not found")
    response = client.get("/infer")
    assert_error(response, 405, "method not allowed")
    assert "POST" in response.headers["Allow"]


def test_failing_forward_is_generic_500_with_traceback_only_in_log(caplog):
    policy = FakePolicy()
    app = make_app(policy)
    policy.fail = True
    with caplog.at_level(logging.ERROR):
        response = post_infer(app.test_client(), dict_to_binary(fake_observation()))
    payload = assert_error(response, 500, "inference failed")
    assert "secret" not in response.get_data(as_text=True)
    assert "secret internal failure detail" in caplog.text and "Traceback" in caplog.text
    policy.fail = False
    assert post_infer(app.test_client(), dict_to_binary(fake_observation())).status_code == 200
    assert payload["detail"] == ""


def test_ready_is_503_until_warm_then_200():
    gate = threading.Event()
    app = create_app(ServerConfig(), policy=FakePolicy(gate=gate))
    client = app.test_client()
    runtime = runtime_of(app)
    runtime.start()
    assert_error(client.get("/ready"), 503, "loading")
    assert_error(post_infer(client, dict_to_binary(fake_observation())), 503, "loading")
    assert_error(client.get("/model_info"), 503)
    assert client.get("/health").status_code == 200
    gate.set()
    runtime.start(block=True)
    assert client.get("/ready").status_code == 200
    assert post_infer(client, dict_to_binary(fake_observation())).status_code == 200


def test_failed_load_keeps_ready_503_with_a_pointer_to_the_log(tmp_path):
    app = create_app(ServerConfig(model_path=str(tmp_path)))
    runtime_of(app).start(block=True)
    client = app.test_client()
    assert_error(client.get("/ready"), 503, "failed to load", "log")
    assert str(tmp_path) not in client.get("/ready").get_data(as_text=True)
    assert client.get("/health").status_code == 200


def test_health_is_503_once_the_batcher_thread_is_gone(monkeypatch):
    app = create_app(ServerConfig(), policy=FakePolicy())
    runtime = runtime_of(app)
    monkeypatch.setattr(runtime.batcher, "run", lambda: None)  # the loop ends while serving
    runtime.start(block=True)
    runtime._thread.join(5)
    client = app.test_client()
    assert_error(client.get("/health"), 503, "unhealthy", "batcher thread ended")
    assert client.get("/ready").status_code == 200  # the model is loaded: only liveness fails


def test_health_stays_200_while_the_worker_stops():
    app = create_app(ServerConfig(), policy=FakePolicy())
    runtime = runtime_of(app)
    runtime.start(block=True)
    runtime.stop(5)
    runtime._thread.join(5)
    assert not runtime._thread.is_alive()
    assert app.test_client().get("/health").get_json() == {"status": "ok"}


def test_building_the_app_creates_no_model_store(tmp_path, monkeypatch):
    """The store directory appears with the first write (a worker's seed), not at import or build."""
    monkeypatch.chdir(tmp_path)
    config = ServerConfig()
    assert config.model_store and not os.path.isabs(config.model_store)  # relative to the cwd
    create_app(config)
    create_app(ServerConfig(model_store=str(tmp_path / "elsewhere" / "store")))
    assert list(tmp_path.iterdir()) == []


def test_first_request_starts_loading_without_the_gunicorn_hook():
    app = create_app(ServerConfig(), policy=FakePolicy())
    runtime = runtime_of(app)
    assert not runtime.booted
    app.test_client().get("/health")
    runtime.start(block=True)
    assert runtime.ready


class TestApiKey:
    @pytest.fixture
    def client(self):
        return make_app(api_key=KEY).test_client()

    @pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"X-API-Key": KEY + "x"}])
    def test_protected_routes_need_the_key(self, client, headers):
        body = dict_to_binary(fake_observation())
        assert_error(post_infer(client, body, headers=headers), 401, "X-API-Key")
        assert_error(client.get("/model_info", headers=headers), 401)
        assert_error(client.get("/nope", headers=headers), 401)

    def test_health_and_ready_are_open(self, client):
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200

    def test_right_key_passes(self, client):
        response = post_infer(client, dict_to_binary(fake_observation()), headers={"X-API-Key": KEY})
        assert response.status_code == 200
        assert client.get("/model_info", headers={"X-API-Key": KEY}).status_code == 200


class TestQueueingOverHttp:
    """Deadlines and back-pressure through the routes, with a slow fake policy."""

    def busy_app(self, **config):
        self.policy = policy = FakePolicy()
        app = make_app(policy, **config)
        policy.delay_s = 0.5  # after warm-up: each forward now takes 0.5 s
        return app

    def occupy(self, app) -> threading.Thread:
        """Start one request that keeps the batcher busy for 0.5 s, once its forward has begun."""
        calls = self.policy.calls
        thread = threading.Thread(target=post_infer, args=(app.test_client(), dict_to_binary(fake_observation())))
        thread.start()
        eventually(lambda: self.policy.calls > calls, 10, "the busy request's forward begun")
        return thread

    def test_deadline_header_gives_504_without_compute(self):
        app = self.busy_app()
        busy = self.occupy(app)
        response = post_infer(app.test_client(), dict_to_binary(fake_observation()), headers={"X-Deadline-Ms": "50"})
        busy.join()
        assert_error(response, 504, "deadline", "not computed")

    @pytest.mark.parametrize("value", ["soon", "0", "-5"])
    def test_bad_deadline_header_is_400(self, client, value):
        response = post_infer(client, dict_to_binary(fake_observation()), headers={"X-Deadline-Ms": value})
        assert_error(response, 400, "X-Deadline-Ms")

    def test_deadline_header_cannot_raise_the_default(self):
        app = self.busy_app(deadline_ms=100)
        busy = self.occupy(app)
        response = post_infer(app.test_client(), dict_to_binary(fake_observation()), headers={"X-Deadline-Ms": "60000"})
        busy.join()
        assert response.status_code == 504

    def test_full_queue_is_503_with_retry_after(self):
        app = self.busy_app(queue_size=1)
        busy = self.occupy(app)
        queued = threading.Thread(target=post_infer, args=(app.test_client(), dict_to_binary(fake_observation())))
        queued.start()
        eventually(lambda: runtime_of(app).batcher.depth == 1, 10, "a request queued behind the busy one")
        response = post_infer(app.test_client(), dict_to_binary(fake_observation()))
        busy.join()
        queued.join()
        assert_error(response, 503, "overloaded")
        assert response.headers["Retry-After"] == "1"


class AttendingPolicy(FakePolicy):
    """FakePolicy plus an optional ``attention`` output (answered only when asked for)."""

    optional_outputs = ("attention",)

    def __init__(self) -> None:
        super().__init__()
        self.output_spec = (*FAKE_OUTPUTS, TensorSpec("attention", "float32", (10, 4)))

    def forward(self, batch):
        out = super().forward(batch)
        rows = batch["state"].shape[0]
        return {**out, "attention": torch.full((rows, 10, 4), 0.25)}


def test_optional_outputs_are_answered_only_when_asked_for():
    client = make_app(AttendingPolicy(), cache_size=8).test_client()
    body = dict_to_binary(fake_observation(3))
    plain = binary_to_dict(post_infer(client, body).get_data())
    assert set(plain) == {"action"}
    for query in ("?outputs=attention", "?outputs=action,attention", "?outputs=attention&outputs=action"):
        response = client.post("/infer" + query, data=body, content_type="application/octet-stream")
        outputs = binary_to_dict(response.get_data())
        assert set(outputs) == {"action", "attention"}, query
        np.testing.assert_array_equal(outputs["attention"], np.full((10, 4), 0.25, np.float32))
    assert response.headers["X-Cache"] == "hit"  # cached whole, filtered per request
    assert client.get("/model_info").get_json()["optional_outputs"] == ["attention"]


def test_asking_for_an_output_the_model_lacks_is_400_before_compute():
    policy = AttendingPolicy()
    client = make_app(policy).test_client()
    calls = policy.calls
    response = client.post("/infer?outputs=attention,saliency", data=dict_to_binary(fake_observation(3)),
                           content_type="application/octet-stream")
    assert_error(response, 400, "no output 'saliency'", "attention")
    assert policy.calls == calls


def test_a_policy_whose_optional_outputs_are_not_its_outputs_does_not_load():
    from policy_server.errors import ModelError
    from policy_server.model.loader import describe

    for optional in (("saliency",), ("action", "attention")):
        policy = AttendingPolicy()
        policy.optional_outputs = optional
        with pytest.raises(ModelError, match="optional_outputs"):
            describe(policy, name="p", version="1", device="cpu")
