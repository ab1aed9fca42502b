"""openpi's WebSocket protocol on the server's own port, against a real gunicorn, with the real
openpi client (``openpi-client``, installed without its numpy pin) and with raw sockets where a
misbehaving client is the point."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import pytest
import requests

import openpi_wire
from policy_server.store.model_store import ModelStore
from request_tools import PolicyClient
from tests.support.prometheus import metric
from tests.support.raw_websocket import BINARY, PING, TEXT, RawWebSocket, frame
from tests.support.serving import ROOT, RunningServer, free_port, run_server, stop
from tests.support.wait import eventually

openpi_client = pytest.importorskip(
    "openpi_client.websocket_client_policy", reason="openpi-client is installed by `make install` (--no-deps)"
)
pytest.importorskip("tree", reason="dm-tree (openpi's ActionChunkBroker) is a dev dependency")
from openpi_client.action_chunk_broker import ActionChunkBroker  # noqa: E402
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning"),
]
KEY = "openpi-wire-key-0123456789"


def observation(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"state": rng.standard_normal(6).astype(np.float32),
            "image": rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    args = ("--api-key", KEY, "--body-timeout-s", "2", "--head-timeout-s", "2", "--threads", "4",
            "--max-body-bytes", str(4 << 20), "--shed-wait-ms", "20000")  # batching, not shedding, under load
    with run_server(tmp_path_factory.mktemp("openpi"), workers=2, args=args) as running:
        yield running


def openpi(server, path: str = "") -> openpi_client.WebsocketClientPolicy:
    if path:
        return openpi_client.WebsocketClientPolicy(f"ws://127.0.0.1:{server.port}{path}", api_key=KEY)
    return openpi_client.WebsocketClientPolicy("127.0.0.1", server.port, api_key=KEY)


def packed(obs) -> bytes:
    from openpi_client import msgpack_numpy

    return msgpack_numpy.packb(obs)


def raw(server, path: str = "/") -> RawWebSocket:
    sock = RawWebSocket(server.port, path, {"X-API-Key": KEY})
    assert sock.status == 101, sock.head
    return sock


# -- an unmodified openpi client -----------------------------------------------------------


def test_the_openpi_client_gets_metadata_and_the_action_policy_client_gets(server):
    policy = openpi(server)
    meta = policy.get_server_metadata()
    assert (meta["model"], meta["version"], meta["action_horizon"]) == ("default", "1", 10)
    assert [i["name"] for i in meta["inputs"]] == ["state", "image"]
    obs = observation(3)
    answer = policy.infer(obs)
    with PolicyClient(f"http://127.0.0.1:{server.port}", api_key=KEY) as http:
        expected = http.infer(obs)["action"]
    np.testing.assert_allclose(answer["actions"], expected, atol=1e-5)
    np.testing.assert_allclose(answer["action"], expected, atol=1e-5)
    assert answer["model_version"] == "1" and answer["server_timing"]["infer_ms"] > 0
    assert "prev_total_ms" in policy.infer(obs)["server_timing"]  # from the second frame on, as openpi's server
    # openpi's examples send a prompt to every policy: one without a text input ignores it
    prompted = policy.infer({**obs, "prompt": "put the cup in the sink"})
    np.testing.assert_allclose(prompted["actions"], expected, atol=1e-5)


def test_a_named_model_url_and_openpis_action_chunk_broker_over_25_steps(server):
    broker = ActionChunkBroker(openpi(server, "/models/default/infer"), action_horizon=10)
    steps = [broker.infer(observation(0)) for _ in range(25)]
    assert all(step["actions"].shape == (7,) for step in steps)
    np.testing.assert_allclose(steps[10]["actions"], steps[0]["actions"], atol=1e-5)  # same observation, new chunk
    ws = openpi(server, "/infer")
    assert ws.infer(observation(0))["actions"].shape == (10, 7)


def test_the_upgrade_needs_the_key_before_any_frame(server):
    url = f"ws://127.0.0.1:{server.port}"
    for headers in (None, {"X-API-Key": "wrong-key-0123456789"}, {"Authorization": "Api-Key nope"}):
        with pytest.raises(InvalidStatus) as refused:
            connect(url, additional_headers=headers, open_timeout=10)
        assert refused.value.response.status_code == 401
    with connect(url, additional_headers={"X-API-Key": KEY}, open_timeout=10) as ws:
        assert openpi_wire.decode(ws.recv(timeout=30))["model"] == "default"


def test_plain_http_on_the_same_paths_works_as_before(server):
    base = f"http://127.0.0.1:{server.port}"
    with PolicyClient(base, api_key=KEY) as http:
        assert http.infer(observation())["action"].shape == (10, 7)
    answer = requests.get(base + "/", headers={"X-API-Key": KEY}, timeout=10)  # a plain GET is told to upgrade
    assert (answer.status_code, answer.headers["Upgrade"]) == (426, "websocket")
    assert "openpi's WebSocket protocol" in answer.json()["detail"]
    for path in ("/infer", "/models/default/infer"):  # as before: POST only, for plain HTTP
        assert requests.get(base + path, headers={"X-API-Key": KEY}, timeout=10).status_code == 405
    assert requests.get(base + "/healthz", timeout=10).json() == {"status": "ok"}


# -- errors and hostile frames ---------------------------------------------------------------


def test_a_bad_observation_is_a_text_frame_naming_the_field_then_close_1011(server):
    policy = openpi(server)
    with pytest.raises(RuntimeError, match="422 invalid input: input 'state': expected shape \\[6\\], got \\[7\\]"):
        policy.infer({**observation(), "state": np.zeros(7, np.float32)})
    with raw(server) as ws:
        ws.messages(1)
        ws.send(frame(packed({**observation(), "extra": np.zeros(2, np.float32)})))
        assert ws.until_closed() == ["422 invalid input: unexpected input 'extra'; expected ['image', 'state']",
                                     ("close", 1011, "")]


def ndarray(dtype: str, data: bytes, shape: list) -> dict:
    return {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}


def deep(levels: int):
    value: list = []
    for _ in range(levels):
        value = [value]
    return {"state": value}


HOSTILE = {
    # name: (frame bytes, expected close code, fragment of the text frame)
    "object dtype filled with pointers": (
        frame(msgpack.packb({"state": ndarray("|O8", b"\x41" * 48, [6])}, use_bin_type=True)), 1011, "dtype '|O8'"),
    "void dtype": (frame(msgpack.packb({"state": ndarray("|V24", b"\0" * 24, [1])}, use_bin_type=True)), 1011,
                   "dtype '|V24'"),
    "structured dtype": (frame(msgpack.packb({"state": ndarray([["a", "<f4"]], b"\0" * 24, [6])}, use_bin_type=True)),
                         1011, "dtype 'list'"),
    "data shorter than its shape": (frame(msgpack.packb({"state": ndarray("<f4", b"\0" * 8, [6])}, use_bin_type=True)),
                                    1011, "needs 24"),
    "shape of a huge zero-size array": (
        frame(msgpack.packb({"state": ndarray("<f4", b"", [0, 2**31 - 1, 2**31 - 1])}, use_bin_type=True)), 1011,
        "larger than any array"),
    "an ext type": (frame(msgpack.packb({"state": msgpack.ExtType(7, b"x" * 8)})), 1011, "max_ext_len"),
    "nested too deep": (frame(msgpack.packb(deep(40))), 1011, "deeper than 32"),
    "many tiny containers": (frame(msgpack.packb({"state": [[] for _ in range(4000)] * 3})), 1011,
                             "exceeds max_array_len"),
    "many small elements": (frame(msgpack.packb({"state": [[0] * 4096] * 30})), 1011,
                                   "more than 100000 elements"),
    "garbage": (frame(os.urandom(64) + b"\xc1"), 1011, "400 bad request"),
    "not a map": (frame(msgpack.packb([1, 2, 3])), 1011, "a frame is a msgpack map"),
    "a text frame": (frame(b"hello", TEXT), 1003, "send binary frames"),
    "invalid UTF-8 in a string": (frame(b"\x81\xa6prompt\xa3\xff\xfe\xfd"), 1011, "missing input 'image'"),
    "invalid UTF-8 in a key": (frame(b"\x81\xa3\xff\xfe\xfd\xa1x"), 1011, "is not valid UTF-8"),
    "an unknown endpoint": (frame(msgpack.packb({"endpoint": "shell"})), 1011, "endpoint must be"),
    "an array as the endpoint": (
        frame(msgpack.packb({"endpoint": ndarray("<f4", b"\0" * 8, [2])}, use_bin_type=True)), 1011,
        "endpoint must be"),
    "a reserved opcode": (frame(b"x", 0x3), 1002, "400 bad request: malformed frame"),
    "a reserved bit set": ((lambda f: bytes([f[0] | 0x40]) + f[1:])(frame(b"x")), 1002, "malformed frame"),
    "an unmasked frame": (bytes([0x82, 0x01]) + b"x", 1002, "malformed frame"),
    "a continuation with nothing to continue": (frame(b"x", 0x0), 1002, "malformed frame"),
    "invalid UTF-8 in a text frame": (frame(b"\xff\xfe", TEXT), 1007, "malformed frame"),
    "a message over the size limit": (frame(b"\0" * ((4 << 20) + 1)), 1009, "over the limit of 4194304"),
    "a message over the limit in fragments": (
        frame(b"\0" * (3 << 20), fin=False) + frame(b"\0" * (2 << 20), 0x0), 1009, "over the limit of 4194304"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_frames_get_a_text_frame_and_a_close_and_the_worker_serves_on(server, case):
    data, code, fragment = HOSTILE[case]
    with raw(server) as ws:
        ws.messages(1)  # the metadata
        ws.send(data)
        got = ws.until_closed()
    text = [m for m in got if isinstance(m, str)]
    assert text and fragment in text[0], got
    assert got[-1][:2] == ("close", code), got
    assert requests.get(f"http://127.0.0.1:{server.port}/health", timeout=10).status_code == 200
    assert openpi(server).infer(observation())["actions"].shape == (10, 7)


def test_pings_are_answered_and_reset_is_acknowledged_as_roboarena_expects(server):
    with raw(server) as ws:
        ws.messages(1)
        ws.send(frame(b"are you there", PING))
        assert ws.messages(1) == [("pong", b"are you there")]
        ws.send(frame(packed({"endpoint": "reset", "session_id": "episode-7"})))
        assert ws.messages(1) == ["reset successful"]
        ws.send(frame(packed({**observation(), "endpoint": "infer", "session_id": "episode-7"})))
        answer = openpi_wire.decode(ws.messages(1)[0])
        assert answer["actions"].shape == (10, 7)
    lines = [json.loads(line[line.index("{"):]) for line in server.log().splitlines() if '"session_id"' in line]
    assert any(line["session_id"] == "episode-7" and line["status"] == 200 for line in lines)


def test_a_stalled_frame_is_closed_without_holding_a_thread_while_probes_answer(server):
    """Half of a 1 MB frame, then nothing: the frame is bounded like a body (2 s here, plus its
    size at the minimum rate); meanwhile probes and other clients are answered at once."""
    with raw(server) as stalled:
        stalled.messages(1)
        stalled.send(frame(b"\0" * (1 << 19), length=1 << 20)[: (1 << 19) + 14])
        started = time.monotonic()
        for _ in range(5):
            t = time.monotonic()
            assert requests.get(f"http://127.0.0.1:{server.port}/health", timeout=10).status_code == 200
            assert time.monotonic() - t < 1.0
            assert openpi(server).infer(observation())["actions"].shape == (10, 7)
        got = stalled.until_closed(timeout_s=60)
        waited = time.monotonic() - started
    assert got[0] == "408 request timeout: message not received in time" and got[-1][:2] == ("close", 1008), got
    assert waited < 30, waited


@pytest.mark.parametrize("declared", [(4 << 20) + 1, 1 << 62])
def test_a_frame_declaring_more_than_a_message_may_hold_is_refused_before_its_payload(server, declared):
    """The header alone decides: 413 as a text frame and close 1009 at once, not after the
    body timeout (the limit here is 4 MiB), and the worker's byte budget is untouched."""
    with raw(server) as ws:
        ws.messages(1)
        started = time.monotonic()
        ws.send(frame(b"\0" * 16, length=declared)[:14 + 16])
        got = ws.until_closed(timeout_s=30)
        waited = time.monotonic() - started
    assert got[0] == (f"413 payload too large: a frame declares {declared} bytes, over the limit of {4 << 20} "
                      "for a message"), got
    assert got[-1][:2] == ("close", 1009) and waited < 1.5, (got, waited)
    assert openpi(server).infer(observation())["actions"].shape == (10, 7)


