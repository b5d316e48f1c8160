"""The activity log: a persistent, bounded set of "hot" extents (after DRBD's AL).

Before a write may touch an extent that is not hot, the extent is added here and the
log is made durable.  After an unclean stop, every extent in the log may hold data that
the peers have not seen (or peers may hold records this node lost), so all of them are
treated as out of sync.  The set is bounded (``slots``); to make room, the least recently
activated extent is evicted, and the caller's ``before_evict`` makes everything written
to it durable first — so an extent that is not hot never differs from the peers.

On disk: two fixed-size slots written alternately (pwrite + fdatasync); each holds a
transaction number, the extent list and a CRC32C.  Reading picks the valid slot with the
highest transaction number, so a torn slot write leaves the previous state.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

from crc32c import crc32c

from .errors import FormatError
from .meta import fsync_dir
from .modes import create_file

AL_MAGIC = b"NBDGWAL1"
_HDR = struct.Struct("<8sQII")  # magic, txn, count, crc
DEFAULT_EXTENT_SHIFT = 22  # 4 MiB extents


class ActivityLog:
    """Persistent LRU set of hot extent numbers."""

    def __init__(self, path: str, slots: int, before_evict: Callable[[], None]) -> None:
        if slots < 1:
            raise ValueError("activity log needs at least one slot")
        self.path = path
        self.slots = slots
        self.before_evict = before_evict
        self.hot: OrderedDict[int, None] = OrderedDict()
        self.txn = 0
        exists = os.path.exists(path)
        self.fd = create_file(Path(path), os.O_RDWR)
        if exists and os.fstat(self.fd).st_size > 0:
            self._load()
        # Every loaded extent stays hot (a smaller log after a crash must still resync
        # them all); the next activation evicts down to `slots`.
        self.slot_bytes = _HDR.size + 8 * max(slots, len(self.hot))
        size = os.fstat(self.fd).st_size
        if size and size != 2 * self.slot_bytes:
            self._regeometry()  # the slot count changed since the file was written

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _load(self) -> None:
        best: tuple[int, list[int]] | None = None
        size = os.fstat(self.fd).st_size
        slot_bytes = size // 2
        for slot in range(2):
            buf = os.pread(self.fd, slot_bytes, slot * slot_bytes)
            if len(buf) < _HDR.size:
                continue
            magic, txn, count, crc = _HDR.unpack_from(buf)
            body_len = 8 * count
            if magic != AL_MAGIC or _HDR.size + body_len > len(buf):
                continue
            body = buf[_HDR.size:_HDR.size + body_len]
            if crc32c(buf[:_HDR.size - 4] + body) != crc:
                continue
            if best is None or txn > best[0]:
                best = (txn, list(struct.unpack(f"<{count}Q", body)))
        if best is None:
            raise FormatError(f"activity log {self.path}: no valid slot")
        self.txn = best[0]
        for ext in best[1]:
            self.hot[ext] = None

    def _regeometry(self) -> None:
        """Rewrite the file with two slots of the current size, atomically (a new file
        renamed over the old), so that a crash meanwhile keeps the old hot set."""
        tmp = self.path + ".tmp"
        fd = create_file(Path(tmp), os.O_RDWR | os.O_TRUNC)
        old, self.fd = self.fd, fd
        try:
            self._persist()
            self._persist()
        except BaseException:
            self.fd = old
            os.close(fd)
            with contextlib.suppress(OSError):  # a full disk: no stray temp file
                os.unlink(tmp)
            raise
        os.close(old)
        os.replace(tmp, self.path)
        fsync_dir(Path(self.path).parent)

    def _persist(self) -> None:
        self.txn += 1
        exts = list(self.hot)
        body = struct.pack(f"<{len(exts)}Q", *exts)
        head = _HDR.pack(AL_MAGIC, self.txn, len(exts), 0)[: _HDR.size - 4]
        buf = head + struct.pack("<I", crc32c(head + body)) + body
        buf += bytes(self.slot_bytes - len(buf))
        os.pwrite(self.fd, buf, (self.txn % 2) * self.slot_bytes)
        os.fdatasync(self.fd)

    def activate(self, extents: Iterable[int], ahead: Iterable[int] = ()) -> None:
        """Make ``extents`` hot, durably, before the caller writes to them.

        ``ahead``: extents the caller expects to write next (a sequential stream), made
        hot by the same slot write and ``fdatasync`` if they fit in the room left, so
        that their first writes find them hot.  They never cause an eviction, nor a
        larger one: only free slots (or those an eviction ``extents`` needs anyway frees
        beyond its own need) take them.  Hot too early is safe; see DESIGN.md §1."""
        hot = self.hot
        new = [e for e in extents if e not in hot]
        if not new:
            return
        overflow = len(hot) + len(new) - self.slots
        if overflow > 0:
            # Evict an eighth of the log at once: one durability barrier (before_evict)
            # then serves many later activations instead of one each.
            self.before_evict()
            for _ in range(min(max(overflow, self.slots // 8), len(hot))):
                hot.popitem(last=False)
        for e in new:
            hot[e] = None
        room = self.slots - len(hot)
        if room > 0:
            for e in ahead:
                if e not in hot:
                    hot[e] = None
                    new.append(e)
                    room -= 1
                    if not room:
                        break
        need = _HDR.size + 8 * len(hot)
        slot_bytes = self.slot_bytes
        try:
            if need > self.slot_bytes:
                # One request spanning more extents than the log holds: grow the slots.
                self.slot_bytes = need
                self._regeometry()
            else:
                self._persist()
        except BaseException:
            # Not durably hot: a later write must not take them for hot and skip this.
            # (The evicted ones stay gone: before_evict made them durable.)
            for e in new:
                del hot[e]
            self.slot_bytes = slot_bytes
            raise

    def clear(self) -> None:
        """Forget every hot extent (after a clean stop, or once peers are in sync)."""
        self.hot.clear()
        self._persist()

    def extents(self) -> list[int]:
        return sorted(self.hot)
