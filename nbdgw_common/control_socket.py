"""The client of a served volume's control socket, ``volumes/<V>/control.sock``: one JSON
line in, one JSON line out (the requests and the server are nbd_plugin/control.py, in the
nbdkit process serving the volume).

Paths are reached through ``/proc/self/fd/<dirfd>/`` so that the 108-byte limit of unix
socket addresses does not limit where data directories live.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from . import jsonline

SOCKET_NAME = "control.sock"
MAX_REQUEST = 64 << 10


class ControlError(Exception):
    """The control socket could not be reached, or it answered with an error."""


def recv_line(conn: socket.socket, buf: bytes = b"") -> bytes:
    """One request line (what was read of it so far: ``buf``), at most MAX_REQUEST bytes."""
    try:
        return jsonline.recv_line(conn, buf, MAX_REQUEST)
    except jsonline.LineTooLong:
        raise ControlError("request too long") from None


def hold(volume_dir: Path, max_s: float) -> tuple[socket.socket, dict[str, int]]:
    """Hold client I/O of the nbdkit process serving ``volume_dir`` (ControlServer._hold):
    returns the open connection (close it, or send ``release``, to let I/O go on) and
    each served volume's journal end, durable."""
    dfd = os.open(volume_dir, os.O_RDONLY | os.O_DIRECTORY)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(30)
        try:
            s.connect(f"/proc/self/fd/{dfd}/{SOCKET_NAME}")
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"nothing serves volume {volume_dir.name} here") from None
        jsonline.send(s, {"op": "hold", "max_s": max_s})
        reply = jsonline.receive(s, limit=MAX_REQUEST)
        if not isinstance(reply, dict) or not reply.get("ok"):
            raise ControlError(str(reply.get("error") if isinstance(reply, dict) else
                                   "no answer to hold"))
        return s, {str(k): int(v) for k, v in reply["seqs"].items()}
    except BaseException:
        s.close()
        raise
    finally:
        os.close(dfd)


def request(volume_dir: Path, req: dict[str, Any], timeout: float = 600,
            fds: tuple[int, ...] = ()) -> dict[str, Any]:
    """Send one request to the process serving the volume in ``volume_dir`` (with
    descriptors ``fds``, which that process then holds copies of)."""
    path = volume_dir / SOCKET_NAME
    try:
        dfd = os.open(volume_dir, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise ControlError(f"no volume directory {volume_dir}") from None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            try:
                s.connect(f"/proc/self/fd/{dfd}/{SOCKET_NAME}")
            except (FileNotFoundError, ConnectionRefusedError):
                raise ControlError(
                    f"volume {volume_dir.name} is in use but nothing answers on {path} "
                    "(is it held by a peerlink receiver, or by an nbdgw older than "
                    "snapshots?)") from None
            jsonline.send(s, req, fds)
            reply = jsonline.receive(s, limit=MAX_REQUEST)
    finally:
        os.close(dfd)
    if not isinstance(reply, dict):
        raise ControlError(f"no answer on {path}")
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error")))
    return reply
