"""One client connection of the front door, and the states it goes through.

A connection is accepted idle (TLS: handshaking first), reads a request (``READING``), is
served on a thread (``BUSY``) and comes back idle (keep-alive), or is refused and lingers
(``LINGERING``) or discards a refused body (``DISCARDING``). After a WebSocket upgrade it
alternates between ``WS_IDLE`` and ``WS_READING`` (one message being received), ``BUSY``
while a message is answered, and keeps its :class:`WebSocket` state. The poller owns it; a
request thread has it only while ``BUSY``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from wsproto import frame_protocol
from wsproto.connection import Connection, ConnectionType
from wsproto.extensions import Extension
from wsproto.frame_protocol import CloseReason, Opcode, RsvBits

IDLE, READING, DISCARDING, BUSY, LINGERING, HANDSHAKING = range(6)  # HANDSHAKING: TLS, front_door_tls
CONTROL_PER_S, CONTROL_BURST = 10.0, 20  # pings and pongs a WebSocket client may send: this rate, this many at once
WS_IDLE, WS_READING = 10, 11  # an upgraded connection between messages, and receiving one (front_door_ws)


class Conn:
    """One client connection and what the poller knows of its current request."""

    __slots__ = (
        "sock", "client", "server", "addr", "buf", "state", "deadline", "arrived", "req", "need",
        "route", "nreq", "scanned", "over_cap", "taken", "body", "filled", "reserved",
        "callback", "tls", "want_write", "probe", "ws", "last_active",
    )

    def __init__(self, sock, client, server, now: float, idle_s: float) -> None:
        self.sock, self.client, self.server = sock, client, server
        self.addr = client[0] if isinstance(client, tuple) else str(client)
        self.buf = bytearray()
        self.state = IDLE
        self.arrived = now  # of the current request: its first byte
        self.deadline = now + idle_s  # idle (no request begun): closed quietly then
        self.req = None
        self.need = 0
        self.route = "front_door"
        self.nreq = 0
        self.scanned = 0
        self.over_cap = None  # the Refusal it gets unless its head shows a probe
        self.probe = False  # its current request is a probe (answered on the probe lane)
        self.taken = False  # a request thread took its current request (front_door_admission)
        self.body: bytearray | None = None  # a body being received in place (up to PREALLOCATE_BYTES)
        self.filled = 0
        self.reserved = 0  # its body's length, taken from the worker's byte budget while being read
        self.callback = None  # what the poller calls when the socket is ready (set at accept)
        self.tls = False  # an SSL socket: read by front_door_tls, and HANDSHAKING first
        self.want_write = False  # TLS only: registered for EVENT_WRITE while OpenSSL must send
        self.ws = None  # after an upgrade: its WebSocket state (front_door.websocket.WebSocket)
        self.last_active = now  # accepted, answered or (WebSocket) sent a frame: the longest idle are evicted first

    # -- what happens to it (the poller's transitions that touch only the connection) ---------

    def head_parsed(self, head, length: int) -> None:
        """Its request's head (``front_door.http.Head``, the first ``length`` bytes of the buffer) is parsed."""
        del self.buf[:length]
        self.scanned = 0
        self.nreq += 1
        self.req, self.need, self.route, self.probe = head.req, head.length, head.route, head.probe

    def receive_in_place(self, most: int) -> None:
        """Receive the rest of a body of at most ``most`` bytes straight into its own buffer."""
        if len(self.buf) < self.need <= most:
            self.body = bytearray(self.need)
            self.filled = len(self.buf)
            self.body[: self.filled] = self.buf
            self.buf = bytearray()

    def take_body(self) -> bytes | None:
        """The request's whole body once it is in (the buffer keeps what follows it), else None."""
        if self.body is not None:
            if self.filled < self.need:
                return None
            body, self.body = bytes(self.body), None
            return body
        if len(self.buf) < self.need:
            return None
        if len(self.buf) == self.need:
            body, self.buf = bytes(self.buf), bytearray()
            return body
        body = bytes(memoryview(self.buf)[: self.need])
        del self.buf[: self.need]
        return body

    def discard(self) -> bool:
        """Drop what arrived of a refused body; True once all of it is dropped."""
        dropped = min(self.need, len(self.buf))
        del self.buf[:dropped]
        self.need -= dropped
        return self.need == 0

    def idle(self, deadline: float) -> None:
        """Between requests (keep-alive) until ``deadline``."""
        self.state = IDLE
        self.req = None
        self.body = None
        self.need = 0
        self.route = "front_door"
        self.deadline = deadline
        self.last_active = time.monotonic()

    def linger(self, deadline: float) -> None:
        """Answered and half-closed: what still arrives is dropped until ``deadline``."""
        self.state = LINGERING
        self.req = None
        self.body = None
        self.buf = bytearray()
        self.deadline = deadline