def test_a_frame_header_without_payload_is_timed_like_a_body(server):
    """A header that declares 1 KiB and nothing after it: the message's time limit runs from
    the header (2 s here), not the 300 s idle timeout."""
    with raw(server) as ws:
        ws.messages(1)
        started = time.monotonic()
        ws.send(frame(b"", length=1024))
        got = ws.until_closed(timeout_s=60)
        waited = time.monotonic() - started
    assert got[0] == "408 request timeout: message not received in time" and got[-1][:2] == ("close", 1008), got
    assert waited < 10, waited


def test_24_concurrent_openpi_clients_are_batched_together(server):
    clients = [openpi(server) for _ in range(24)]
    barrier = threading.Barrier(24)

    def run(client):
        barrier.wait()
        return [client.infer(observation(i))["server_timing"]["batch_size"] for i in range(4)]

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        sizes = [s for batch in pool.map(run, clients) for s in batch]
    assert len(sizes) == 96 and max(sizes) > 1, sizes
    text = requests.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10).text
    assert metric(text, "policy_requests_total", route="ws:/", status="200") >= 96
    stats = requests.get(f"http://127.0.0.1:{server.port}/stats", headers={"X-API-Key": KEY}, timeout=10).json()
    assert stats["total_requests"] >= 96


# -- the model's readiness, restarts, shutdown ------------------------------------------------


