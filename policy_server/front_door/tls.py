"""TLS in the front door: the handshake and SSL-aware reads, on the poller thread, never blocking.

gunicorn's gthread wraps an accepted socket in SSL on a request thread and does a blocking
handshake there, so a client that stalls its handshake holds a thread. Here the poller
wraps the socket (:func:`gunicorn.sock.ssl_context`, from gunicorn's own ``certfile``,
``keyfile``, ``ca_certs``, ``cert_reqs`` and the ``ssl_context`` hook in gunicorn.conf.py)
and drives ``do_handshake()`` from readiness events:

- ``SSLWantReadError`` / ``SSLWantWriteError``: wait for the socket to be readable/writable;
- the handshake is bounded by ``head_timeout_s`` from accept: a client that stalls it is
  closed (``policy_front_door_closed_total{reason="tls_handshake_timeout"}``) and never
  reaches a thread; until it completes, the connection counts as idle (it is evicted first
  when the worker is at ``worker_connections``);
- rotated certificate files are picked up in place: new handshakes use them within
  ``CERT_CHECK_S`` (a pair that does not load together leaves the previous one serving);
- a plain-HTTP request on the TLS port gets a plain-text 400 JSON answer and is closed;
  other handshake failures (no shared protocol, a missing or bad client certificate) are
  closed and counted (``reason="tls_handshake_failed"``).

After the handshake, reads go through the SSL object. ``select``/``epoll`` only see bytes in
the kernel: bytes OpenSSL has already decrypted (``pending()``) raise no event, so every read
drains them, and a connection coming back from a request thread is read at once when it
still holds some (a pipelined request). Everything after a read (parsing, limits, admission,
dispatch, refusals) is the plain path's code. The request thread writes the answer through
the SSL socket (blocking, with a timeout), as gunicorn does.

Plain HTTP connections never come here: their callback is
:meth:`policy_server.front_door.reader.RequestReader._readable`, unchanged.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import ssl
import time

from policy_server.front_door.conn import BUSY, HANDSHAKING, IDLE, Conn
from policy_server.front_door.http import Refusal, refusal_bytes
from policy_server.front_door.reader import RECV_BYTES

log = logging.getLogger("policy_server.front_door.worker")

CERT_CHECK_S = 1.0  # at most this often a new connection checks the certificate files for a change

PLAIN_HTTP = Refusal(
    400, "bad request", "this port serves HTTPS: use an https:// URL", "plain_http_on_tls",
)


def _new_context(cfg) -> ssl.SSLContext:
    """gunicorn's server context from its certificate settings and the conf's ``ssl_context`` hook."""
    from gunicorn.sock import ssl_context

    return ssl_context(cfg)


class TLSReader:
    """The TLS half of the poller (a mixin over :class:`RequestReader`).

    Needs from the worker: ``cfg`` (gunicorn's config), ``settings``, ``poller``, ``conns``,
    ``obs`` and the reader's ``_start_reading``, ``_advance``, ``_peer_closed``, ``_close``,
    ``_linger``.
    """

    tls_context: ssl.SSLContext | None = None

    def _init_tls(self) -> None:
        """Build the server context when gunicorn is configured for SSL, and note the
        certificate files' state (see :meth:`_check_certificates`)."""
        if not self.cfg.is_ssl:
            return
        self._cert_files = tuple(p for p in (self.cfg.certfile, self.cfg.keyfile, self.cfg.ca_certs) if p)
        self._cert_stamp = self._certificates_stamp()
        self._next_cert_check = time.monotonic() + CERT_CHECK_S
        self.tls_context = _new_context(self.cfg)

    def _certificates_stamp(self) -> tuple:
        stamp = []
        for path in self._cert_files:
            try:
                st = os.stat(path)  # follows links: a Kubernetes secret volume swaps a link
            except OSError:
                stamp.append(None)
            else:
                stamp.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamp)

    def _check_certificates(self) -> None:
        """Certificate rotation without new workers: at most every ``CERT_CHECK_S``, a new
        connection checks whether the certificate, key or CA file changed; if so the next
        handshakes use a context built from them. Files that do not load together (a rotator
        half-way through writing the pair) leave the previous certificate serving, logged
        and counted, until they change again."""
        now = time.monotonic()
        if now < self._next_cert_check:
            return
        self._next_cert_check = now + CERT_CHECK_S
        stamp = self._certificates_stamp()
        if stamp == self._cert_stamp:
            return
        self._cert_stamp = stamp
        try:
            context = _new_context(self.cfg)
        except (OSError, ValueError, ssl.SSLError) as exc:
            log.warning("the certificate files changed but do not load (%s); still serving the previous certificate",
                        exc)
            self.obs.count_certificate_reload("failed")
            return
        self.tls_context = context
        log.info("the certificate files changed: new handshakes use the new certificate")
        self.obs.count_certificate_reload("loaded")

    def _wrap(self, sock: socket.socket, listener) -> socket.socket | None:
        """``sock`` wrapped for a server-side TLS handshake (not started), or None for a
        listener that stays plain (a Unix socket: TLS protects nothing there)."""
        if self.tls_context is None or listener.family == socket.AF_UNIX:
            return None
        self._check_certificates()
        return self.tls_context.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False,
            suppress_ragged_eofs=self.cfg.suppress_ragged_eofs,
        )

    def _handshake(self, conn: Conn) -> None:
        """One step of the handshake; on success the connection is idle (like a fresh plain one)."""
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._want(conn, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._want(conn, selectors.EVENT_WRITE)
            return
        except ssl.SSLEOFError:  # closed before or during the handshake (a TCP probe, a port scan)
            self._close(conn)
            return
        except ssl.SSLError as exc:
            self._handshake_failed(conn, exc)
            return
        except OSError:  # reset during the handshake
            self._close(conn)
            return
        self._want(conn, selectors.EVENT_READ)
        conn.state = IDLE
        conn.deadline = time.monotonic() + (self.cfg.keepalive or 2.0)

    def _handshake_failed(self, conn: Conn, exc: ssl.SSLError) -> None:
        if exc.reason == "HTTP_REQUEST":  # plain HTTP on the TLS port: say so, in plain text
            self.obs.count_refusal(PLAIN_HTTP.route, 400, PLAIN_HTTP.reason, None, conn.addr, 0.0)
            try:
                socket.socket.send(conn.sock, refusal_bytes(PLAIN_HTTP, close=True))  # the raw socket
            except OSError:
                pass
            self._linger(conn)
            return
        log.debug("TLS handshake with %s failed: %s", conn.addr, exc)
        self.obs.count_closed("tls_handshake_failed")
        self._close(conn)

    def _want(self, conn: Conn, events: int) -> None:
        """Wait for ``events`` on the connection (read, or write while OpenSSL must send first)."""
        if conn.want_write != (events == selectors.EVENT_WRITE):
            conn.want_write = events == selectors.EVENT_WRITE
            self.poller.modify(conn.sock, events, conn.callback)

    def _readable_tls(self, conn: Conn, _fileobj=None) -> None:
        """The TLS twin of ``_readable``: handshake, then read records until OpenSSL wants
        more from the kernel, draining what it has already decrypted (``pending()``)."""
        if conn not in self.conns or conn.state == BUSY:
            return
        if conn.state == HANDSHAKING:
            self._handshake(conn)
            if conn.state != IDLE:
                return
        elif conn.want_write:  # a read that had to write first: back to waiting for input
            self._want(conn, selectors.EVENT_READ)
        sock = conn.sock
        taken = 0
        while True:
            in_place = conn.body is not None
            try:
                if in_place:
                    n = sock.recv_into(memoryview(conn.body)[conn.filled:])
                else:
                    n = sock.recv_into(self._scratch)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLWantWriteError:  # TLS 1.3 key update or similar: OpenSSL must send first
                self._want(conn, selectors.EVENT_WRITE)
                return
            except (BlockingIOError, InterruptedError):  # after the half-close of a refusal: raw
                return
            except OSError:  # reset, or a TLS error mid-stream
                n = 0
            if not n:
                self._peer_closed(conn)
                return
            taken += n
            if not self._received(conn, n, in_place):
                return
            # epoll sees the kernel's bytes; only OpenSSL knows what it has decrypted already
            if conn.state == BUSY or conn not in self.conns or (taken >= RECV_BYTES and not sock.pending()):
                return

    def _tls_resume(self, conn: Conn) -> None:
        """Back from a request thread: bytes OpenSSL already decrypted raise no event, so read them now."""
        if conn.sock.pending():
            self._readable_tls(conn)
