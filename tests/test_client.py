"""request_tools against a scripted loopback HTTP server: errors, retries, timeouts, keep-alive."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import requests

import request_tools
from binary_protocol import dict_to_binary
from request_tools import (
    ObservationSpecError,
    PolicyClient,
    PolicyClientError,
    PolicyConnectionError,
    PolicyServerError,
    PolicyTimeoutError,
    send_inference_request,
)
from tests.support.serving import free_port

ACTION = np.arange(70, dtype=np.float32).reshape(10, 7)


class Script:
    """What the stub answers: a list of modes consumed per request, the last one repeating."""

    def __init__(self, *modes: str) -> None:
        self.modes = list(modes)
        self.requests: list[tuple[str, int, dict]] = []
        self.spec_reads = 0
        self.inputs = [{"name": "state", "dtype": "float32", "shape": [6]}]

    def next_mode(self) -> str:
        return self.modes.pop(0) if len(self.modes) > 1 else self.modes[0]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output quiet
        pass

    def _answer(self):
        script: Script = self.server.script  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        if self.path == "/model_info":  # the spec handshake: answered apart from the script
            script.spec_reads += 1
            self._send(200, json.dumps({"name": "stub", "inputs": script.inputs}).encode(), "application/json")
            return
        script.requests.append((self.path, self.client_address[1], dict(self.headers)))
        mode = script.next_mode()
        if mode == "drop":
            self.close_connection = True
            return
        if mode == "slow":
            time.sleep(1.0)
        if mode in ("503-retry", "503"):
            headers = {"Retry-After": "1"} if mode == "503-retry" else {}
            self._send(503, json.dumps({"error": "overloaded", "detail": "busy"}).encode(), "application/json", headers)
        elif mode == "422":
            self._send(
                422,
                json.dumps({"error": "invalid input", "detail": "missing input 'image'"}).encode(),
                "application/json",
            )
        elif mode == "500-html":
            self._send(500, b"<html>oops</html>", "text/html")
        elif mode == "garbage":
            self._send(200, b"not a frame", "application/octet-stream")
        elif self.path in ("/health", "/ready"):
            self._send(200, b'{"status": "ok"}', "application/json")
        else:
            self._send(200, dict_to_binary({"action": ACTION}), "application/octet-stream", {"X-Model-Version": "v7"})

    do_GET = do_POST = _answer

    def _send(self, status, body, content_type, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def stub():
    servers = []

    def start(*modes: str, port: int = 0):
        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        server.daemon_threads = True
        server.script = Script(*modes)  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server, f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


OBS = {"state": np.zeros(6, np.float32)}


def test_public_surface():
    assert set(request_tools.__all__) == {
        "PolicyClient",
        "PolicyClientError",
        "PolicyConnectionError",
        "PolicyServerError",
        "PolicyTimeoutError",
        "send_inference_request",
        "ObservationSpecError",
        "check_observation",
        "ChunkRunner",
        "RunnerStats",
        "LoopClock",
    }
    for error in (PolicyServerError, PolicyTimeoutError, PolicyConnectionError, ObservationSpecError):
        assert issubclass(error, PolicyClientError)


def test_infer_decodes_and_records_the_model_version(stub):
    server, url = stub("ok")
    with PolicyClient(url, api_key="k" * 10) as client:
        outputs = client.infer(OBS)
        assert client.last_model_version == "v7"
    np.testing.assert_array_equal(outputs["action"], ACTION)
    path, _, headers = server.script.requests[0]
    assert path == "/infer"
    assert headers["X-API-Key"] == "k" * 10
    assert headers["Content-Type"] == "application/octet-stream"


def test_client_error_is_not_retried_and_carries_the_servers_message(stub):
    server, url = stub("422")
    with PolicyClient(url, retries=3) as client, pytest.raises(PolicyServerError) as info:
        client.infer(OBS)
    assert (info.value.status, info.value.error, info.value.detail) == (422, "invalid input", "missing input 'image'")
    assert len(server.script.requests) == 1


def test_a_503_with_retry_after_is_retried_and_one_without_is_not(stub):
    server, url = stub("503-retry", "503-retry", "ok")
    with PolicyClient(url, retries=3) as client:
        np.testing.assert_array_equal(client.infer(OBS)["action"], ACTION)
    assert len(server.script.requests) == 3
    server, url = stub("503-retry", "ok")  # the one-call client takes the same path
    np.testing.assert_array_equal(send_inference_request(OBS, url + "/infer")["action"], ACTION)
    assert len(server.script.requests) == 2
    server, url = stub("503")
    with PolicyClient(url, retries=3) as client, pytest.raises(PolicyServerError) as info:
        client.infer(OBS)
    assert info.value.status == 503 and len(server.script.requests) == 1
    assert info.value.retry_after_s is None  # says nothing of coming back


def test_503_retries_stop_at_the_calls_deadline(stub):
    server, url = stub("503-retry")
    started = time.monotonic()
    with PolicyClient(url, retries=50, deadline_s=0.3) as client, pytest.raises(PolicyServerError) as info:
        client.infer(OBS)
    assert info.value.status == 503 and info.value.error == "overloaded"
    assert info.value.retry_after_s == 1.0  # what the server asked (a ChunkRunner plans with it)
    assert time.monotonic() - started < 2.0  # not 50 retries of up to 1 s
    assert 2 <= len(server.script.requests) <= 50
    assert all(float(headers["X-Deadline-Ms"]) <= 300 for _, _, headers in server.script.requests)


def test_non_json_error_body_still_gives_a_server_error(stub):
    _, url = stub("500-html")
    with pytest.raises(PolicyServerError) as info:
        send_inference_request(OBS, url + "/infer", retries=0)
    assert info.value.status == 500 and "oops" in info.value.detail


def test_dropped_connection_is_retried(stub):
    server, url = stub("drop", "ok")
    with PolicyClient(url, retries=2) as client:
        np.testing.assert_array_equal(client.infer(OBS)["action"], ACTION)
    assert len(server.script.requests) == 2


def test_connection_refused_raises_after_retries_with_the_cause():
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with PolicyClient(url, retries=2) as client, pytest.raises(PolicyConnectionError) as info:
        client.infer(OBS)
    assert isinstance(info.value.__cause__, requests.exceptions.ConnectionError)
    assert time.monotonic() - start >= request_tools.BACKOFF_S * 3 * 0.9  # 0.05 + 0.1 backoff


def test_timeout_is_raised_and_not_retried(stub):
    server, url = stub("slow")
    with PolicyClient(url, timeout_s=0.2, retries=3) as client, pytest.raises(PolicyTimeoutError) as info:
        client.infer(OBS)
    assert isinstance(info.value.__cause__, requests.exceptions.Timeout)
    assert len(server.script.requests) == 1


def test_undecodable_answer_is_a_client_error(stub):
    _, url = stub("garbage")
    with pytest.raises(PolicyClientError, match="undecodable"):
        send_inference_request(OBS, url + "/infer")


def test_send_inference_request_keeps_the_connection_alive(stub):
    server, url = stub("ok")
    for _ in range(3):
        send_inference_request(OBS, url + "/infer")
    ports = {port for _, port, _ in server.script.requests}
    assert len(server.script.requests) == 3 and len(ports) == 1


def test_health_ready_and_model_info(stub):
    _, url = stub("ok")
    with PolicyClient(url) as client:
        assert client.health() and client.ready()
        assert client.model_info()["name"] == "stub"
    with PolicyClient(f"http://127.0.0.1:{free_port()}", retries=0) as down:
        assert not down.health() and not down.ready()


def test_unencodable_observation_fails_before_sending(stub):
    server, url = stub("ok")
    with PolicyClient(url, check_spec=False) as client, pytest.raises(ValueError, match="dtype"):
        client.infer({"x": np.array(["text"])})
    assert server.script.requests == []


def test_wait_until_ready(stub):
    server, url = stub("422", "422", "ok")  # /ready answers an error twice, then 200
    with PolicyClient(url) as client:
        client.wait_until_ready(timeout_s=5, poll_s=0.01)
    assert len(server.script.requests) == 3
    with PolicyClient(f"http://127.0.0.1:{free_port()}", retries=0) as down, pytest.raises(PolicyTimeoutError):
        down.wait_until_ready(timeout_s=0.2, poll_s=0.05)


# -- the spec handshake ----------------------------------------------------------------


@pytest.mark.parametrize(
    "obs, field, reason",
    [
        ({}, "state", "missing"),
        ({"state": np.zeros(6, np.float64)}, "state", "dtype float64, expected float32"),
        ({"state": np.zeros((1, 6), np.float32)}, "state", r"shape \[1, 6\], expected \[6\]"),
        ({"state": np.zeros(6, np.float32), "image": np.zeros(3, np.uint8)}, "image", "not an input"),
        ({"state": [0.0] * 6}, "state", "expected a numpy array"),
    ],
    ids=["missing", "dtype", "shape", "extra", "not-array"],
)
def test_observation_not_matching_the_spec_is_refused_before_sending(stub, obs, field, reason):
    server, url = stub("ok")
    with PolicyClient(url) as client, pytest.raises(ObservationSpecError, match=reason) as info:
        client.infer(obs)
    assert info.value.field == field and field in str(info.value)
    assert server.script.requests == []  # nothing was sent to /infer


@pytest.mark.parametrize(
    "prompt, reason",
    [
        (7, "is int, expected text"),
        (b"reach red", "is bytes, expected text"),
        ("é" * 9, "is 18 bytes of text, the model takes at most 16"),
        ("reach \udcff", "is not valid UTF-8 text"),
        (None, "missing"),
    ],
    ids=["int", "bytes", "too-long", "lone-surrogate", "missing"],
)
def test_text_not_matching_the_spec_is_refused_before_sending(stub, prompt, reason):
    server, url = stub("ok")
    server.script.inputs = [*server.script.inputs, {"name": "prompt", "dtype": "text", "shape": [], "max_bytes": 16}]
    obs = {**OBS, "prompt": prompt} if prompt is not None else dict(OBS)
    with PolicyClient(url) as client:
        with pytest.raises(ObservationSpecError, match=reason) as info:
            client.infer(obs)
        assert info.value.field == "prompt"
        with pytest.raises(ObservationSpecError, match="prompt"):
            client.infer_batch([{**OBS, "prompt": "reach red"}, obs])
        client.infer({**OBS, "prompt": "é" * 8})  # 16 bytes: sent
    assert len(server.script.requests) == 1


def test_spec_is_read_once_and_again_only_when_an_observation_stops_matching(stub):
    server, url = stub("ok")
    with PolicyClient(url) as client:
        for _ in range(3):
            client.infer(OBS)
        assert server.script.spec_reads == 1
        server.script.inputs = [{"name": "state", "dtype": "float32", "shape": [7]}]  # a hot update
        client.infer({"state": np.zeros(7, np.float32)})  # cached spec says 6: re-read, then fine
        assert server.script.spec_reads == 2
        with pytest.raises(ObservationSpecError, match="shape"):
            client.infer(OBS)
    assert len(server.script.requests) == 4


@pytest.mark.parametrize("vectorized", [False, True])
def test_a_422_drops_the_cached_spec(stub, vectorized):
    server, url = stub("422", "ok")
    with PolicyClient(url) as client:
        call = (lambda: client.infer_batch([OBS, OBS])) if vectorized else (lambda: client.infer(OBS))
        with pytest.raises(PolicyServerError):
            call()
        call()
    assert server.script.spec_reads == 2


# -- deadlines and optional outputs ----------------------------------------------------


def test_deadline_is_sent_to_the_server_and_bounds_the_wait(stub):
    server, url = stub("ok", "slow")
    with PolicyClient(url, deadline_s=0.5) as client:
        client.infer(OBS)
        sent = float(server.script.requests[0][2]["X-Deadline-Ms"])
        assert 0 < sent <= 500
        start = time.monotonic()
        with pytest.raises(PolicyTimeoutError):
            client.infer(OBS, deadline_s=0.1)  # the stub takes 1 s
        assert time.monotonic() - start < 0.1 + request_tools.DEADLINE_GRACE_S + 0.3


def test_no_retry_starts_after_the_deadline():
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with PolicyClient(url, retries=10, check_spec=False) as client, pytest.raises(PolicyConnectionError):
        client.infer(OBS, deadline_s=0.12)
    # without the deadline, 10 retries back off for 0.05 * (2**10 - 1) s
    assert time.monotonic() - start < 0.5


def test_optional_outputs_are_asked_for_in_the_query(stub):
    server, url = stub("ok")
    with PolicyClient(url) as client:
        client.infer(OBS, outputs=["attention"])
        client.infer(OBS)
    assert server.script.requests[0][0] == "/infer?outputs=attention"
    assert server.script.requests[1][0] == "/infer"
