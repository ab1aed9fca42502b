"""TLS: the certificate settings in the config, and HTTPS end to end through a real gunicorn,
the front door doing the handshake on its poller (policy_server/front_door/tls.py).

Certificates are made per run with the ``openssl`` command (tests/support/tls_certs.py): a test CA, a
server certificate for 127.0.0.1 and localhost, and a client certificate (mutual TLS)."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from binary_protocol import dict_to_binary
from policy_server.config import ServerConfig
from policy_server.errors import ConfigError
from policy_server.launcher import ROOT, build_config
from request_tools import PolicyClient, PolicyConnectionError, send_inference_request
from tests.support.prometheus import metric, scrape
from tests.support.raw_http import closed_by_server, read_answer, read_answers, taken_in
from tests.support.serving import errors_in, run_server
from tests.support.tls_certs import HAVE_OPENSSL, issue_server_certificate, make_pki
from tests.support.wait import eventually

HEAD_TIMEOUT_S = 1.0

pytestmark = pytest.mark.skipif(not HAVE_OPENSSL, reason="needs the openssl command")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca.pem; server.pem/.key (127.0.0.1, localhost); client.pem/.key; other.key (matches nothing)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls_args(pki: Path) -> tuple[str, ...]:
    return ("--certfile", str(pki / "server.pem"), "--keyfile", str(pki / "server.key"))


# -- the config ---------------------------------------------------------------------


def test_certificate_settings_are_flags_and_variables(pki):
    env = {"POLICY_SERVER_CERTFILE": str(pki / "server.pem"), "POLICY_SERVER_KEYFILE": str(pki / "server.key")}
    config = ServerConfig.from_sources(["--ca-certs", str(pki / "ca.pem"), "--cert-reqs", "required",
                                        "--tls-min-version", "1.3"], env)
    config.validate()
    assert config.tls and config.cert_reqs_flag() == ssl.CERT_REQUIRED
    assert config.tls_minimum_version() == ssl.TLSVersion.TLSv1_3
    assert ServerConfig.from_env(config.to_env()) == config
    assert not ServerConfig().tls


def test_launcher_makes_certificate_paths_absolute(pki, monkeypatch):
    monkeypatch.chdir(pki)
    config = build_config(["--certfile", "server.pem", "--keyfile", "server.key", "--ca-certs", "ca.pem",
                           "--model-path", str(Path(ROOT) / "models" / "default")], {})
    assert (config.certfile, config.keyfile, config.ca_certs) == tuple(
        str(pki / name) for name in ("server.pem", "server.key", "ca.pem"))


@pytest.mark.parametrize("settings, message", [
    ({"certfile": "server.pem"}, "certfile and keyfile go together"),
    ({"keyfile": "server.key"}, "certfile and keyfile go together"),
    ({"certfile": "missing.pem", "keyfile": "server.key"}, "certfile '.*missing.pem' is not a readable file"),
    ({"certfile": "server.pem", "keyfile": "missing.key"}, "keyfile '.*missing.key' is not a readable file"),
    ({"certfile": "server.pem", "keyfile": "server.key", "ca_certs": "missing.pem"}, "ca_certs .* not a readable"),
    ({"certfile": "server.pem", "keyfile": "other.key"}, "cannot load certfile .* does not match"),
    ({"certfile": "server.key", "keyfile": "server.key"}, "cannot load certfile"),
    ({"certfile": "server.pem", "keyfile": "server.key", "cert_reqs": "required"}, "cert_reqs required needs ca_certs"),
    ({"ca_certs": "ca.pem"}, "need certfile and keyfile"),
    ({"cert_reqs": "always"}, "cert_reqs 'always' is not none, optional or required"),
    ({"tls_min_version": "1.1"}, "tls_min_version '1.1' is not 1.2 or 1.3"),
])
def test_bad_certificate_settings_are_clear_config_errors(pki, settings, message):
    settings = {k: str(pki / v) if k in ("certfile", "keyfile", "ca_certs") else v for k, v in settings.items()}
    with pytest.raises(ConfigError, match=message):
        ServerConfig(**settings).validate()


def test_server_refuses_to_start_with_a_certificate_but_no_key(pki):
    result = subprocess.run(
        [sys.executable, "server.py", "--certfile", str(pki / "server.pem")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "certfile and keyfile go together" in result.stderr


# -- end to end ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(pki, tmp_path_factory):
    """1 worker x 4 threads serving HTTPS on TCP, and plain HTTP on a Unix socket beside it."""
    tmp = tmp_path_factory.mktemp("tls")
    args = (*_tls_args(pki), "--uds", str(tmp / "plain.sock"), "--head-timeout-s", str(HEAD_TIMEOUT_S),
            "--body-timeout-s", "1", "--min-body-bytes-per-s", "1000000")
    with run_server(tmp, workers=1, args=args, tls_ca=str(pki / "ca.pem")) as server:
        server.socket_path = tmp / "plain.sock"
        yield server


def tls_socket(port: int, ca: Path, timeout_s: float = 30.0) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(ca))
    return context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=timeout_s),
                               server_hostname="127.0.0.1")


def _observation() -> dict:
    from examples.reacher import ReacherEnv

    return ReacherEnv(seed=3).reset()


@pytest.mark.integration
def test_https_gives_the_same_action_as_plain_http(tls_server, pki):
    obs = _observation()
    assert tls_server.base_url.startswith("https://")
    with PolicyClient(f"unix://{tls_server.socket_path}") as plain:
        expected = plain.infer(obs)["action"]
    with PolicyClient(tls_server.base_url, verify=str(pki / "ca.pem")) as client:
        assert client.ready()
        np.testing.assert_array_equal(client.infer(obs)["action"], expected)
        np.testing.assert_allclose(client.infer_batch([obs, obs])["action"], np.stack([expected] * 2), atol=1e-5)
        np.testing.assert_array_equal(client.clone().infer(obs)["action"], expected)
    answer = send_inference_request(obs, tls_server.base_url + "/infer", verify=str(pki / "ca.pem"))
    np.testing.assert_array_equal(answer["action"], expected)


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:Unverified HTTPS request")
def test_an_untrusted_certificate_fails_with_a_tls_error_and_is_not_retried(tls_server):
    with PolicyClient(tls_server.base_url, check_spec=False, retries=3) as client:  # verify=True: system CAs only
        began = time.monotonic()
        with pytest.raises(PolicyConnectionError, match="TLS failed") as failure:
            client.infer({"x": np.zeros(1)})
        assert isinstance(failure.value.__cause__, requests.exceptions.SSLError)
        assert "CERTIFICATE_VERIFY_FAILED" in str(failure.value)
        assert time.monotonic() - began < 5.0  # no backoff retries
        assert not client.health()
    with pytest.raises(PolicyConnectionError, match="TLS failed"):
        send_inference_request({"x": np.zeros(1)}, tls_server.base_url + "/infer")
    obs = _observation()
    assert "action" in send_inference_request(obs, tls_server.base_url + "/infer", verify=False)


@pytest.mark.integration
def test_keep_alive_over_tls_reuses_one_connection(tls_server, pki):
    obs = _observation()
    with PolicyClient(tls_server.base_url, verify=str(pki / "ca.pem")) as client:
        actions = [client.infer(obs)["action"] for _ in range(5)]
        assert client.health()
        pools = client._session.get_adapter(tls_server.base_url).poolmanager.pools
        opened = sum(pools[key].num_connections for key in pools.keys())
    assert opened == 1  # model_info, five infers and a probe on one TLS connection
    for action in actions[1:]:
        np.testing.assert_array_equal(action, actions[0])
    with tls_socket(tls_server.port, pki / "ca.pem") as sock:  # the raw server side of it
        for _ in range(3):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            status, headers, body = read_answer(sock)
            assert (status, body, headers.get("connection", "keep-alive")) == (200, {"status": "ok"}, "keep-alive")


@pytest.mark.integration
def test_a_request_already_decrypted_is_read_after_the_previous_answer(tls_server, pki):
    """A body received in place leaves the next pipelined request inside OpenSSL (pending()),
    where epoll cannot see it: it must still be answered at once."""
    body = dict_to_binary(_observation())
    head = (f"POST /infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    probe = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with tls_socket(tls_server.port, pki / "ca.pem", timeout_s=10.0) as sock:
        sock.sendall(head + body[:100])
        time.sleep(0.2)  # the scenario: the head arrives alone, the rest of the body is received in place
        sock.sendall(body[100:-50])
        sock.sendall(body[-50:] + probe)  # one record: the body's end and the next request
        answers = read_answers(sock, 2, timeout_s=10.0)
    assert [status for status, _, _ in answers] == [200, 200]
    assert answers[1][2] == {"status": "ok"}


@pytest.mark.integration
def test_plain_http_on_the_tls_port_is_told_and_closed(tls_server, pki):
    before = metric(scrape(tls_server, verify=str(pki / "ca.pem")), "policy_front_door_refusals_total",
                    reason="plain_http_on_tls", status="400")
    answer = requests.get(f"http://127.0.0.1:{tls_server.port}/health", timeout=10)
    assert answer.status_code == 400 and "https://" in answer.json()["detail"]
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as sock:
        sock.sendall(b"\x00garbage that is neither TLS nor HTTP\r\n\r\n")
        assert closed_by_server(sock)
    with PolicyClient(tls_server.base_url, verify=str(pki / "ca.pem")) as client:
        assert client.health() and "action" in client.infer(_observation())
    after = metric(scrape(tls_server, verify=str(pki / "ca.pem")), "policy_front_door_refusals_total",
                   reason="plain_http_on_tls", status="400")
    assert after == before + 1
    assert len(tls_server.ready_workers()) == 1 and not errors_in(tls_server.log())


def _client_hello() -> bytes:
    """The first flight of a real TLS client (its ClientHello), without any socket."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.integration
