"""The image's HEALTHCHECK (``python -m policy_server.healthcheck``) probes where the server
binds, from the same settings: the configured port, the Unix socket, HTTPS."""

from __future__ import annotations

import contextlib
import http.server
import os
import socketserver
import ssl
import subprocess
import sys
import threading

import pytest
import requests

from policy_server import healthcheck
from policy_server.config import ServerConfig
from tests.support.serving import ROOT, free_port, run_server
from tests.support.tls_certs import HAVE_OPENSSL, make_pki


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(self.status if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class _UnixHTTPServer(socketserver.UnixStreamServer):
    def get_request(self):
        request, _ = super().get_request()
        return request, ("local", 0)


@contextlib.contextmanager
def serving(server: socketserver.BaseServer):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def handler(status: int) -> type[_Health]:
    return type("Handler", (_Health,), {"status": status})


@pytest.mark.parametrize(
    "fields, url",
    [({}, "http://127.0.0.1:50000"), ({"host": "0.0.0.0", "port": 50123}, "http://127.0.0.1:50123"),
     ({"host": "::"}, "http://[::1]:50000"), ({"host": "10.1.2.3"}, "http://10.1.2.3:50000"),
     ({"certfile": "c.pem", "keyfile": "k.pem"}, "https://127.0.0.1:50000"),
     ({"uds": "/tmp/p.sock", "port": 50123}, "unix:/tmp/p.sock")],
)
def test_the_target_follows_the_settings(fields, url):
    assert healthcheck.target(ServerConfig(**fields)) == url


def test_healthy_on_the_configured_port_and_not_on_another():
    with serving(http.server.HTTPServer(("127.0.0.1", 0), handler(200))) as server:
        port = server.server_address[1]
        assert healthcheck.main({"POLICY_SERVER_HOST": "0.0.0.0", "POLICY_SERVER_PORT": str(port)}) == 0
        assert healthcheck.main({"POLICY_SERVER_PORT": str(free_port())}) == 1  # nothing listens there


def test_an_error_status_is_unhealthy():
    with serving(http.server.HTTPServer(("127.0.0.1", 0), handler(503))) as server:
        assert healthcheck.probe(ServerConfig(port=server.server_address[1]))[0] is False


def test_the_unix_socket_is_probed_when_there_is_one(tmp_path):
    path = str(tmp_path / "policy.sock")
    with serving(_UnixHTTPServer(path, handler(200))):
        assert healthcheck.main({"POLICY_SERVER_UDS": path, "POLICY_SERVER_UDS_ONLY": "1"}) == 0


@pytest.mark.skipif(not HAVE_OPENSSL, reason="needs the openssl command for a test certificate")
def test_https_is_probed_without_checking_the_certificate(tmp_path):
    pki = make_pki(tmp_path / "pki")
    server = http.server.HTTPServer(("127.0.0.1", 0), handler(200))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "server.pem", pki / "server.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    with serving(server):
        env = {"POLICY_SERVER_PORT": str(server.server_address[1]), "POLICY_SERVER_CERTFILE": str(pki / "server.pem"),
               "POLICY_SERVER_KEYFILE": str(pki / "server.key")}
        assert healthcheck.main(env) == 0


def test_bad_settings_exit_2():
    assert healthcheck.main({"POLICY_SERVER_PORT": "http"}) == 2


@pytest.mark.integration
def test_the_image_command_on_another_port_with_a_key_file(tmp_path):
    """What the image runs (gunicorn -c gunicorn.conf.py, settings from the environment), on a
    port that is not the default, its key from a file: the probe finds it, the key is enforced."""
    key = tmp_path / "api-key"
    key.write_text("key-from-a-mounted-file\n")
    key.chmod(0o600)
    env = {"POLICY_SERVER_API_KEY_FILE": str(key), "POLICY_SERVER_HOST": "127.0.0.1", "POLICY_SERVER_THREADS": "2"}
    command = [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py"]
    with run_server(tmp_path, workers=1, command=command, env=env) as server:
        probe_env = {k: v for k, v in os.environ.items() if not k.startswith("POLICY_SERVER_")}
        probe_env["POLICY_SERVER_PORT"] = str(server.port)
        done = subprocess.run([sys.executable, "-m", "policy_server.healthcheck"], cwd=ROOT, env=probe_env,
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"127.0.0.1:{server.port}/health: 200" in done.stdout
        assert requests.get(server.base_url + "/model_info", timeout=10).status_code == 401
        answer = requests.get(server.base_url + "/model_info", headers={"X-API-Key": "key-from-a-mounted-file"},
                              timeout=10)
        assert answer.status_code == 200