SLOW_TO_LOAD = """
import time
from policy_server.contract import TensorSpec


class Doubler:
    input_spec = (TensorSpec("x", "float32", (4,)),)
    output_spec = (TensorSpec("y", "float32", (3, 4)),)
    openpi_metadata = {"reset_pose": [0.0, -0.5, 1.0]}

    def forward(self, batch):
        return {"y": batch["x"][:, None, :].repeat(1, 3, 1) * 2}


def load_model(model_dir, device):
    time.sleep(float(open(model_dir + "/delay").read()))
    return Doubler()
"""


def doubler(tmp_path, delay_s: float):
    model = tmp_path / "doubler"
    model.mkdir(parents=True, exist_ok=True)
    (model / "policy.py").write_text(SLOW_TO_LOAD)
    (model / "delay").write_text(str(delay_s))
    return model


def test_the_first_frame_is_held_until_the_model_is_ready_and_pings_are_answered_meanwhile(tmp_path):
    """A worker whose default model failed to load answers /ready 503; an openpi connection to
    it gets its 101 and then waits, pings answered, until a good version reaches the store (as
    another instance sharing it would publish one) and the worker serves it."""
    root = tmp_path / "models"
    (root / "doubler").mkdir(parents=True)
    (root / "doubler" / "policy.py").write_text(SLOW_TO_LOAD)
    (root / "doubler" / "delay").write_text("0")
    (root / "broken").mkdir()
    (root / "broken" / "policy.py").write_text("def load_model(model_dir, device):\n    raise RuntimeError('no')\n")
    args = ("--model-path", str(root / "broken"), "--model-root", str(root))
    with started_without_a_model(tmp_path, args) as server:
        assert requests.get(server.base_url + "/ready", timeout=10).status_code == 503
        with raw_plain(server) as ws:
            for i in range(3):  # held: no metadata, pings answered
                ws.send(frame(b"ping %d" % i, PING))
                assert ws.messages(1) == [("pong", b"ping %d" % i)]
            store = ModelStore(str(tmp_path / "store"), model_root=str(root))
            store.publish("default", store.stage("default", str(root / "doubler")))
            meta = openpi_wire.decode(ws.messages(1, timeout_s=60)[0])
            assert meta["model"] == "default" and meta["reset_pose"] == [0.0, -0.5, 1.0]
            assert meta["action_output"] == "y" and meta["action_horizon"] == 3
            ws.send(frame(packed({"x": np.arange(4, dtype=np.float32)})))
            answer = openpi_wire.decode(ws.messages(1)[0])
            np.testing.assert_array_equal(answer["actions"], np.tile(np.arange(4) * 2.0, (3, 1)))


