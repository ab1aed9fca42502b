"""``python -m policy_server.healthcheck``: exit 0 when this instance's ``/health`` answers 200.

The image's HEALTHCHECK. It reads the same ``POLICY_SERVER_*`` settings as the server
(``ServerConfig.from_env``), so it probes where the server binds: the ``--uds`` socket when
there is one (plain HTTP, no client certificate needed), else the TCP port, over HTTPS when
the server serves it (the certificate is not checked: this is the instance's own listener
on loopback). A wildcard bind (0.0.0.0, ::) is probed on loopback. Key files are not read:
``/health`` needs no key. Standard library only, so the probe starts fast.
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import sys
from collections.abc import Mapping

from policy_server.config import ServerConfig
from policy_server.errors import ConfigError

log = logging.getLogger(__name__)

PATH = "/health"
TIMEOUT_S = 2.0
_WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a Unix domain socket (the Host header says localhost)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def target(config: ServerConfig) -> str:
    """Where the probe goes, as a URL-like string: ``unix:PATH`` or ``http(s)://HOST:PORT``."""
    if config.uds:
        return f"unix:{config.uds}"
    host = _WILDCARDS.get(config.host, config.host).strip("[]")
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if config.tls else 'http'}://{shown}:{config.port}"


def _connection(config: ServerConfig, timeout_s: float) -> http.client.HTTPConnection:
    if config.uds:
        return _UnixConnection(config.uds, timeout_s)
    host = _WILDCARDS.get(config.host, config.host).strip("[]")
    if config.tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return http.client.HTTPSConnection(host, config.port, timeout=timeout_s, context=context)
    return http.client.HTTPConnection(host, config.port, timeout=timeout_s)


def probe(config: ServerConfig, timeout_s: float = TIMEOUT_S) -> tuple[bool, str]:
    """(healthy, what was seen): GET /health on the instance ``config`` describes."""
    where = target(config)
    connection = _connection(config, timeout_s)
    try:
        connection.request("GET", PATH, headers={"Connection": "close"})
        response = connection.getresponse()
        response.read()
    except (OSError, http.client.HTTPException) as exc:
        return False, f"{where}{PATH}: {exc}"
    finally:
        connection.close()
    return response.status == 200, f"{where}{PATH}: {response.status} {response.reason}"


def main(environ: Mapping[str, str] | None = None) -> int:
    """The probe as a command: logs one line, returns 0 (healthy), 1 (not) or 2 (bad settings)."""
    logging.basicConfig(level=logging.INFO, format="healthcheck: %(message)s", stream=sys.stdout)
    try:
        config = ServerConfig.from_env(environ, read_key_files=False)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    healthy, seen = probe(config)
    log.log(logging.INFO if healthy else logging.ERROR, "%s", seen)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
