"""The front door (policy_server/front_door/worker.py) against a real gunicorn, with misbehaving raw-socket clients.

One test per front-door fault: stalled uploads, deadlines counted from arrival, admission
control, vanished clients, protocol refusals, cold workers, totals after a worker death.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys
import threading
import time

import numpy as np
import pytest
import requests

from binary_protocol import dict_to_binary
from request_tools import PolicyClient
from tests.support.policies import SLOW_POLICY, observation
from tests.support.prometheus import metric, scrape
from tests.support.raw_http import closed_by_server, read_answer, read_answers, taken_in
from tests.support.serving import errors_in, run_server
from tests.support.wait import eventually

pytestmark = pytest.mark.integration

BODY_BYTES = 900_000  # about one default observation


def _head(port: int, length: int, path: str = "/infer", extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


def stalled_upload(port: int, sent: int = 4096) -> socket.socket:
    """A client that sends the head and ``sent`` bytes of a 0.9 MB body, then nothing more."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(_head(port, BODY_BYTES) + b"\0" * sent)
    return sock


def refusals(text: str, reason: str, status: int) -> float:
    return metric(text, "policy_front_door_refusals_total", reason=reason, status=str(status))


# The door exports no count of the requests it is reading or holding: a test cannot see the
# moment the poller has taken in uploads it just started, so it gives the poller this long.
TAKE_IN_S = 0.2


def uploads_over(server) -> int:
    """Uploads the door is done with: closed by their client (a 499) or timed out (a 408). Each
    one's access line is written on the poller just before its admission slot and its bytes
    are handed back."""
    log = server.log()
    return log.count("client closed the connection while sending its request") + log.count('"refused": "body_timeout"')


def noticed_closed(server, before: int, closed: int) -> None:
    """Wait until the door is done with ``closed`` more uploads, just closed by their clients."""
    eventually(lambda: uploads_over(server) >= before + closed, 15,
               f"the door noticing {closed} uploads closed by their clients", context=lambda: server.log()[-2000:])


@pytest.fixture(scope="module")
def door(tmp_path_factory):
    """1 worker x 2 threads, the default model, short read bounds and a small admission limit."""
    args = (
        "--threads", "2", "--head-timeout-s", "1", "--body-timeout-s", "1", "--min-body-bytes-per-s", "1000000",
        "--admission-limit", "6", "--max-reading-per-client", "8",
    )
    with run_server(tmp_path_factory.mktemp("door"), workers=1, args=args) as server:
        yield server


def test_stalled_uploads_hold_no_thread_and_get_408(door):
    stalled = [stalled_upload(door.port) for _ in range(4)]  # twice the request threads
    try:
        time.sleep(TAKE_IN_S)
        assert requests.get(door.base_url + "/health", timeout=1).status_code == 200
        assert requests.get(door.base_url + "/ready", timeout=1).status_code == 200
        with PolicyClient(door.base_url, retries=0, timeout_s=10) as client:
            assert client.infer(observation(1))["action"].shape == (10, 7)
        for sock in stalled:  # body deadline: 1 s + 0.9 MB at 1 MB/s
            status, _, body = read_answer(sock, timeout_s=15)
            assert (status, body["error"]) == (408, "request timeout")
            assert "body" in body["detail"]
            assert closed_by_server(sock)
    finally:
        for sock in stalled:
            sock.close()
    assert refusals(scrape(door), "body_timeout", 408) >= 4


def test_a_slow_head_gets_408_and_is_closed(door):
    sock = socket.create_connection(("127.0.0.1", door.port), timeout=30)
    with sock:
        sock.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\n")  # and never the rest of the head
        status, _, body = read_answer(sock, timeout_s=10)
        assert (status, body["error"]) == (408, "request timeout") and "head" in body["detail"]
        assert closed_by_server(sock)