@contextlib.contextmanager
def started_without_a_model(tmp_path, args):
    """A one-worker server whose default model fails to load: up (it answers), never ready."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLICY_SERVER_")}
    env["POLICY_SERVER_MODEL_STORE"] = str(tmp_path / "store")
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "server.py", "--port", str(port), "--workers", "1", *args],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        eventually(lambda: answers(f"http://127.0.0.1:{port}/health"), 60, "the worker answering")
        yield RunningServer(process, port, log_path)
    finally:
        stop(process)


def answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False


def test_a_worker_restart_under_connected_clients(tmp_path):
    """A worker dies under connected clients: openpi's client (which never reconnects) gets an
    error; ours reconnects to the restarted worker and its next call succeeds."""
    with run_server(tmp_path, workers=1) as server:
        theirs = openpi(server)
        ours = PolicyClient(f"ws://127.0.0.1:{server.port}")
        assert theirs.infer(observation())["actions"].shape == (10, 7)
        assert ours.infer(observation())["action"].shape == (10, 7)
        worker = next(iter(server.ready_workers()))
        os.kill(worker, signal.SIGKILL)
        eventually(lambda: server.ready_workers() - {worker}, 60, "a new worker ready")
        with pytest.raises((ConnectionClosed, OSError, RuntimeError)):
            theirs.infer(observation())
        assert ours.infer(observation())["action"].shape == (10, 7)
        ours.close()


def test_sigterm_answers_the_frame_in_flight_then_closes_1001(tmp_path):
    with run_server(tmp_path, workers=1) as server:
        busy, idle = raw_plain(server), raw_plain(server)
        busy.messages(1)
        idle.messages(1)
        busy.send(frame(packed(observation())))
        # The scenario: SIGTERM while the frame is in flight. Its few milliseconds on the worker
        # show nowhere a test could watch, so a short fixed pause lets it arrive.
        time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        got_busy, got_idle = busy.until_closed(), idle.until_closed()
    assert isinstance(got_busy[0], bytes) and openpi_wire.decode(got_busy[0])["actions"].shape == (10, 7), got_busy
    assert got_busy[-1][:2] == ("close", 1001) and got_idle[-1][:2] == ("close", 1001), (got_busy, got_idle)


def raw_plain(server) -> RawWebSocket:
    sock = RawWebSocket(server.port)
    assert sock.status == 101, sock.head
    return sock


def test_wss_and_the_unix_socket_speak_it_too(tmp_path):
    from websockets.sync.client import unix_connect

    from tests.support.tls_certs import HAVE_OPENSSL, make_pki

    if not HAVE_OPENSSL:
        pytest.skip("needs the openssl command")
    pki = make_pki(tmp_path / "pki")
    uds = tmp_path / "policy.sock"
    args = ("--certfile", str(pki / "server.pem"), "--keyfile", str(pki / "server.key"), "--uds", str(uds))
    with run_server(tmp_path, workers=1, args=args, tls_ca=str(pki / "ca.pem")) as server:
        with PolicyClient(f"wss://127.0.0.1:{server.port}", verify=str(pki / "ca.pem")) as ours:
            assert ours.infer(observation())["action"].shape == (10, 7)
        with unix_connect(str(uds), "ws://localhost/infer") as ws:
            assert openpi_wire.decode(ws.recv(timeout=30))["model"] == "default"
            ws.send(packed(observation()))
            assert openpi_wire.decode(ws.recv(timeout=30))["actions"].shape == (10, 7)
        # An error's text reaches the client every time: the server lingers after its close
        # frame (closing at once made the client's close reply fail, and websockets then lost
        # the text it had read: 3 to 9 tries in 100 over the socket).
        for _ in range(30):
            with unix_connect(str(uds), "ws://localhost/infer") as ws:
                ws.recv(timeout=30)
                ws.send(packed({"state": np.zeros(7, np.float32)}))
                text = ws.recv(timeout=30)
                assert isinstance(text, str) and text.startswith("422 invalid input"), text


def test_our_client_runs_a_chunk_runner_over_the_wire(server):
    from robot_loop import ChunkRunner

    with PolicyClient(f"ws://127.0.0.1:{server.port}", api_key=KEY) as client:
        with ChunkRunner(client, rate_hz=50) as runner:
            actions = [runner.act(observation(0)) for _ in range(30)]
    assert all(a.shape == (7,) for a in actions) and runner.stats.failures == 0
    assert runner.stats.requests >= 2


SLOW_FORWARD = """
import time
from policy_server.contract import TensorSpec


