"""HTTP/1.1 on a raw socket, for tests where a misbehaving client is the point: answers read
by hand (one, or several pipelined), whether the server closed a connection (waiting for it,
or now), and waiting until a server at its connection limit has taken in a flood."""

from __future__ import annotations

import json
import socket

from tests.support.wait import eventually


def read_answer(sock: socket.socket, timeout_s: float = 30.0) -> tuple[int, dict, dict]:
    """Status, headers (lower-case) and JSON body of one answer on ``sock``."""
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    is_json = headers.get("content-type") == "application/json"
    return int(lines[0].split()[1]), headers, json.loads(body) if body and is_json else {}


def read_answers(sock: socket.socket, n: int, timeout_s: float = 30.0) -> list[tuple[int, dict, dict]]:
    """``n`` pipelined answers on ``sock`` (they may come in one segment): status, headers, JSON body."""
    sock.settimeout(timeout_s)
    buf, answers = b"", []
    while len(answers) < n:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            lines = buf[:end].decode("latin-1").split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            length = int(headers.get("content-length", 0))
            if len(buf) >= end + 4 + length:
                body = buf[end + 4:end + 4 + length]
                buf = buf[end + 4 + length:]
                is_json = headers.get("content-type") == "application/json"
                answers.append((int(lines[0].split()[1]), headers, json.loads(body) if body and is_json else {}))
                continue
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {answers!r} and {buf[:200]!r}")
        buf += chunk
    return answers


def closed_by_server(sock: socket.socket, timeout_s: float = 10.0) -> bool:
    """Read (and drop) until the server closes ``sock``: True if it does within ``timeout_s``."""
    sock.settimeout(timeout_s)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except OSError:
        return False


def closed_now(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock`` already (end of stream or reset), without waiting
    and without consuming what it sent."""
    timeout = sock.gettimeout()
    sock.setblocking(False)  # a socket with a timeout would wait for data first
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.settimeout(timeout)


def taken_in(socks: list[socket.socket], held: int) -> int:
    """Wait until a server that holds at most ``held`` connections has taken in every one in
    ``socks`` (connections that send nothing): the rest, the oldest, closed to make room.
    Seen from the client side: the server exports no count of the connections it holds."""
    return eventually(lambda: sum(closed_now(sock) for sock in socks) >= len(socks) - held, 15,
                      f"the server holding at most {held} of {len(socks)} connections, the others closed")
