"""A WebSocket client on a raw socket, for tests where a misbehaving client is the point:
frames cut short, stalled, oversized, of any opcode. Frames are built by hand (RFC 6455
section 5.2, always masked as a client must); the server's frames are parsed by wsproto."""

from __future__ import annotations

import base64
import os
import socket
import struct

from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Pong, TextMessage

BINARY, TEXT, CLOSE, PING = 0x2, 0x1, 0x8, 0x9


def frame(payload: bytes, opcode: int = BINARY, *, fin: bool = True, length: int | None = None) -> bytes:
    """One masked client frame; ``length`` declares another payload length than the payload's."""
    length = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | opcode])
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack(">H", length)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", length)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class RawWebSocket:
    """An upgraded connection: ``send`` raw bytes, read the server's messages with
    :meth:`messages` or everything up to its close with :meth:`until_closed`."""

    def __init__(self, port: int, path: str = "/", headers: dict[str, str] | None = None,
                 timeout_s: float = 30.0, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        key = base64.b64encode(os.urandom(16)).decode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall((
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            head += chunk
        self.head, _, rest = head.partition(b"\r\n\r\n")
        self.proto = Connection(ConnectionType.CLIENT)
        self.proto.receive_data(rest)
        self.parts: list = []
        self.pending: list = []

    @property
    def status(self) -> int:
        return int(self.head.split(b" ", 2)[1]) if self.head else 0

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _events(self) -> None:
        for event in self.proto.events():
            if isinstance(event, (BytesMessage, TextMessage)):
                self.parts.append(event.data)
                if event.message_finished:
                    joined = b"".join(self.parts) if isinstance(self.parts[0], bytes) else "".join(self.parts)
                    self.pending.append(joined)
                    self.parts = []
            elif isinstance(event, Pong):
                self.pending.append(("pong", bytes(event.payload)))
            elif isinstance(event, CloseConnection):
                self.pending.append(("close", event.code, event.reason))

    def messages(self, count: int, timeout_s: float = 30.0) -> list:
        """The server's next ``count`` messages (bytes or str), pongs (("pong", payload)) or
        its close (("close", code, reason)); ("gone", why) when the connection ended first."""
        self.sock.settimeout(timeout_s)
        self._events()
        while len(self.pending) < count:
            if self.pending and isinstance(self.pending[-1], tuple) and self.pending[-1][0] == "close":
                break
            try:
                data = self.sock.recv(1 << 16)
            except (ConnectionResetError, TimeoutError) as exc:
                self.pending.append(("gone", type(exc).__name__))
                break
            if not data:
                self.pending.append(("gone", "eof"))
                break
            self.proto.receive_data(data)
            self._events()
        out, self.pending = self.pending[:count], self.pending[count:]
        return out

    def until_closed(self, timeout_s: float = 30.0) -> list:
        """Everything the server sends until its close (last) or the connection's end."""
        out = []
        while not out or not (isinstance(out[-1], tuple) and out[-1][0] in ("close", "gone")):
            out += self.messages(1, timeout_s)
        return out

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawWebSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