class Slow:
    input_spec = (TensorSpec("x", "float32", (4,)),)
    output_spec = (TensorSpec("y", "float32", (4,)),)

    def forward(self, batch):
        time.sleep(0.5)
        return {"y": batch["x"] * 2}


def load_model(model_dir, device):
    return Slow()
"""


def reset(ws: RawWebSocket) -> None:
    ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    ws.close()  # RST, not FIN


def test_a_client_that_vanishes_is_counted_499_and_not_computed_for_once_gone(tmp_path):
    """One request thread, a 0.5 s forward. The first client resets while its frame computes:
    the answer cannot be written (499). The second resets while its frame waits for the
    thread: it is never computed (499 before it ran). Then two clients close properly while
    their frames wait, one with a close frame and one by closing its end: neither is computed."""
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "policy.py").write_text(SLOW_FORWARD)
    args = ("--model-path", str(tmp_path / "slow"), "--threads", "1")
    with run_server(tmp_path, workers=1, args=args) as server:
        computing, waiting = raw_plain(server), raw_plain(server)
        computing.messages(1)
        waiting.messages(1)
        request = frame(packed({"x": np.ones(4, np.float32)}))
        # The scenario's timing, within the 0.5 s forward (a frame's place, computing or waiting
        # for the thread, is exported nowhere): the first computes, then the second waits.
        computing.send(request)
        time.sleep(0.1)
        waiting.send(request)
        time.sleep(0.1)
        reset(computing)
        reset(waiting)
        eventually(lambda: server.log().count('"status": 499') >= 2, 15, "two 499s in the access log")
        lines = [json.loads(line[line.index("{"):]) for line in server.log().splitlines() if '"status": 499' in line]
        assert {line["route"] for line in lines} == {"ws:/"}
        assert any("before its message ran" in line.get("detail", "") for line in lines), lines
        assert any(line.get("batch_size") == 1 for line in lines), lines  # the one that was computed
        # A client that closes properly while its frame waits (a close frame, or its end of
        # the connection) is gone too: not computed, 499.
        computing, closing, ending = raw_plain(server), raw_plain(server), raw_plain(server)
        for ws in (computing, closing, ending):
            ws.messages(1)
        computing.send(request)
        time.sleep(0.1)
        closing.send(request)
        ending.send(request)
        time.sleep(0.1)
        closing.send(frame(b"\x03\xe8", opcode=0x8))  # close 1000
        ending.sock.shutdown(socket.SHUT_WR)
        eventually(lambda: server.log().count("before its message ran") >= 3, 15, "two more 499s before running")
        assert computing.messages(1)[0]  # the one computing is answered
        eventually(lambda: '"status": 200' in server.log(), 10, "its answer in the access log")
        time.sleep(0.6)  # a frame run by mistake would be logged by now
        served = [line for line in server.log().splitlines() if '"status": 200' in line and '"method": "WS"' in line]
        assert len(served) == 1, served  # only the computing client's frame ran
        with PolicyClient(f"ws://127.0.0.1:{server.port}") as client:  # the worker serves on
            np.testing.assert_array_equal(client.infer({"x": np.ones(4, np.float32)})["y"], np.full(4, 2.0))


def test_messages_sent_before_the_first_frame_are_forgotten_when_their_connection_closes(tmp_path):
    """A client that sends frames while its first frame is held, then goes: their bytes and
    their places in admission come back (else the worker's byte budget would fill and it
    would refuse every upload)."""
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "policy.py").write_text("def load_model(model_dir, device):\n    raise RuntimeError('no')\n")
    args = ("--model-path", str(tmp_path / "broken"), "--max-reading-bytes", "1000000", "--max-body-bytes", "1000000")
    with started_without_a_model(tmp_path, args) as server:
        for _ in range(3):
            with raw_plain(server) as ws:
                ws.send(frame(b"\0" * 600_000))
                ws.send(frame(b"are you there", PING))
                assert ws.messages(1) == [("pong", b"are you there")]  # the message was read and queued
        answer = requests.post(server.base_url + "/infer", data=b"\0" * 600_000, timeout=30)
        assert answer.status_code == 400, answer.text  # admitted and read (then refused as no frame), not 503


# -- bounds on the wire: connections, floods, frames behind a message, idle, deadlines --------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """One worker with room for 40 connections and a 3 s WebSocket idle timeout."""
    env = {"GUNICORN_CMD_ARGS": "--worker-connections 40"}
    args = ("--threads", "4", "--ws-idle-timeout-s", "3")
    with run_server(tmp_path_factory.mktemp("small"), workers=1, args=args, env=env) as running:
        yield running


def test_idle_websockets_cannot_lock_the_door(small):
    """60 greeted, idle openpi connections on a worker with room for 40: the longest idle are
    closed (1001) to make room, and a probe and a new client still get in."""
    idle = []
    try:
        for _ in range(60):
            ws = RawWebSocket(small.port)
            if ws.status == 101:
                ws.messages(1, timeout_s=10)
            idle.append(ws)
        assert requests.get(small.base_url + "/health", timeout=5).status_code == 200
        fresh = PolicyClient(f"ws://127.0.0.1:{small.port}")
        assert fresh.infer(observation())["action"].shape == (10, 7)
        fresh.close()
        assert idle[0].until_closed(timeout_s=5)[-1][:2] in (("close", 1001), ("gone", "eof"))
        text = requests.get(small.base_url + "/metrics", timeout=5).text
        assert metric(text, "policy_front_door_closed_total", reason="evicted") >= 20
    finally:
        for ws in idle:
            ws.close()


@pytest.mark.parametrize("flood, fragment", [
    (frame(b"", PING) * 2000, "400 bad request: too many control frames"),
    (frame(b"x", BINARY, fin=False) + frame(b"", 0x0, fin=False) * 2000, "more than 64 frames"),
])
def test_a_flood_of_pings_or_empty_fragments_is_closed_and_probes_answer(small, flood, fragment):
    with RawWebSocket(small.port) as ws:
        ws.messages(1)
        ws.send(flood)
        started = time.monotonic()
        assert requests.get(small.base_url + "/health", timeout=5).status_code == 200
        assert time.monotonic() - started < 1.0
        got = [m for m in ws.until_closed(timeout_s=10) if not (isinstance(m, tuple) and m[0] == "pong")]
    assert fragment in got[0] and got[-1][:2] == ("close", 1008), got


def test_frames_behind_a_message_are_answered_in_order(small):
    """Two frames in one write, and a ping right behind a message: each gets its answer, in order."""
    with RawWebSocket(small.port) as ws:
        ws.messages(1)
        reset = frame(packed({"endpoint": "reset"}))
        ws.send(reset + reset)
        assert ws.messages(2, timeout_s=10) == ["reset successful", "reset successful"]
        ws.send(frame(packed(observation())) + frame(b"still there?", PING))
        answer, pong = ws.messages(2, timeout_s=10)
        assert openpi_wire.decode(answer)["actions"].shape == (10, 7) and pong == ("pong", b"still there?")


def test_an_idle_websocket_is_closed_after_its_timeout_and_pings_keep_it(small):
    with RawWebSocket(small.port) as quiet, RawWebSocket(small.port) as pinging:
        quiet.messages(1)
        pinging.messages(1)
        for _ in range(5):  # 5 s of pings, one a second: past the 3 s idle timeout
            pinging.send(frame(b"hi", PING))
            assert pinging.messages(1) == [("pong", b"hi")]
            time.sleep(1.0)
        assert quiet.until_closed(timeout_s=5)[-1][:2] == ("close", 1001)
        pinging.send(frame(packed(observation())))
        assert openpi_wire.decode(pinging.messages(1)[0])["actions"].shape == (10, 7)


def test_deadlines_on_the_wire_no_late_answer_is_sent(tmp_path):
    """A frame's deadline_ms bounds it like X-Deadline-Ms: with a 0.5 s forward and 100 ms,
    the late answer is dropped (504, counted); under load every 200 the access log shows was
    committed within its deadline."""
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "policy.py").write_text(SLOW_FORWARD)
    with run_server(tmp_path, workers=1, args=("--model-path", str(tmp_path / "slow"))) as server:
        with RawWebSocket(server.port) as ws:
            ws.messages(1)
            ws.send(frame(packed({"x": np.ones(4, np.float32), "deadline_ms": 100})))
            got = ws.until_closed()
        assert got[0].startswith("504 deadline exceeded") and "late answer was dropped" in got[0], got
        text = requests.get(server.base_url + "/metrics", timeout=5).text
        assert metric(text, "policy_late_answers_total", stage="batch") >= 1
    with run_server(tmp_path / "load", workers=2) as server:
        def client(seed):
            policy = openpi_client.WebsocketClientPolicy("127.0.0.1", server.port)
            statuses = []
            for _ in range(8):
                try:
                    policy.infer({**observation(seed), "deadline_ms": 50})
                    statuses.append(200)
                except RuntimeError as exc:
                    assert str(exc).split("\n")[-1].startswith(("504", "503")), exc
                    statuses.append(504)
                    policy = openpi_client.WebsocketClientPolicy("127.0.0.1", server.port)
            return statuses

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            statuses = [s for batch in pool.map(client, range(32)) for s in batch]

        def answered() -> list[float]:  # the log line is written just after the answer is sent
            lines = [json.loads(line[line.index("{"):]) for line in server.log().splitlines()
                     if '"method": "WS"' in line]
            return [line["latency_ms"] for line in lines if line["status"] == 200]

        eventually(lambda: len(answered()) >= statuses.count(200), 10, "every answer in the access log")
    ok = answered()
    assert ok and len(ok) == statuses.count(200) and max(ok) <= 50, sorted(ok)[-5:]


def test_our_unmasking_gives_wsprotos_bytes_for_any_chunking():
    """The front door's numpy unmasking replaces wsproto's (see front_door.conn.XorMasker):
    payloads cut into chunks anywhere, the key carried across them, give the same bytes."""
    import random

    from wsproto import frame_protocol

    from policy_server.front_door.conn import WSPROTO_MASKER, XorMasker

    assert frame_protocol.XorMaskerSimple is XorMasker  # what wsproto uses when it parses a header
    rng = random.Random(7)
    for _ in range(300):
        key, data = os.urandom(4), os.urandom(rng.randrange(0, 5000))
        cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randrange(1, 7))))
        pieces = [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        ours, theirs = XorMasker(key), WSPROTO_MASKER(key)
        assert b"".join(ours.process(p) for p in pieces) == b"".join(theirs.process(p) for p in pieces)
