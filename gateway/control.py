"""The client side of nbdgw's local control sockets: one JSON object per line each way
(the daemon's ``run/daemon.sock``, the replication process's ``run/peerlink.sock``)."""

from __future__ import annotations

import grp
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

from nbdgw_common.errors import GatewayError

from . import audit


def ask(path: Path, request: dict[str, Any], timeout: float, *, who: str,
        unreachable_hint: str, closed_hint: str) -> dict[str, Any]:
    """Send ``request`` to the process ``who`` listening on ``path``; return its reply.
    GatewayError (naming ``who``) when it cannot be reached, times out or says nothing."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except PermissionError:
            raise GatewayError(f"permission denied on {path}: {who_may_use(path)} may use "
                               f"{who} (control.group in the node config)") from None
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


def who_may_use(path: Path) -> str:
    """'only root' or 'only root and members of group G', from the socket's mode (or its
    directory's, which a user outside the group cannot even search)."""
    try:
        st = os.stat(path)
        opened = bool(st.st_mode & stat.S_IWGRP)
    except OSError:
        try:
            st = os.stat(path.parent)
        except OSError:
            return "only root"
        opened = bool(st.st_mode & stat.S_IXGRP) and not st.st_mode & stat.S_IXOTH
    if not opened or st.st_gid == 0:
        return "only root"
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"only root and members of group {group}"


def grant(path: Path, group: str | None) -> None:
    """Open the control socket at ``path`` (created 0600) to ``group`` (control.group):
    the socket becomes root:group 0660 and its directory root:group 0750; the audit log
    root:group 0660 (members' admin commands append to it)."""
    if group is None:
        return
    gid = grp.getgrnam(group).gr_gid
    os.chown(path.parent, -1, gid)
    os.chmod(path.parent, 0o750)  # noqa: S103 - group search only, as control.group asks
    os.chown(path, -1, gid)
    os.chmod(path, 0o660)
    audit.grant(path.parent.parent, gid)  # <data_dir>/run/daemon.sock