def test_over_the_admission_limit_is_503_with_retry_after_and_probes_still_answer(door):
    stalled = [stalled_upload(door.port) for _ in range(6)]  # the admission limit, all held
    try:
        time.sleep(TAKE_IN_S)
        body = dict_to_binary(observation(2))
        response = requests.post(door.base_url + "/infer", data=body, timeout=5,
                                 headers={"Content-Type": "application/octet-stream"})
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert response.json()["error"] == "overloaded"
        # every route of the probes group passes admission, ours and OIP's, and the scrape
        for probe in ("/health", "/ready", "/metrics", "/v2/health/live", "/v2/health/ready"):
            assert requests.get(door.base_url + probe, timeout=1).status_code == 200, probe
        assert requests.get(door.base_url + "/stats", timeout=5).status_code == 503  # not a probe: shed
    finally:
        gone = uploads_over(door)
        for sock in stalled:
            sock.close()
    noticed_closed(door, gone, len(stalled))
    with PolicyClient(door.base_url, retries=0) as client:  # and the keep-alive connection is fine
        assert client.infer(observation(3))["action"].shape == (10, 7)
    assert refusals(scrape(door), "admission", 503) >= 1


def test_too_many_unfinished_requests_from_one_address_are_refused(door):
    socks = []
    try:
        for _ in range(9):
            sock = socket.create_connection(("127.0.0.1", door.port), timeout=30)
            sock.sendall(b"POST /infer HTTP/1.1\r\n")
            socks.append(sock)
        status, headers, body = read_answer(socks[-1], timeout_s=5)
        assert status == 503 and headers["retry-after"] == "1" and "address" in body["detail"]
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize(
    "raw, status, reason",
    [
        (b"GET /" + b"a" * 1_000_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "request_line"),
        (b"GET /health HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(10_000)) + b"\r\n", 431, "headers"),
        (b"GARBAGE\r\n\r\n", 400, "malformed"),
        (b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "framing"),
        (
            b"POST /infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            411,
            "framing",
        ),
    ],
    ids=["request-line-1MB", "10000-headers", "bad-request-line", "cl-and-te", "chunked"],
)
def test_protocol_refusals_get_json_a_metric_and_an_access_line(door, raw, status, reason):
    before = refusals(scrape(door), reason, status)
    lines_before = door.log().count(f'"refused": "{reason}"')
    sock = socket.create_connection(("127.0.0.1", door.port), timeout=30)
    with sock:
        sender = threading.Thread(target=lambda: _send_ignoring_reset(sock, raw))
        sender.start()
        got, headers, body = read_answer(sock)
        sender.join(30)
    assert got == status and headers["content-type"] == "application/json"
    assert set(body) == {"error", "detail"}
    assert refusals(scrape(door), reason, status) == before + 1
    eventually(lambda: door.log().count(f'"refused": "{reason}"') == lines_before + 1, 5,
               f"one access line for the {reason} refusal")


def _send_ignoring_reset(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """1 worker x 2 threads over a model whose forward takes 0.15 s."""
    tmp = tmp_path_factory.mktemp("slow")
    (tmp / "slow").mkdir()
    (tmp / "slow" / "policy.py").write_text(SLOW_POLICY)
    args = ("--threads", "2", "--model-path", str(tmp / "slow"), "--max-batch-size", "1")
    with run_server(tmp, workers=1, args=args) as server:
        yield server


def _slow_request(port: int, extra: str = "") -> bytes:
    body = dict_to_binary({"x": np.ones(4, np.float32)})
    return _head(port, len(body), extra=extra) + body


def test_a_deadline_counts_from_arrival_so_a_late_request_gets_504(slow):
    holders = []
    for _ in range(2):  # both request threads busy for 0.15-0.3 s
        sock = socket.create_connection(("127.0.0.1", slow.port), timeout=30)
        sock.sendall(_slow_request(slow.port))
        holders.append(sock)
    late = socket.create_connection(("127.0.0.1", slow.port), timeout=30)
    with late:
        late.sendall(_slow_request(slow.port, extra="X-Deadline-Ms: 50\r\n"))
        status, _, body = read_answer(late)
    assert (status, body["error"]) == (504, "deadline exceeded")
    for sock in holders:
        with sock:
            assert read_answer(sock)[0] == 200


def test_a_request_whose_compute_ends_past_its_deadline_gets_504_not_a_late_action(slow):
    """Started in time, computed for 0.15 s, due after 0.05 s: the action would be stale."""
    with socket.create_connection(("127.0.0.1", slow.port), timeout=30) as sock:
        sock.sendall(_slow_request(slow.port, extra="X-Deadline-Ms: 50\r\n"))
        status, headers, body = read_answer(sock)
        assert (status, body["error"]) == (504, "deadline exceeded")
        assert "before its batch finished" in body["detail"] and "late answer was dropped" in body["detail"]
        sock.sendall(_slow_request(slow.port, extra="X-Deadline-Ms: 1000\r\n"))  # the same connection, in time
        assert read_answer(sock)[0] == 200
    oip = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1.0] * 4}],
           "parameters": {"timeout": 50_000}}  # OIP's timeout, microseconds
    answer = requests.post(slow.base_url + "/v2/models/default/infer", json=oip, timeout=30)
    assert answer.status_code == 504 and "late answer was dropped" in answer.json()["error"]


