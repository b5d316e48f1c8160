"""The audit log of admin actions: ``<data_dir>/audit.log``, one JSON object per line
(what, when, by whom, from where, the outcome), appended and fsynced.  `nbdgw audit`
prints it."""

from __future__ import annotations

import json
import os
import pwd
import time
from pathlib import Path
from typing import Any

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


def read(data_dir: Path) -> list[dict[str, Any]]:
    path = data_dir / FILE
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
