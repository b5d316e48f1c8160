"""Room on the file system under a volume, and the room nbdgw keeps for its own files.

A full data disk must not stop a volume from closing cleanly, reopening, recovering or
dropping a snapshot: each of those writes small state files (state.json, resync.json,
dirty sets, the activity log, snapshot index records, a journal MARK).  So client writes
stop short of full: ``SpaceGuard`` refuses a write (ENOSPC to the client) that would
leave less than ``reserve_bytes`` free, the way ZFS keeps its "slop space" and ext4 its
root reserve.  TRIM is never refused: freeing space is how a guest gets out of it.

Every ENOSPC this package raises is a ``NoSpace`` that names the file, the bytes it
needed and the bytes free, so an operator knows what to free and where.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .errors import NoSpace

MiB = 1 << 20
RESERVE_MIN = 1 * MiB
RESERVE_MAX = 64 * MiB
RESERVE_DIVISOR = 512  # 0.2 % of the file system
BUDGET_MAX = 256 * MiB  # bytes written between two statvfs calls at most


def free_bytes(st: os.statvfs_result) -> int:
    """Bytes this process may still allocate (root may use ext4's reserved blocks)."""
    blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail
    return int(blocks) * int(st.f_frsize)


def reserve_bytes(total: int) -> int:
    """What client writes leave free on a file system of ``total`` bytes: 0.2 % of it,
    at least 1 MiB (a few hundred state files) and at most 64 MiB."""
    return min(RESERVE_MAX, max(RESERVE_MIN, total // RESERVE_DIVISOR))


def free_at(path: Path | str) -> int:
    """Free bytes on the file system of ``path`` (-1 if even statvfs fails)."""
    try:
        return free_bytes(os.statvfs(path))
    except OSError:
        return -1


def no_space(path: Path | str, needed: int, doing: str | None = None) -> NoSpace:
    """The ENOSPC of writing ``needed`` bytes to ``path``, saying what is free there."""
    free = free_at(path if os.path.exists(path) else os.path.dirname(path) or ".")
    what = doing or f"writing {path}"
    return NoSpace(f"No space left on device: {what} needs {needed} bytes, "
                   f"{free} bytes free on its file system", str(path), needed, free)


def is_enospc(e: OSError) -> bool:
    return e.errno in (28, 122)  # ENOSPC, EDQUOT


class SpaceGuard:
    """Refuses client writes that would eat into the reserve of the file system that
    holds ``path`` (a volume's store).

    statvfs is asked again once the writes since the last answer could have used a
    quarter of the room that was left (at most every BUDGET_MAX bytes), so a volume far
    from full pays one statvfs per 256 MiB written, and one near full pays one per write.
    Other writers to the same file system (other volumes, snapshots, peerlink) are seen
    at the next statvfs; the reserve is what absorbs them meanwhile."""

    def __init__(self, path: Path, volume: str) -> None:
        self.path = path
        self.volume = volume
        st = os.statvfs(path)
        self.reserve = reserve_bytes(int(st.f_blocks) * int(st.f_frsize))
        self.budget = 0

    def check(self, needed: int) -> None:
        """Raise NoSpace unless ``needed`` bytes can be written with the reserve left."""
        self.budget -= needed
        if self.budget >= 0:
            return
        free = -1
        with contextlib.suppress(OSError):
            free = free_bytes(os.statvfs(self.path))
        if free < 0:
            self.budget = 0
            return  # cannot tell: let the write try (the kernel says ENOSPC if it must)
        room = free - self.reserve - needed
        if room < 0:
            self.budget = 0
            raise NoSpace(
                f"No space left on device: a write to volume {self.volume} needs {needed} "
                f"bytes (store and journal) plus {self.reserve} kept free for nbdgw's state "
                f"files; {free} bytes free on the file system of {self.path}",
                str(self.path), needed + self.reserve, free)
        self.budget = min(room // 4, BUDGET_MAX)