VERY_SLOW_POLICY = SLOW_POLICY.replace("time.sleep(0.15)", "time.sleep(0.6)")


def test_a_worker_sheds_new_requests_while_its_oldest_waiting_one_ages(tmp_path):
    (tmp_path / "slower").mkdir()
    (tmp_path / "slower" / "policy.py").write_text(VERY_SLOW_POLICY)
    args = ("--threads", "1", "--model-path", str(tmp_path / "slower"), "--shed-wait-ms", "100")
    with run_server(tmp_path, workers=1, args=args) as server:
        first = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        first.sendall(_slow_request(server.port))  # holds the only request thread for 0.6 s
        time.sleep(0.05)  # the scenario's order (and either may take the thread): first, then second
        second = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        second.sendall(_slow_request(server.port))  # waits for the thread
        time.sleep(0.25)  # the scenario: its wait grows past --shed-wait-ms 100
        third = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        with first, second, third:
            third.sendall(_slow_request(server.port))
            status, headers, body = read_answer(third)
            assert (status, headers["retry-after"], body["error"]) == (503, "1", "overloaded")
            assert "oldest waiting request" in body["detail"]
            assert read_answer(first)[0] == 200 and read_answer(second)[0] == 200


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST, not FIN


def test_a_client_that_resets_after_its_request_is_499_not_500(slow):
    before = scrape(slow)
    results: list[object] = []

    def batch_mate() -> None:
        with PolicyClient(slow.base_url, retries=0, check_spec=False) as client:
            results.append(client.infer({"x": np.full(4, 3.0, np.float32)})["y"])

    mate = threading.Thread(target=batch_mate)
    mate.start()
    for _ in range(4):
        sock = socket.create_connection(("127.0.0.1", slow.port), timeout=30)
        sock.sendall(_slow_request(slow.port))
        time.sleep(0.02)  # the scenario: a client that resets a moment after its request
        _reset(sock)
    mate.join(30)
    np.testing.assert_array_equal(results[0], np.full(4, 6.0, np.float32))

    def four_vanished() -> str | None:
        after = scrape(slow)
        vanished = metric(after, "policy_requests_total", route="/infer", status="499") - metric(
            before, "policy_requests_total", route="/infer", status="499"
        )
        return after if vanished == 4 else None

    after = eventually(four_vanished, 10, "4 more 499s on /infer", every_s=0.1)
    assert metric(after, "policy_requests_total", route="/infer", status="500") == 0
    assert "Traceback" not in slow.log() and " ERROR " not in slow.log()
    assert slow.log().count('"status": 499') >= 4


