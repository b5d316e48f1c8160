"""The client side of nbdgw's local control sockets: one JSON object per line each way
(the daemon's ``run/daemon.sock``, the replication process's ``run/peerlink.sock``)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from .errors import GatewayError


def ask(path: Path, request: dict[str, Any], timeout: float, *, who: str,
        unreachable_hint: str, closed_hint: str) -> dict[str, Any]:
    """Send ``request`` to the process ``who`` listening on ``path``; return its reply.
    GatewayError (naming ``who``) when it cannot be reached, times out or says nothing."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except OSError as e:
            raise GatewayError(f"cannot reach {who} at {path} ({e.strerror or e}): "
                               f"{unreachable_hint}") from None
        s.sendall(json.dumps(request).encode() + b"\n")
        line = s.makefile("rb").readline()
    except TimeoutError:
        raise GatewayError(f"no answer from {who} in {timeout:g} s") from None
    finally:
        s.close()
    if not line:
        raise GatewayError(f"{who} closed the connection {closed_hint}")
    reply: dict[str, Any] = json.loads(line)
    return reply
