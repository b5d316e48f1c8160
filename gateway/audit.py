"""The audit log of admin actions: ``<data_dir>/audit.log``, one JSON object per line
(what, when, by whom, from where, the outcome), appended and fsynced.  `nbdgw audit`
prints it.

Recorded: volume create/delete/repair, snapshot create/delete/rollback, promote (and
the lead's switchover/resolve), each with outcome ``done``, ``refused`` or ``error``.
A ``done`` entry that cannot be written is an error (the action happened; the trail
must say so); a refused or failed attempt is recorded once the data directory holds
anything (on an empty one a refusal leaves no trace), and one that cannot be written (a user without
write access to the data directory) is reported on stderr and does not hide the
reason the action itself failed.  ``control.group`` members may append (the daemon
makes the file root:group 0660)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pwd
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from blockstore.errors import BlockstoreError
from nbdgw_common.errors import GatewayError

FILE = "audit.log"


def who() -> dict[str, Any]:
    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    ssh = os.environ.get("SSH_CONNECTION", "").split()
    return {"user": user, "uid": uid, "sudo_user": os.environ.get("SUDO_USER"),
            "from": ssh[0] if ssh else "local", "pid": os.getpid()}


def record(data_dir: Path, action: str, args: dict[str, Any], outcome: str,
           detail: str = "") -> None:
    if outcome != "done" and (not data_dir.is_dir() or not any(data_dir.iterdir())):
        return  # refused on a node with nothing yet: it leaves no trace (not even a log)
    try:
        _append(data_dir, action, args, outcome, detail)
    except OSError as e:
        if outcome == "done":
            raise GatewayError(f"{action} done, but the audit log {data_dir / FILE} could "
                               f"not be written: {e.strerror or e}") from None
        print(f"nbdgw: warning: audit log {data_dir / FILE} not written "
              f"({e.strerror or e})", file=sys.stderr)


def _append(data_dir: Path, action: str, args: dict[str, Any], outcome: str,
            detail: str) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "action": action, "args": args, "outcome": outcome, "detail": detail,
                       **who()}, sort_keys=True)
    fd = os.open(data_dir / FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, line.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def action(data_dir: Path, name: str, args: dict[str, Any]) -> Iterator[list[str]]:
    """Record the admin action done in the ``with`` body: ``done`` (with the detail the
    body appends to the yielded list), else ``refused`` for nbdgw's own errors (bad
    input, a busy volume) or ``error`` for anything else; the exception goes on."""
    detail: list[str] = []
    try:
        yield detail
    except (GatewayError, BlockstoreError) as e:
        record(data_dir, name, args, "refused", str(e))
        raise
    except SystemExit as e:  # a CLI refusal (_fail) or "not confirmed"
        if e.code not in (0, None):
            record(data_dir, name, args, "refused", "not confirmed or refused by the CLI")
        raise
    except BaseException as e:
        record(data_dir, name, args, "error", f"{type(e).__name__}: {e}")
        raise
    record(data_dir, name, args, "done", "; ".join(detail))


def audited(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorator for a CLI command taking ``obj`` (the CLI context) and ``data_dir``:
    the command runs inside ``action(...)`` with its options as the recorded args."""
    def wrap(fn: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(fn)
        def run(obj: Any, *a: Any, **kw: Any) -> None:
            args = {k: v for k, v in kw.items()
                    if k not in ("data_dir", "as_json", "yes") and v is not None}
            # The command itself says when its data directory does not exist.
            with action(obj.data_dir(kw.get("data_dir"), must_exist=False), name, args):
                fn(obj, *a, **kw)
        return run
    return wrap


def grant(data_dir: Path, gid: int) -> None:
    """Let control.group members append (root:group 0660)."""
    path = data_dir / FILE
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.fchown(fd, -1, gid)
        os.fchmod(fd, 0o660)
    finally:
        os.close(fd)


def read(data_dir: Path) -> list[dict[str, Any]]:
    path = data_dir / FILE
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
