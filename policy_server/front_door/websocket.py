"""WebSocket connections in the front door: framing on the poller, one message at a time on a thread.

A WebSocket begins as an HTTP request: the app answers an upgrade with 101 and hands the
front door a *session* (``environ[UPGRADE]``, an app object that knows the protocol spoken
over the socket, e.g. :class:`policy_server.openpi.session.OpenpiSession`). From then on
the connection stays in the front door like any other, and the same bounds hold:

- the poller reads frames without blocking (wsproto, a sans-I/O WebSocket library, parses
  and unmasks them); a message's bytes are taken from the worker's byte budget as they
  arrive, and its size is bounded (``max_body_bytes``: past it, close 1009);
- a message being received is bounded in time like a body: ``body_timeout_s`` plus its size
  at ``min_body_bytes_per_s`` from its first byte; a stalled one is closed (1008) and never
  holds a thread; an idle connection is closed after ``ws_idle_timeout_s`` (1001);
- a complete message counts as a request from its first byte: the worker's admission
  (:mod:`policy_server.front_door.admission`; past it, a text refusal and close 1013) holds
  it until it is answered; it is then run on a request thread, which writes the answer (one
  message per request, in order: the socket is not read while its message is served);
- pings are answered by the poller, also while the session holds its first frame until
  the model is ready (``session.greeting()`` returns None until then);
- on shutdown, idle connections are closed with 1001 at once, busy ones once answered.

What a session gives the front door: ``route`` (its label in metrics and logs), ``ready()``
(whether its first frame can be sent), ``greeting() -> bytes | None`` (the first frame, None
while it must wait), ``handle(payload, arrived) -> Reply`` and ``late(reply) -> Reply`` (what
to send instead of a reply whose deadline passed before it could be written).
"""

from __future__ import annotations

import logging
import selectors
import time

from wsproto.events import BytesMessage, CloseConnection, Message, Ping, Pong, TextMessage
from wsproto.frame_protocol import Opcode

from policy_server.front_door.conn import BUSY, WS_IDLE, WS_READING, Reply, WebSocket
from policy_server.front_door.http import peer_went
from policy_server.front_door.reader import SEND_TIMEOUT_S

log = logging.getLogger("policy_server.front_door.worker")

# Close codes (RFC 6455 section 7.4.1)
GOING_AWAY, UNSUPPORTED_DATA, POLICY_VIOLATION, TOO_BIG, TRY_AGAIN_LATER = 1001, 1003, 1008, 1009, 1013
REFUSALS = {400: "bad request", 408: "request timeout", 413: "payload too large", 503: "overloaded"}
FRAMES_BASE = 64  # frames one message may take, plus one per KiB of it (a flood of empty fragments costs a poller)


