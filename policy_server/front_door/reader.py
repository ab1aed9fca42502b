"""The front door's poller side: reading each request whole, without blocking, before a thread sees it.

:class:`RequestReader` is mixed into :class:`policy_server.front_door.FrontDoorWorker` and
runs on gunicorn's poller thread only. Per connection (:class:`Conn`) it accepts, receives
the head and the body into a buffer, parses the head (:mod:`policy_server.front_door.http`),
bounds the reading (head timeout, body deadline, reading caps per worker, per address and
in bytes), asks the worker's admission whether to admit, hands a complete request to
the worker (``_dispatch``), and answers refusals itself (JSON, then linger or keep alive).
Connections are bounded too: at ``worker_connections`` (or under RLIMIT_NOFILE) the
longest-idle ones are closed to make room, so idle clients cannot lock the door.
"""

from __future__ import annotations

import errno
import io
import logging
import resource
import selectors
import socket
import time
from functools import partial

from policy_server.front_door.conn import (
    BUSY,
    DISCARDING,
    HANDSHAKING,
    IDLE,
    LINGERING,
    READING,
    WS_IDLE,
    WS_READING,
    Conn,
)
from policy_server.front_door.http import Refusal, head_overflow, parse_head, refusal_bytes, send_quietly

log = logging.getLogger("policy_server.front_door.worker")

RECV_BYTES = 1 << 20
SEND_TIMEOUT_S = 10.0  # a request thread's wait for a client that does not read its answer
LINGER_S = 2.0  # after a closing refusal: read and drop what the client still sends, then close
SCAN_S = 0.05  # how often deadlines are checked
OVER_CAP_GRACE_S = 0.25  # a connection over a reading cap has this long to show a probe's head
PREALLOCATE_BYTES = 4 << 20  # bodies up to this are received in place (a stalled one costs its length)
FD_RESERVE = 64  # descriptors kept for the worker's own files (model, logs, metrics) under RLIMIT_NOFILE
OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
EVICT_FRACTION = 50  # at worker_connections, close this fraction (1/50) of them, the longest idle
EVICT_LOG_S = 10.0