class XorMasker:
    """Unmasks a client frame's payload, chunk by chunk, as wsproto's ``XorMaskerSimple`` does
    (the same bytes, the key rotated by each chunk's length), with numpy's XOR of 32-bit words.

    wsproto's own masker works on four strided slices of a bytearray in Python: about 0.7 ms
    per MB on this box, on the poller thread that every connection of a worker shares, which
    made a camera frame over openpi's wire cost more than its forward. This one takes about
    0.04 ms per MB. wsproto looks its masker up by name when it parses a frame header, so
    :data:`WSPROTO_MASKER` is replaced below (``tests/test_openpi_wire.py`` checks the two
    give the same bytes).
    """

    def __init__(self, masking_key: bytes | bytearray) -> None:
        self._key = bytes(masking_key)

    def process(self, data: bytes | bytearray) -> bytearray:
        out = bytearray(data)
        n = len(out)
        if n:
            view = np.frombuffer(out, np.uint8)
            whole = n // 4 * 4
            if whole:
                words = view[:whole].view(np.uint32)
                np.bitwise_xor(words, np.frombuffer(self._key, np.uint32)[0], out=words)
            if n > whole:
                view[whole:] ^= np.frombuffer(self._key, np.uint8)[: n - whole]
            turn = n % 4
            self._key = self._key[turn:] + self._key[:turn]
        return out


WSPROTO_MASKER = frame_protocol.XorMaskerSimple  # wsproto's own, kept for the equivalence test
frame_protocol.XorMaskerSimple = XorMasker


class FrameHeaders(Extension):
    """wsproto's hook on every frame header, never offered to the client: a data frame that
    declares more than ``limit`` bytes fails to parse (close 1009) before any of its payload
    is read, and ``opened`` notes a message whose header came before any of its payload (its
    time limit starts then)."""

    name = "policy-server-frame-headers"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.declared = 0  # the length of the last data frame refused
        self.opened: Opcode | None = None  # a message begun by its header: text or binary

    def enabled(self) -> bool:
        return True

    def offer(self) -> bool:
        return False

    def frame_inbound_header(self, proto, opcode: Opcode, rsv: RsvBits, payload_length: int) -> CloseReason | RsvBits:
        if not opcode.iscontrol():
            if payload_length > self.limit:
                self.declared = payload_length
                return CloseReason.MESSAGE_TOO_BIG
            if opcode is not Opcode.CONTINUATION:
                self.opened = opcode
        return RsvBits(False, False, False)


@dataclass
class Reply:
    """What a request thread writes for one message: a binary (bytes) or text (str) frame,
    then a close with ``close`` when set. ``deadline`` (time.monotonic()): a 2xx-like reply
    not written by then is replaced by the session's ``late`` reply. ``record(delivered,
    replaced_status, committed)`` counts it once it was written (or not); ``committed`` is
    when it was handed to the socket."""

    data: bytes | str
    close: int | None = None
    deadline: float | None = None
    record: Callable[[bool, int | None, float], None] | None = None


@dataclass
class WebSocket:
    """One upgraded connection's WebSocket state (the poller's, and a thread's while busy).
    ``max_message_bytes`` bounds one frame's declared length (see :class:`FrameHeaders`)."""

    session: Any
    max_message_bytes: int
    headers: FrameHeaders = field(init=False)
    proto: Connection = field(init=False)
    greeted: bool = False  # the session's first frame was sent
    parts: list = field(default_factory=list)  # the message being received
    size: int = 0  # its bytes so far (taken from the worker's byte budget)
    first_byte: float = 0.0  # when its first byte came (time.monotonic())
    text: bool = False  # it is a text message
    queued: list = field(default_factory=list)  # complete messages waiting for the first frame to go out
    frames: int = 0  # frames of the message being received
    control_tokens: float = CONTROL_BURST  # pings and pongs it may still send now
    control_at: float = 0.0  # when control_tokens was last refilled

    def __post_init__(self) -> None:
        self.headers = FrameHeaders(self.max_message_bytes)
        self.proto = Connection(ConnectionType.SERVER, extensions=[self.headers])

    def control_allowed(self, now: float) -> bool:
        """Take one control frame from the connection's allowance (a token bucket)."""
        self.control_tokens = min(CONTROL_BURST, self.control_tokens + (now - self.control_at) * CONTROL_PER_S)
        self.control_at = now
        if self.control_tokens < 1:
            return False
        self.control_tokens -= 1
        return True