def test_a_replacement_worker_takes_no_request_before_it_is_warm_and_totals_never_fall(tmp_path):
    with run_server(tmp_path, workers=2) as server:
        sent = 0
        obs = observation(4)
        for _ in range(10):
            send = requests.post(
                server.base_url + "/infer",
                data=dict_to_binary(obs),
                timeout=30,
                headers={"Content-Type": "application/octet-stream", "Connection": "close"},
            )
            assert send.status_code == 200
            sent += 1
        victim = sorted(server.ready_workers())[0]
        os.kill(victim, signal.SIGKILL)
        statuses: list[int] = []

        def replaced() -> bool:  # requests go on while the replacement loads
            nonlocal sent
            if len(server.ready_workers() - {victim}) == 2:
                return True
            response = requests.post(
                server.base_url + "/infer",
                data=dict_to_binary(obs),
                timeout=30,
                headers={"Content-Type": "application/octet-stream", "Connection": "close"},
            )
            statuses.append(response.status_code)
            sent += 1
            return False

        eventually(replaced, 60, "a replacement worker ready", every_s=0)
        assert statuses and set(statuses) == {200}, f"answers while the replacement loaded: {statuses}"

        def totals() -> tuple[int, int, int]:
            stats = requests.get(server.base_url + "/stats", timeout=10).json()
            prometheus = metric(scrape(server), "policy_requests_total", route="/infer", status="200")
            return stats["total_requests"], prometheus, stats["failed_requests"]

        # the dead worker's requests still count; a sibling's last count is published on a
        # timer (and counted once its answer was written), so the totals may lag a moment
        eventually(lambda: totals() == (sent, sent, 0), 10, f"totals of {sent} requests, none failed",
                   context=totals)


def test_idle_connections_cannot_lock_the_door(tmp_path):
    """At worker_connections, the longest-idle connections are closed to let new ones in."""
    env = {"GUNICORN_CMD_ARGS": "--worker-connections 40"}
    with run_server(tmp_path, workers=1, args=("--threads", "2"), env=env) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(60)]
        try:
            taken_in(idle, held=40)
            assert requests.get(server.base_url + "/health", timeout=1).status_code == 200
            assert closed_by_server(idle[0], timeout_s=2)  # the oldest went, quietly
            text = scrape(server)
            assert metric(text, "policy_front_door_closed_total", reason="evicted") >= 20
        finally:
            for sock in idle:
                sock.close()
        assert not errors_in(server.log())


def test_too_many_unfinished_requests_on_one_worker_are_refused_and_probes_pass(tmp_path):
    args = ("--threads", "2", "--max-reading-per-worker", "3", "--max-reading-per-client", "100")
    with run_server(tmp_path, workers=1, args=args) as server:
        socks = []
        try:
            for _ in range(4):  # unfinished heads: each one is being read
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
                sock.sendall(b"POST /infer HTTP/1.1\r\n")
                socks.append(sock)
            status, headers, body = read_answer(socks[-1], timeout_s=5)
            assert (status, headers["retry-after"], body["error"]) == (503, "1", "overloaded")
            assert "to this worker" in body["detail"]
            probe = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            with probe:  # also over the cap, but its head shows a probe
                probe.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_answer(probe, timeout_s=5)[0] == 200
        finally:
            for sock in socks:
                sock.close()


def test_a_refused_request_that_waits_for_100_continue_is_closed(door):
    """Refused over the admission limit before its body: the client may never send the body,
    so the connection closes instead of taking its next request for the body."""
    stalled = [stalled_upload(door.port) for _ in range(6)]  # the admission limit, all held
    try:
        time.sleep(TAKE_IN_S)
        sock = socket.create_connection(("127.0.0.1", door.port), timeout=30)
        with sock:
            sock.sendall(_head(door.port, 1000, extra="Expect: 100-continue\r\n"))
            status, headers, body = read_answer(sock, timeout_s=5)
            assert (status, headers["retry-after"], headers["connection"]) == (503, "1", "close")
            assert closed_by_server(sock, timeout_s=5)
    finally:
        gone = uploads_over(door)
        for sock in stalled:
            sock.close()
    noticed_closed(door, gone, len(stalled))