class RequestReader:
    """The poller side of the front door (a mixin over gunicorn's ``ThreadWorker``).

    Needs from the worker: ``settings`` (ServerConfig), ``cfg``, ``poller``, ``alive``,
    ``nr_conns``, ``worker_connections``, ``routes`` (http.AppRoutes), ``obs`` (policy_server.app.observability),
    ``admission`` (admission.Admission), ``_dispatch(conn)``, and for TLS ``tls_context``, ``_wrap`` and
    ``_readable_tls`` (:class:`policy_server.front_door.tls.TLSReader`).
    """

    def _init_reader(self) -> None:
        self.conns: set[Conn] = set()
        self.max_conns = self.worker_connections  # lowered under RLIMIT_NOFILE or when descriptors run out
        self._next_scan = 0.0
        self._evicted = 0  # closed to make room since the last log line
        self._next_evict_log = 0.0
        self.ws_holding: set[Conn] = set()  # upgraded, waiting to send their first frame (front_door_ws)
        self._scratch = bytearray(RECV_BYTES)  # the poller's one receive buffer
        self._scratch_view = memoryview(self._scratch)

    def _fit_descriptor_limit(self) -> None:
        """Hold fewer connections than ``worker_connections`` when RLIMIT_NOFILE would run out first."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft - FD_RESERVE < self.worker_connections:
            self.max_conns = max(8, soft - FD_RESERVE)
            log.warning("worker_connections %d lowered to %d: RLIMIT_NOFILE is %d", self.worker_connections,
                        self.max_conns, soft)

    def accept(self, listener) -> None:
        try:
            sock, client = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                return
            if exc.errno in OUT_OF_FDS:  # hold what we have and make room; the backlog waits
                self.max_conns = max(1, min(self.max_conns, self.nr_conns))
                log.warning("accept failed (%s): at most %d connections from now on", exc.strerror, self.max_conns)
                self._make_room()
                return
            raise
        sock.setblocking(False)
        wrapped = None
        if self.tls_context is not None:
            try:
                wrapped = self._wrap(sock, listener)
            except OSError:  # gone before its handshake began
                sock.close()
                return
        self.nr_conns += 1
        conn = Conn(wrapped or sock, client, listener.getsockname(), time.monotonic(), self.cfg.keepalive or 2.0)
        if wrapped is None:
            conn.callback = partial(self._readable, conn)
        else:  # TLS: the handshake first, bounded like a request head
            conn.callback = partial(self._readable_tls, conn)
            conn.tls = True
            conn.state = HANDSHAKING
            conn.deadline = conn.arrived + self.settings.head_timeout_s
        self.conns.add(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, conn.callback)

    def _readable(self, conn: Conn, _fileobj=None) -> None:
        while True:
            in_place = conn.body is not None  # into the body's own buffer (no copy), drained in one wake-up
            try:
                n = conn.sock.recv_into(memoryview(conn.body)[conn.filled:] if in_place else self._scratch)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                n = 0
            if not n:
                self._peer_closed(conn)
                return
            if not self._received(conn, n, in_place) or conn.body is None:
                return

    def _received(self, conn: Conn, n: int, in_place: bool) -> bool:
        """Take ``n`` bytes just received (into the body, or into the scratch buffer); False: stop reading."""
        if in_place:
            conn.filled += n
            if conn.filled == conn.need:
                self._advance(conn)
            return True
        if conn.state == LINGERING:
            return True
        if conn.ws is not None:  # an upgraded connection: WebSocket frames (front_door_ws)
            self._ws_received(conn, self._scratch_view[:n])
            return conn in self.conns and conn.state != BUSY
        if conn.state == IDLE:  # a request begins: it arrives with its first byte
            conn.arrived = time.monotonic()
            conn.deadline = conn.arrived + self.settings.head_timeout_s
            self._start_reading(conn)
            if conn.state != READING:
                return False
        conn.buf += self._scratch_view[:n]
        self._advance(conn)
        return True

    def _start_reading(self, conn: Conn) -> None:
        conn.state = READING
        # Over a reading cap, the request is refused once its head shows it is not a probe
        # (probes always pass), or after OVER_CAP_GRACE_S if its head has not come by then.
        conn.over_cap = self.admission.begin(conn)

    def _stop_reading(self, conn: Conn) -> None:
        if conn.state != READING:
            return
        self.admission.stop_reading(conn)
        conn.state = IDLE

    def _advance(self, conn: Conn) -> None:
        """Act on what a connection's buffer holds: drop a refused body, parse the head, wait
        for the body, dispatch the complete request."""
        if conn.state == DISCARDING:
            if conn.discard():
                self._keep_alive(conn)
            return
        if conn.req is None and not self._head_arrived(conn):
            return
        body = conn.take_body()
        if body is None:
            return
        conn.req.body = io.BytesIO(body)  # wsgi.input; reading it all returns ``body`` itself, no copy
        self._dispatch(conn)

    def _head_arrived(self, conn: Conn) -> bool:
        """Parse the head once its blank line is in, and admit the request; False: not yet,
        or refused."""
        end = conn.buf.find(b"\r\n\r\n", max(0, conn.scanned - 3))
        if end < 0:
            conn.scanned = len(conn.buf)
            refusal = head_overflow(self.cfg, conn.buf)
            if refusal is not None:
                self._refuse(conn, refusal)
            return False
        try:
            head = parse_head(self.cfg, bytes(conn.buf[: end + 4]), conn.client, conn.nreq + 1, self.routes)
        except Refusal as refusal:
            self._refuse(conn, refusal)
            return False
        conn.head_parsed(head, end + 4)
        return self._admit(conn, head.probe)

    def _admit(self, conn: Conn, probe: bool) -> bool:
        """Whether the request with a parsed head may go on (probes always do): its body's bytes
        are then held, and it gets its body deadline; else it is refused (503)."""
        s = self.settings
        if not probe and conn.over_cap is not None:
            self._refuse(conn, conn.over_cap)
            return False
        overload = None if probe else self.admission.overloaded(conn.need)
        if overload is not None:
            # Kept open only when the client will send its body anyway: one waiting for
            # "100 Continue" may send its next request instead, which would be taken for it.
            waits = conn.req._expected_100_continue and len(conn.buf) < conn.need
            self._refuse(conn, Refusal(503, "overloaded", overload, "admission", retry=True),
                         keep_alive=not conn.req.should_close() and not waits)
            return False
        if probe:  # never refused, but counted
            self.admission.budget.take(conn.need, force=True)
        conn.reserved = conn.need  # taken from the budget (by admission.overloaded for the others)
        conn.deadline = time.monotonic() + s.body_timeout_s + conn.need / s.min_body_bytes_per_s
        # gunicorn's own flag (its parser sets it, its wsgi.create sends "100 Continue" while it
        # is set): the door answers the expectation here, once, and clears it for gunicorn
        if conn.req._expected_100_continue:
            conn.req._expected_100_continue = False
            if len(conn.buf) < conn.need:
                send_quietly(conn.sock, b"HTTP/1.1 100 Continue\r\n\r\n")
        conn.receive_in_place(PREALLOCATE_BYTES)
        return True

    def _refuse(self, conn: Conn, refusal: Refusal, keep_alive: bool = False) -> None:
        """Answer from the poller. ``keep_alive``: the framing is known, drop the body and go on."""
        self._stop_reading(conn)
        route = conn.route if conn.req is not None else refusal.route
        self.obs.count_refusal(
            route, refusal.status, refusal.reason, conn.req or refusal.req, conn.addr, time.monotonic() - conn.arrived
        )
        self.admission.end()
        keep_alive = keep_alive and self.alive
        send_quietly(conn.sock, refusal_bytes(refusal, close=not keep_alive))
        if keep_alive:
            conn.state = DISCARDING
            conn.deadline = (
                time.monotonic() + self.settings.body_timeout_s + conn.need / self.settings.min_body_bytes_per_s
            )
            conn.req = None
            self._advance(conn)
            return
        self._linger(conn)

    def _linger(self, conn: Conn) -> None:
        """Half-close, then drop what still arrives for a while: closing with unread input would
        send a reset that can destroy the answer before the client reads it."""
        conn.linger(time.monotonic() + LINGER_S)
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)

    def _keep_alive(self, conn: Conn) -> None:
        conn.idle(time.monotonic() + (self.cfg.keepalive if self.alive else min(self.cfg.keepalive, 2.0)))
        if conn.buf:  # pipelined: the next request is already here
            conn.arrived = time.monotonic()
            conn.deadline = conn.arrived + self.settings.head_timeout_s
            self._start_reading(conn)
            if conn.state == READING:
                self._advance(conn)

    def _peer_closed(self, conn: Conn) -> None:
        if conn.ws is not None and conn.state != LINGERING:
            self._ws_peer_gone(conn)
            return
        if conn.state == READING:
            if conn.buf or conn.req is not None:
                self.obs.count_vanished(
                    conn.route, conn.req, conn.addr, time.monotonic() - conn.arrived, "while sending its request"
                )
            self.admission.end()
        self._stop_reading(conn)
        self._close(conn)

    def _close(self, conn: Conn) -> None:
        if conn not in self.conns:
            return
        self.conns.discard(conn)
        self.ws_holding.discard(conn)
        if conn.ws is not None:
            self._ws_forget_queued(conn)
        if conn.state != BUSY:
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
        self.nr_conns -= 1
        try:
            conn.sock.close()
        except OSError:
            pass

    def _make_room(self) -> None:
        """At ``worker_connections``: close the longest-idle connections (no request begun: idle
        keep-alive, unfinished TLS handshakes, WebSockets between messages, those with a close
        frame first), then answered ones still lingering, so a new client (a probe) is still
        accepted: idle connections cannot lock the door. The newest connections were active
        last, so they go last."""
        idle = sorted(
            (c for c in self.conns
             if (c.state in (IDLE, HANDSHAKING) and not c.buf) or (c.state == WS_IDLE and c.ws.greeted)),
            key=lambda c: c.last_active,
        )
        room = max(1, self.max_conns // EVICT_FRACTION)
        evicted = idle[:room]
        if len(evicted) < room:
            evicted += [c for c in self.conns if c.state == LINGERING][: room - len(evicted)]
        for conn in evicted:
            if conn.state == WS_IDLE:
                self._ws_evict(conn)
            else:
                self._close(conn)
        if evicted:
            self.obs.count_closed("evicted", len(evicted))
            self._evicted += len(evicted)
            now = time.monotonic()
            if now >= self._next_evict_log:  # at most one line per EVICT_LOG_S under a flood
                self._next_evict_log = now + EVICT_LOG_S
                log.info("at %d connections: closed %d idle ones to make room", self.max_conns, self._evicted)
                self._evicted = 0

    def _expire(self) -> None:
        now = time.monotonic()
        if now < self._next_scan:
            return
        self._next_scan = now + SCAN_S
        for conn in [c for c in self.conns if c.over_cap is not None and c.state == READING and c.req is None]:
            if now - conn.arrived > OVER_CAP_GRACE_S:
                self._refuse(conn, conn.over_cap)
        if self.ws_holding:
            self._ws_check_greetings()
        for conn in [c for c in self.conns if c.state != BUSY and c.deadline <= now]:
            if conn.state in (WS_IDLE, WS_READING):
                self._ws_expired(conn)
            elif conn.state == READING:
                part = "body" if conn.req is not None else "request head"
                self._refuse(
                    conn, Refusal(408, "request timeout", f"{part} not received in time", f"{part.split()[-1]}_timeout")
                )
            else:  # idle keep-alive, discarding or lingering
                if conn.state == IDLE:
                    self.obs.count_closed("idle")
                elif conn.state == HANDSHAKING:
                    self.obs.count_closed("tls_handshake_timeout")
                self._close(conn)
