"""Loop devices over nbdfuse files: the route that lets writes run in parallel.

FUSE takes the file's inode lock for every write it gets from write(2), O_DIRECT or
not, and holds it until nbdfuse answers: tgtd's 16 I/O threads writing to the nbdfuse
file directly are served one at a time.  A loop device with direct I/O (``losetup
--direct-io=on``) submits its requests to the file as asynchronous direct I/O, which
FUSE lets overlap, so tgtd (O_DIRECT on /dev/loopN) gets queue depth through to NBD.
Flushes still reach NBD: tgtd's fdatasync on the device is a block-layer flush, which
the loop driver turns into fsync on the file, which nbdfuse sends as NBD FLUSH.
(tgtd's aio backend also overlaps writes, but ignores SYNCHRONIZE CACHE: not used.)

Loop devices are global to the host.  The bridge detaches each one as soon as tgtd has
opened it: the kernel then only marks it autoclear and frees it on tgtd's last close, so
a crash anywhere leaves no loop device behind.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from nbdgw_common.errors import CommandError
from nbdgw_common.proc import run

from .errors import BridgeError

log = structlog.get_logger(component="iscsi")

LOOP_CONTROL = Path("/dev/loop-control")


def available() -> bool:
    """Can this host make loop devices (root, /dev/loop-control)?"""
    return LOOP_CONTROL.exists() and os.access(LOOP_CONTROL, os.W_OK)


@dataclass(frozen=True)
class Loop:
    device: str
    backing_file: str
    backing_dev: tuple[int, int]  # (major, minor) of the backing file's filesystem
    backing_ino: int
    read_only: bool


def loops() -> list[Loop]:
    """Every loop device on the host with a backing file."""
    out = run(["losetup", "--list", "--json", "--output",
               "NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN,RO"])
    result = []
    for d in json.loads(out or '{"loopdevices": []}').get("loopdevices", []):
        majmin = str(d.get("back-maj:min") or "0:0").strip()
        major, _, minor = majmin.partition(":")
        result.append(Loop(d["name"], str(d.get("back-file") or "").removesuffix(" (deleted)"),
                           (int(major or 0), int(minor or 0)), int(d.get("back-ino") or 0),
                           bool(d.get("ro"))))
    return result


def loops_of(path: Path) -> list[Loop]:
    return [lo for lo in loops() if lo.backing_file == str(path)]


def current(lo: Loop, path: Path) -> bool:
    """Is ``lo`` backed by the file now at ``path`` (not by a dead earlier mount)?"""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return lo.backing_dev == (os.major(st.st_dev), os.minor(st.st_dev)) and \
        lo.backing_ino == st.st_ino


def attach(path: Path, read_only: bool) -> str:
    """A new direct-I/O loop device over ``path``; its /dev path."""
    try:
        dev = run(["losetup", "--find", "--show", "--direct-io=on",
                   *(["--read-only"] if read_only else []), str(path)]).strip()
    except CommandError as e:
        raise BridgeError(f"cannot attach a loop device to {path}: {e}") from None
    log.info("loop_attached", device=dev, file=str(path), read_only=read_only)
    return dev


def detach(device: str) -> None:
    try:
        run(["losetup", "--detach", device])
    except CommandError as e:
        if "No such device" not in e.stderr:
            raise
    log.info("loop_detached", device=device)


def detach_all(path: Path) -> None:
    for lo in loops_of(path):
        detach(lo.device)
