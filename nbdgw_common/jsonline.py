"""The line protocol of nbdgw's unix-socket control channels (the daemon's, each served
volume's, and the replies of the sync gate): one JSON object per line, a request and its
answer, bounded in length.  Only the framing lives here; each channel says what its
requests mean and how an unreachable peer is reported."""

from __future__ import annotations

import json
import socket
from typing import Any

MAX_LINE = 64 << 10  # bytes: no request or answer of any channel comes near it


class LineTooLong(ValueError):
    """A peer sent more than the limit without ending its line."""


def encode(obj: Any) -> bytes:
    """``obj`` as one line of the protocol."""
    return json.dumps(obj).encode() + b"\n"


def send(conn: socket.socket, obj: Any, fds: tuple[int, ...] = ()) -> None:
    """Send ``obj`` as one line (with descriptors ``fds``, SCM_RIGHTS, when given)."""
    data = encode(obj)
    if fds:
        socket.send_fds(conn, [data], list(fds))
    else:
        conn.sendall(data)


def recv_line(conn: socket.socket, buf: bytes = b"", limit: int = MAX_LINE) -> bytes:
    """One line (what was read of it so far: ``buf``), at most ``limit`` bytes; b"" or a
    partial line when the peer closed first."""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > limit:
            raise LineTooLong(f"line longer than {limit} bytes")
    return buf


def receive(conn: socket.socket, buf: bytes = b"", limit: int = MAX_LINE) -> Any:
    """The next object (None when the peer closed without one).  ValueError for a line
    that is not JSON or too long."""
    line = recv_line(conn, buf, limit)
    return json.loads(line) if line.strip() else None
