"""The client side of nbdgw's local control sockets: one JSON object per line each way
(the daemon's ``run/daemon.sock``, the replication process's ``run/peerlink.sock``)."""

from __future__ import annotations

import errno
import grp
import os
import socket
import stat
from pathlib import Path
from typing import Any, Final

from blockstore.modes import open_to_group
from nbdgw_common import jsonline
from nbdgw_common.errors import GatewayError

# An answer may list extents (verify): bounded, but far above any request.
MAX_ANSWER: Final = 64 << 20
CONTROL: Final = "daemon.sock"  # <data_dir>/run/daemon.sock: `nbdgw promote` asks here


def control_path(data_dir: Path) -> Path:
    """The daemon's control socket for ``data_dir``."""
    return data_dir / "run" / CONTROL


class NoDaemon(GatewayError):
    """Nothing listens on the socket (it does not exist, or no process accepts on it)."""


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
            cls = NoDaemon if e.errno in (errno.ENOENT, errno.ECONNREFUSED) else GatewayError
            raise cls(f"cannot reach {who} at {path} ({e.strerror or e}): "
                      f"{unreachable_hint}") from None
        jsonline.send(s, request)
        reply = jsonline.receive(s, limit=MAX_ANSWER)
    except TimeoutError:
        raise GatewayError(f"no answer from {who} in {timeout:g} s") from None
    finally:
        s.close()
    if reply is None:
        raise GatewayError(f"{who} closed the connection {closed_hint}")
    if not isinstance(reply, dict):
        raise GatewayError(f"{who} answered with something other than an object")
    return reply


def who_may_use(path: Path) -> str:
    """'only root' or 'only root and members of group G', from the socket's mode (or, for
    a user outside the group, who cannot even search there, from the nearest directory
    above it that such a user can see: the data directory, opened to the group)."""
    try:
        st = os.stat(path)
        opened = bool(st.st_mode & stat.S_IWGRP)
    except OSError:
        for parent in path.parents:
            try:
                st = os.stat(parent)
            except OSError:
                continue
            opened = bool(st.st_mode & stat.S_IXGRP) and not st.st_mode & stat.S_IXOTH
            break
        else:
            return "only root"
    if not opened or st.st_gid == 0:
        return "only root"
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"only root and members of group {group}"


# Files of the data directory control.group never reads: the audit log and its anchor
# (members' commands are recorded by the daemon, gateway/audit.py).
AUDIT_FILE: Final = "audit.log"
AUDIT_STATE: Final = "audit.state"
PRIVATE: Final = (AUDIT_FILE, AUDIT_STATE)


def open_data_dir(data_dir: Path, group: str) -> None:
    """Let ``group`` (control.group) read the metadata `nbdgw status` needs (DESIGN.md
    §10): never volume data, nor the files in PRIVATE."""
    open_to_group(data_dir, grp.getgrnam(group).gr_gid, PRIVATE)


def grant(path: Path, group: str | None) -> None:
    """Open the control socket at ``path`` (created 0600) to ``group`` (control.group):
    the socket becomes root:group 0660; the data directory's directories root:group
    02750 and its metadata 0640 (``nbdgw status``; volume data stays root's alone,
    DESIGN.md §10) but for the audit log and its anchor (``open_data_dir``)."""
    if group is None:
        return
    gid = grp.getgrnam(group).gr_gid
    open_data_dir(path.parent.parent, group)  # <data_dir>/run/daemon.sock
    os.chown(path, -1, gid)
    os.chmod(path, 0o660)