class WebSocketReader:
    """The WebSocket half of the front door (a mixin over the reader and the worker).

    Needs from the worker: ``settings``, ``poller``, ``conns``, ``admission``, ``tpool``,
    ``method_queue``, ``alive``, ``obs``, ``_close``, ``_linger``, ``_timed``
    and, for TLS, ``_tls_resume``.
    """

    # -- from a request thread: the upgrade is written ------------------------------

    def _ws_upgraded(self, conn, session) -> None:
        """The app answered 101 with ``session``: the connection speaks WebSocket from now
        on. Sends the session's first frame when it is ready (this is a request thread)."""
        conn.ws = WebSocket(session, self.settings.max_body_bytes)
        self._ws_greet(conn)

    def _ws_greet(self, conn) -> None:
        """Send the first frame if the session has it ready (on a request thread)."""
        greeting = conn.ws.session.greeting()
        if greeting is not None:
            self._ws_write(conn, Reply(greeting))
            conn.ws.greeted = True

    # -- poller: the connection comes back from a thread ------------------------------

    def _ws_resume(self, conn, keep: bool) -> None:
        """Back from a request thread: read frames again, run a message that waited, or close."""
        ws = conn.ws
        if not keep or ws.proto.state.name != "OPEN":
            if ws.proto.state.name == "LOCAL_CLOSING":  # our close frame went out: let the client's reply in
                conn.sock.setblocking(False)
                self.poller.register(conn.sock, selectors.EVENT_READ, conn.callback)
                self._linger(conn)  # closing at once could reset the error text before the client reads it
            else:
                self._close(conn)
            return
        if not self.alive:
            self._ws_close(conn, GOING_AWAY, "server shutting down")
            return
        conn.sock.setblocking(False)
        conn.state = WS_IDLE
        conn.deadline = time.monotonic() + self.settings.ws_idle_timeout_s
        conn.last_active = time.monotonic()
        self.poller.register(conn.sock, selectors.EVENT_READ, conn.callback)
        if conn.buf:  # frames that came in behind the upgrade request
            early, conn.buf = bytes(conn.buf), bytearray()
            ws.proto.receive_data(early)
        if not ws.greeted:
            self.ws_holding.add(conn)  # greeted by the poller's scan once the session is ready
        elif ws.queued:
            self._ws_dispatch(conn, *ws.queued.pop(0))
            return
        self._ws_events(conn)  # frames already received behind the last message (a ping, the next one)
        if conn in self.conns and conn.state in (WS_IDLE, WS_READING) and conn.tls:
            self._tls_resume(conn)

    # -- poller: bytes arrive ---------------------------------------------------------

    def _ws_received(self, conn, data) -> None:
        """Feed received bytes to the connection's WebSocket and act on its events."""
        conn.ws.proto.receive_data(bytes(data))
        self._ws_events(conn)

    def _ws_events(self, conn) -> None:
        """Act on the frames wsproto has parsed, until a message goes to a thread (the rest
        waits in wsproto's buffer for :meth:`_ws_resume`) or the connection closes."""
        ws = conn.ws
        now = time.monotonic()
        if conn.state == WS_IDLE:
            conn.deadline = now + self.settings.ws_idle_timeout_s  # any frame, a ping too, is a sign of life
        conn.last_active = now
        for event in ws.proto.events():
            if isinstance(event, Message):
                if not self._ws_part(conn, event, now):
                    return
            elif isinstance(event, (Ping, Pong)):
                if not ws.control_allowed(now):
                    self._ws_flooded(conn, "control frames (pings, pongs)")
                    return
                if isinstance(event, Ping):
                    self._ws_send_now(conn, ws.proto.send(event.response()))
            elif isinstance(event, CloseConnection):
                if ws.headers.declared:  # our frame-header check, not the peer
                    self._ws_too_big(conn, now)
                elif ws.proto.state.name == "OPEN":  # wsproto could not parse a frame: not the peer's close
                    self._ws_malformed(conn, event, now)
                else:
                    self._ws_closed_by_peer(conn, event)
                return
            if conn not in self.conns or conn.state not in (WS_IDLE, WS_READING):
                return
        if conn.state == WS_IDLE and ws.headers.opened is not None:  # a header and no payload yet
            self._ws_begin(conn, now, ws.headers.opened is Opcode.TEXT)

    def _ws_begin(self, conn, now: float, text: bool) -> None:
        """A message begins (its header or first bytes): a request from now on, with its time limit."""
        ws, s = conn.ws, self.settings
        conn.state = WS_READING
        ws.first_byte = conn.arrived = now
        ws.frames = 0
        ws.text = text
        ws.headers.opened = None
        conn.nreq += 1
        self.admission.hold()
        conn.deadline = now + s.body_timeout_s

    def _ws_too_big(self, conn, now: float) -> None:
        """A data frame declared more than a message may hold: refused before its payload."""
        ws = conn.ws
        if conn.state == WS_IDLE:
            self._ws_begin(conn, now, False)
        self._ws_refuse(conn, TOO_BIG, 413, f"a frame declares {ws.headers.declared} bytes, over the limit of "
                        f"{self.settings.max_body_bytes} for a message", "too_large")

    def _ws_malformed(self, conn, event: CloseConnection, now: float) -> None:
        """A frame that breaks RFC 6455 (a reserved opcode or bit, no mask, invalid UTF-8 in
        a text frame, a stray continuation): a text refusal, then wsproto's close code (1002, 1007)."""
        if conn.state == WS_IDLE:
            self._ws_begin(conn, now, False)
        self._ws_refuse(conn, event.code, 400, f"malformed frame: {event.reason}"[:200], "malformed")

    def _ws_part(self, conn, event: Message, now: float) -> bool:
        """One piece of a message; False when the connection was refused and closed."""
        ws, s = conn.ws, self.settings
        if conn.state == WS_IDLE:  # a message begins: a request from its first byte
            self._ws_begin(conn, now, isinstance(event, TextMessage))
        data = event.data.encode() if isinstance(event.data, str) else event.data
        ws.frames += event.frame_finished
        if ws.frames > FRAMES_BASE + (ws.size + len(data)) // 1024:  # a flood of tiny fragments
            self._ws_refuse(conn, POLICY_VIOLATION, 400, f"more than {FRAMES_BASE} frames plus one per KiB in one "
                            "message", "too_many_frames")
            return False
        if ws.size + len(data) > s.max_body_bytes:
            self._ws_refuse(conn, TOO_BIG, 413, f"message over the limit of {s.max_body_bytes} bytes", "too_large")
            return False
        budget = self.admission.budget
        if not budget.take(len(data)):
            self._ws_refuse(conn, TRY_AGAIN_LATER, 503, f"{budget.used} bytes of request data held by this worker",
                            "admission")
            return False
        ws.size += len(data)
        ws.parts.append(data)
        conn.deadline = ws.first_byte + s.body_timeout_s + ws.size / s.min_body_bytes_per_s
        if event.message_finished:
            self._ws_message(conn)
        return True

    def _ws_message(self, conn) -> None:
        """A whole message is in: refuse it, keep it for after the first frame, or run it."""
        ws = conn.ws
        payload = ws.parts[0] if len(ws.parts) == 1 else b"".join(ws.parts)
        size, ws.parts, ws.size = ws.size, [], 0
        if ws.text:
            self.admission.budget.give(size)
            self._ws_refuse(conn, UNSUPPORTED_DATA, 400, "send binary frames (msgpack), not text", "text_frame")
            return
        overload = self.admission.overloaded(0)
        if overload is not None:
            self.admission.budget.give(size)
            self._ws_refuse(conn, TRY_AGAIN_LATER, 503, overload, "admission")
            return
        conn.state = WS_IDLE
        if not ws.greeted:  # the client spoke first; it is answered after the first frame
            ws.queued.append((payload, size, ws.first_byte))
            return
        self._ws_dispatch(conn, payload, size, ws.first_byte)

    def _ws_dispatch(self, conn, payload: bytes, size: int, arrived: float) -> None:
        conn.state = BUSY
        self.poller.unregister(conn.sock)
        conn.arrived = arrived
        self.admission.hand_off(conn)
        future = self.tpool.submit(self._timed, conn, lambda: self._ws_serve(conn, payload, size, arrived))
        future.add_done_callback(lambda fut: self.method_queue.defer(self._ws_finished, conn, fut))

    def _ws_finished(self, conn, future) -> None:
        """A request thread is done with one message (on the poller thread)."""
        self.admission.end()
        try:
            keep = bool(future.result())
        except Exception:  # noqa: BLE001 (the thread logged it; the connection just closes)
            keep = False
        if conn in self.conns:
            self._ws_resume(conn, keep)

    # -- a request thread: one message -------------------------------------------------

    def _ws_serve(self, conn, payload: bytes, size: int, arrived: float) -> bool:
        """Answer one message (on a request thread); True keeps the connection. A client that
        went while its message waited for a thread (a reset, its end of the connection closed,
        or a close frame) is not computed for (499)."""
        ws = conn.ws
        try:
            if peer_went(conn.sock):  # while the socket is still non-blocking
                self.obs.count_vanished(ws.session.route, None, conn.addr, time.monotonic() - arrived,
                                        "before its message ran")
                return False
            conn.sock.settimeout(SEND_TIMEOUT_S)
            reply = ws.session.handle(payload, arrived)
        finally:
            self.admission.budget.give(size)
        return self._ws_write(conn, reply)

    def _ws_write(self, conn, reply: Reply) -> bool:
        """Write ``reply`` (blocking, bounded by the socket's timeout; a request thread)."""
        ws = conn.ws
        replaced = None
        message = TextMessage(data=reply.data) if isinstance(reply.data, str) else BytesMessage(data=reply.data)
        out = ws.proto.send(message)
        committed = time.monotonic()  # its latency ends here, as an HTTP answer's at its status line
        if reply.deadline is not None and committed > reply.deadline:  # never a late action
            self.obs.count_late_answer("write")
            late = ws.session.late(reply)
            replaced, reply = 504, Reply(late.data, late.close, None, reply.record)
            out = ws.proto.send(TextMessage(data=reply.data))
        if reply.close is not None:
            out += ws.proto.send(CloseConnection(code=reply.close))
        delivered = False
        try:
            conn.sock.settimeout(SEND_TIMEOUT_S)
            conn.sock.sendall(out)
            delivered = True
        except OSError:
            pass
        finally:
            if reply.record is not None:
                reply.record(delivered, replaced, committed)
        return delivered and reply.close is None

    # -- refusals and closing (poller) ---------------------------------------------------

    def _ws_refuse(self, conn, code: int, status: int, detail: str, reason: str) -> None:
        """Refuse the message being received or just complete: a text frame (``"<status> <error>:
        <detail>"``, as the session's errors), then close ``code``; counted as the front door's refusals."""
        ws = conn.ws
        self.admission.budget.give(ws.size)
        ws.parts, ws.size = [], 0
        self.admission.end()
        self.obs.count_refusal(ws.session.route, status, reason, None, conn.addr, time.monotonic() - ws.first_byte)
        self._ws_close(conn, code, f"{status} {REFUSALS[status]}: {detail}", text=True)

    def _ws_close(self, conn, code: int, reason: str, *, text: bool = False) -> None:
        """Send (best effort, non-blocking) a text frame with ``reason`` when ``text``, a close
        frame, then half-close and drop what still arrives for a moment."""
        ws = conn.ws
        out = b""
        try:
            if text:
                out += ws.proto.send(TextMessage(data=reason))
            out += ws.proto.send(CloseConnection(code=code, reason=reason[:120] if not text else ""))
        except Exception:  # noqa: BLE001 (the protocol is already closed: just close the socket)
            out = b""
        self._ws_send_now(conn, out)
        self._linger(conn)

    def _ws_abandoned(self, conn) -> None:
        """The client went while sending a message: its bytes and its place go back (499)."""
        ws = conn.ws
        if conn.state == WS_READING:
            self.admission.budget.give(ws.size)
            ws.parts, ws.size = [], 0
            self.admission.end()
            self.obs.count_vanished(ws.session.route, None, conn.addr, time.monotonic() - ws.first_byte,
                                    "while sending its message")

    def _ws_evict(self, conn) -> None:
        """Closed at once to make room (front_door.reader._make_room): a close frame, best effort."""
        try:
            self._ws_send_now(conn, conn.ws.proto.send(CloseConnection(code=GOING_AWAY, reason="evicted to make room")))
        except Exception:  # noqa: BLE001 (the protocol is already closing: just close the socket)
            pass
        self._close(conn)

    def _ws_closed_by_peer(self, conn, event: CloseConnection) -> None:
        ws = conn.ws
        self._ws_abandoned(conn)
        if ws.proto.state.name not in ("CLOSED", "LOCAL_CLOSING"):
            try:
                self._ws_send_now(conn, ws.proto.send(event.response()))
            except Exception:  # noqa: BLE001 (already closed on our side)
                pass
        self._linger(conn)

    def _ws_peer_gone(self, conn) -> None:
        """The socket closed under a WebSocket (no close frame)."""
        self._ws_abandoned(conn)
        self._close(conn)

    def _ws_expired(self, conn) -> None:
        """A deadline passed (the poller's scan): a stalled message, or an idle connection."""
        if conn.state == WS_READING:
            self._ws_refuse(conn, POLICY_VIOLATION, 408, "message not received in time", "message_timeout")
        else:
            self.obs.count_closed("idle")
            self._ws_close(conn, GOING_AWAY, "idle")

    def _ws_check_greetings(self) -> None:
        """Connections whose session waits for the model: greet them once it is ready."""
        for conn in list(self.ws_holding):
            if conn not in self.conns or conn.ws.greeted:
                self.ws_holding.discard(conn)
            elif conn.state == WS_IDLE and conn.ws.session.ready():
                self.ws_holding.discard(conn)
                self.admission.hold()  # the greeting is a job like a message
                self._ws_job(conn)

    def _ws_job(self, conn) -> None:
        conn.state = BUSY
        self.poller.unregister(conn.sock)
        future = self.tpool.submit(self._ws_greet_and_keep, conn)
        future.add_done_callback(lambda fut: self.method_queue.defer(self._ws_finished, conn, fut))

    def _ws_greet_and_keep(self, conn) -> bool:
        conn.sock.settimeout(SEND_TIMEOUT_S)
        try:
            self._ws_greet(conn)
        except OSError:
            return False
        return conn.ws.greeted

    def _ws_flooded(self, conn, what: str) -> None:
        """More ``what`` than a client needs (:data:`CONTROL_PER_S`): refused and closed (1008)."""
        ws = conn.ws
        if conn.state == WS_READING:
            self._ws_refuse(conn, POLICY_VIOLATION, 400, f"too many {what}", "flood")
            return
        self.obs.count_refusal(ws.session.route, 400, "flood", None, conn.addr, 0.0)
        self._ws_close(conn, POLICY_VIOLATION, f"400 bad request: too many {what}", text=True)

    def _ws_forget_queued(self, conn) -> None:
        """The connection closes with messages that waited for its first frame: they are over."""
        for _payload, size, _arrived in conn.ws.queued:
            self.admission.budget.give(size)
            self.admission.end()
        conn.ws.queued.clear()

    def _ws_send_now(self, conn, data: bytes) -> None:
        """A small frame from the poller (a pong, a close): one non-blocking send."""
        if not data:
            return
        try:
            conn.sock.send(data)
        except (OSError, ValueError):
            pass