def test_a_low_descriptor_limit_never_kills_the_worker(tmp_path):
    """Under RLIMIT_NOFILE 200 the worker holds fewer connections than worker_connections
    (1000): an accept that runs out of descriptors would otherwise crash it."""
    command = ["bash", "-c", f"ulimit -n 200 && exec {sys.executable} server.py --threads 2"]
    with run_server(tmp_path, workers=1, command=command) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(250)]
        try:
            taken_in(idle, held=136)  # the limit the worker lowers itself to (asserted below)
            assert requests.get(server.base_url + "/health", timeout=1).status_code == 200
        finally:
            for sock in idle:
                sock.close()
        assert "lowered to 136" in server.log()
        assert not errors_in(server.log())
        assert len(server.ready_workers()) == 1  # never restarted


def test_bodies_being_received_are_bounded_in_bytes(tmp_path):
    """Slow uploads cannot make a worker hold unbounded memory: past ``max_reading_bytes``
    a new body is refused (503 + Retry-After) from its head; a probe still answers."""
    args = ("--threads", "2", "--max-reading-bytes", str(2 * BODY_BYTES))
    with run_server(tmp_path, workers=1, args=args) as server:
        held = [stalled_upload(server.port) for _ in range(2)]  # 1.8 MB of bodies being received
        try:
            time.sleep(TAKE_IN_S)
            third = stalled_upload(server.port, sent=0)
            with third:
                status, headers, body = read_answer(third, timeout_s=5)
            assert (status, headers["retry-after"], body["error"]) == (503, "1", "overloaded")
            assert "bytes of request data held" in body["detail"]
            assert requests.get(server.base_url + "/health", timeout=1).status_code == 200
        finally:
            gone = uploads_over(server)
            for sock in held:
                sock.close()
        noticed_closed(server, gone, len(held))  # and their bytes are free again
        with PolicyClient(server.base_url, retries=0) as client:
            assert client.infer(observation(5))["action"].shape == (10, 7)
        assert refusals(scrape(server), "admission", 503) == 1


def test_pipelined_requests_are_answered_in_order_even_after_a_refusal(door):
    """Several requests in one send; a 503 (body read and dropped) does not desynchronise
    the connection: the next request on it is still parsed from its own first byte."""
    body = dict_to_binary(observation(6))
    probe = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    sock = socket.create_connection(("127.0.0.1", door.port), timeout=30)
    with sock:
        sock.sendall(_head(door.port, len(body)) + body + probe + _head(door.port, len(body)) + body)
        answers = read_answers(sock, 3)
        assert [status for status, _, _ in answers] == [200, 200, 200], answers
    # The last answer is on the wire (and its access line written) a moment before its thread
    # hands the admission slot back, which nothing outside the door shows: a fixed pause.
    time.sleep(0.3)
    stalled = [stalled_upload(door.port) for _ in range(6)]  # the admission limit, all held
    try:
        time.sleep(TAKE_IN_S)
        sock = socket.create_connection(("127.0.0.1", door.port), timeout=30)
        with sock:
            sock.sendall(_head(door.port, len(body)) + body + probe)
            (status, headers, detail), (probe_status, _, _) = read_answers(sock, 2)
            assert (status, headers.get("retry-after"), headers["connection"]) == (503, "1", "keep-alive"), detail
            assert probe_status == 200
    finally:
        gone = uploads_over(door)
        for sock in stalled:
            sock.close()
    noticed_closed(door, gone, len(stalled))


def test_a_half_closed_client_still_gets_its_answer(door):
    """shutdown(SHUT_WR) right after a complete request: the client is still reading."""
    body = dict_to_binary(observation(7))
    sock = socket.create_connection(("127.0.0.1", door.port), timeout=30)
    with sock:
        sock.sendall(_head(door.port, len(body)) + body)
        sock.shutdown(socket.SHUT_WR)
        assert read_answer(sock)[0] == 200
        assert closed_by_server(sock, timeout_s=5)
