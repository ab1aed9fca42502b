"""HTTP over a Unix domain socket: ``unix:///path/to.sock`` URLs for a server started with
``--uds`` on the same machine (no TCP stack, no port to guard)."""

from __future__ import annotations

import socket
from typing import Any

import requests
import urllib3

__all__ = ["UnixSocketAdapter", "unix_socket_path"]


def unix_socket_path(url: str) -> str | None:
    """The socket path of a ``unix:///path/to.sock`` URL, None for any other URL."""
    if not url.startswith("unix://"):
        return None
    path = url[len("unix://"):].rstrip("/")
    if not path.startswith("/"):
        raise ValueError(f"{url!r}: a Unix socket URL needs an absolute path, unix:///path/to.sock")
    return path


class _UnixConnection(urllib3.connection.HTTPConnection):
    """An HTTP connection over a Unix domain socket (the host name is only for the Host header)."""

    def __init__(self, *args: Any, socket_path: str, **kwargs: Any) -> None:
        self.socket_path = socket_path
        super().__init__(*args, **kwargs)

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(urllib3.util.Timeout.resolve_default_timeout(self.timeout))
        try:
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            raise urllib3.exceptions.NewConnectionError(self, f"connecting to {self.socket_path}: {exc}") from exc
        return sock


class _UnixPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _UnixConnection

    def __init__(self, socket_path: str, maxsize: int) -> None:
        super().__init__("localhost", maxsize=maxsize, block=False)
        self.conn_kw["socket_path"] = socket_path


class UnixSocketAdapter(requests.adapters.HTTPAdapter):
    """A requests transport adapter for one Unix domain socket, with keep-alive connections.

    Mounted by :class:`PolicyClient` for ``unix://`` URLs; usable on any Session with
    ``session.mount("http://localhost/", UnixSocketAdapter("/path/to.sock"))``.
    """

    def __init__(self, socket_path: str, pool_maxsize: int = 10) -> None:
        super().__init__(pool_maxsize=pool_maxsize)
        self._pool = _UnixPool(socket_path, pool_maxsize)

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        return self._pool

    def get_connection(self, url, proxies=None):
        return self._pool

    def request_url(self, request, proxies):
        return request.path_url

    def close(self) -> None:
        self._pool.close()
        super().close()