def test_a_stalled_handshake_holds_no_thread_and_is_closed_after_the_head_timeout(tls_server, pki):
    hello = _client_hello()
    before = metric(scrape(tls_server, verify=str(pki / "ca.pem")), "policy_front_door_closed_total",
                    reason="tls_handshake_timeout")
    stalled = []
    for i in range(6):  # more than the worker's 4 request threads
        sock = socket.create_connection(("127.0.0.1", tls_server.port), timeout=30)
        sock.sendall([b"", hello[:len(hello) // 2], hello][i % 3])  # nothing, half a hello, a whole one
        stalled.append(sock)
    began = time.monotonic()
    with PolicyClient(tls_server.base_url, verify=str(pki / "ca.pem")) as client:
        assert client.health() and client.ready()  # probes answered while the handshakes stall
        assert "action" in client.infer(_observation())
    try:
        # Nothing to wait for: 0.3 s of the 1 s head timeout pass, and no stalled handshake may be
        # closed by then.
        time.sleep(max(0.0, 0.3 - (time.monotonic() - began)))
        for sock in stalled:  # not closed before the head timeout ...
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                data = sock.recv(65536)
                while data and not data.startswith(b"\x15"):  # a ServerHello is fine; an alert is not
                    data = sock.recv(65536)
            sock.setblocking(True)
        for sock in stalled:  # ... and closed after it
            assert closed_by_server(sock, timeout_s=HEAD_TIMEOUT_S + 10)
    finally:
        for sock in stalled:
            sock.close()
    after = metric(scrape(tls_server, verify=str(pki / "ca.pem")), "policy_front_door_closed_total",
                   reason="tls_handshake_timeout")
    assert after == before + len(stalled)
    assert len(tls_server.ready_workers()) == 1 and not errors_in(tls_server.log())


@pytest.mark.integration
def test_a_body_stalled_after_the_handshake_gets_408(tls_server, pki):
    with tls_socket(tls_server.port, pki / "ca.pem") as sock:
        sock.sendall(b"POST /infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Length: 100000\r\n\r\n" + b"\0" * 1000)
        status, headers, body = read_answer(sock, timeout_s=30.0)
        assert status == 408 and body == {"error": "request timeout", "detail": "body not received in time"}
        assert headers["connection"] == "close"
        assert closed_by_server(sock)
    with PolicyClient(tls_server.base_url, verify=str(pki / "ca.pem")) as client:
        assert client.health()


@pytest.mark.integration
def test_client_certificates_and_the_minimum_version(pki, tmp_path):
    ca = str(pki / "ca.pem")
    args = (*_tls_args(pki), "--ca-certs", ca, "--cert-reqs", "required", "--tls-min-version", "1.3")
    client_cert = (str(pki / "client.pem"), str(pki / "client.key"))
    with run_server(tmp_path, workers=1, args=args, tcp=False) as server:  # tcp=False: no plain /health check
        url = f"https://127.0.0.1:{server.port}"
        with PolicyClient(url, verify=ca, cert=client_cert) as client:
            assert client.health() and "action" in client.infer(_observation())
        with PolicyClient(url, verify=ca, check_spec=False, retries=0) as anonymous, \
                pytest.raises(PolicyConnectionError):
            anonymous.infer({"x": np.zeros(1)})
        old = ssl.create_default_context(cafile=ca)
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        old.load_cert_chain(*client_cert)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw, \
                pytest.raises(ssl.SSLError, match="(?i)version"):
            old.wrap_socket(raw, server_hostname="127.0.0.1")
        with PolicyClient(url, verify=ca, cert=client_cert) as client:
            assert client.health()
        assert not errors_in(server.log())


@pytest.mark.integration
def test_stalled_handshakes_cannot_lock_the_door(pki, tmp_path):
    """At worker_connections, connections still in their handshake are closed with the idle
    ones to let new clients in (the head timeout, 10 s by default, would be too late)."""
    env = {"GUNICORN_CMD_ARGS": "--worker-connections 40"}
    ca = str(pki / "ca.pem")
    with run_server(tmp_path, workers=1, args=_tls_args(pki), env=env, tls_ca=ca) as server:
        stalled = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(60)]
        try:
            taken_in(stalled, held=40)
            assert requests.get(server.base_url + "/health", timeout=2, verify=ca).status_code == 200
            assert closed_by_server(stalled[0], timeout_s=2)  # the oldest went, quietly
            assert metric(scrape(server, verify=ca), "policy_front_door_closed_total", reason="evicted") >= 20
        finally:
            for sock in stalled:
                sock.close()
        assert not errors_in(server.log())


def _served_certificate(port: int, ca: Path) -> bytes:
    """The DER certificate the server presents now (a fresh connection and handshake)."""
    with tls_socket(port, ca, timeout_s=10) as sock:
        return sock.getpeercert(binary_form=True)


@pytest.mark.integration
def test_rotated_certificate_files_are_served_without_new_workers(pki, tmp_path):
    """Certificates rotate (cert-manager, ACME): the files are replaced in place. New handshakes
    use them within about a second, by the same worker (no restart, no model reload); a pair
    that does not match yet (half-way through a rotation) leaves the old certificate serving."""
    live = tmp_path / "live"
    live.mkdir()
    for name in ("server.pem", "server.key"):
        shutil.copy(pki / name, live / name)
    rotated = shutil.copytree(pki, tmp_path / "pki")
    new_pem, new_key = issue_server_certificate(rotated, "rotated")
    args = ("--certfile", str(live / "server.pem"), "--keyfile", str(live / "server.key"))
    ca = pki / "ca.pem"

    def swap(source: Path, target: str) -> None:  # each file replaced whole, as a rotator does
        shutil.copy(source, live / f"{target}.new")
        (live / f"{target}.new").replace(live / target)

    def reloads(outcome: str) -> float:
        return metric(scrape(server, verify=str(ca)), "policy_tls_certificate_reloads_total", outcome=outcome) or 0.0

    with run_server(tmp_path, workers=1, args=args, tls_ca=str(ca)) as server:
        old = _served_certificate(server.port, ca)
        assert old == ssl.PEM_cert_to_DER_cert((pki / "server.pem").read_text())
        workers = server.ready_workers()

        swap(new_pem, "server.pem")  # the new certificate beside the old key: they do not load together
        eventually(lambda: reloads("failed") >= 1, 15, "a failed certificate reload counted", every_s=0.1,
                   context=lambda: server.log()[-2000:])
        assert _served_certificate(server.port, ca) == old
        assert "still serving the previous certificate" in server.log()

        swap(new_key, "server.key")
        new = ssl.PEM_cert_to_DER_cert(new_pem.read_text())
        eventually(lambda: _served_certificate(server.port, ca) == new, 15, "the new certificate served",
                   every_s=0.1, context=lambda: server.log()[-2000:])
        assert reloads("loaded") >= 1
        with PolicyClient(server.base_url, verify=str(ca)) as client:
            assert client.infer(_observation())["action"].shape[-1] > 0
        assert server.ready_workers() == workers  # the same worker: no restart, no model reload
