"""Writable clones (DESIGN.md §7b): a volume's snapshot, on any site, made writable
without a copy.  A clone stores only its own writes; every block it never wrote is read
from its base (a snapshot view, or any reader with ``size`` and ``read_into``).

**The map is the file system's.**  A clone's writes go to a sparse file the size of the
volume (``clones/NAME/data``).  A block the clone wrote is allocated there; a block it
never wrote is a hole, and is read from the base.  ``SEEK_DATA``/``SEEK_HOLE`` tell which
is which, so there is no map of our own to keep consistent with the data: a write lands
in the page cache and counts as written at once (the file system tracks delayed
allocation), and ``fdatasync`` at a FLUSH (or FUA) makes data and allocation durable
together.  After a crash a block is either allocated with the data of a completed write
or still a hole, which is what an unflushed write may come to after a power cut.

Writes are whole file-system blocks: a write that covers part of a block the clone has
not written yet first fills the rest of that block from the base (under a lock, so two
partial writes into one block never undo each other).  TRIM and ZERO write zeros:
a hole would show the base again.  A clone is never replicated and never journaled: it
is for mounting, testing and throwing away.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .cdp import remove_pin
from .errors import InvalidArgument
from .meta import read_json, write_json
from .modes import make_dir

KIND = "clone"
VERSION = 1
MIN_BLOCK = 4096


class CloneError(InvalidArgument):
    """A clone operation refused, with the reason."""


class Base(Protocol):
    """What a clone reads its unwritten blocks from."""

    @property
    def size(self) -> int: ...

    def read_into(self, buf: bytearray | memoryview, offset: int) -> None: ...


@dataclass(frozen=True)
class CloneInfo:
    name: str
    path: Path  # clones/NAME
    volume: str  # the volume it was made from
    snapshot: str  # the snapshot its base is
    size: int
    created: float
    uuid: str
    point_seq: int | None = None  # a clone of a CDP point: its journal seq (cdp.py)
    base_id: int | None = None  # ... and the CDP base it reads (pinned while it exists)

    @property
    def is_point(self) -> bool:
        return self.point_seq is not None

    @property
    def data(self) -> Path:
        return self.path / "data"

    @classmethod
    def load(cls, path: Path) -> CloneInfo:
        d = read_json(path / "clone.json", KIND, VERSION)
        point = d.get("point")
        return cls(name=str(d["name"]), path=path, volume=str(d["volume"]),
                   snapshot=str(d["snapshot"]), size=int(d["size"]),
                   created=float(d["created"]), uuid=str(d["uuid"]),
                   point_seq=int(point["seq"]) if point else None,
                   base_id=int(point["base"]) if point else None)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "volume": self.volume, "snapshot": self.snapshot,
                "size": self.size, "created": self.created, "uuid": self.uuid,
                "allocated_bytes": allocated_bytes(self.data),
                "point": ({"seq": self.point_seq, "base": self.base_id} if self.is_point
                          else None)}


def pin_owner(name: str) -> str:
    """The name of the CDP pin clone ``name`` holds (cdp.add_pin)."""
    return f"clone-{name}"


def clones_dir(data_dir: Path) -> Path:
    return data_dir / "clones"


def create_clone(data_dir: Path, name: str, volume: str, snapshot: str, size: int,
                 point: tuple[int, int] | None = None) -> CloneInfo:
    """An empty clone of ``volume@snapshot`` (the caller checked the snapshot exists
    and that no volume is called ``name``); of a CDP point when ``point`` is (seq, base
    id): the caller pinned that base for the clone (cdp.add_pin) first."""
    path = clones_dir(data_dir) / name
    make_dir(clones_dir(data_dir), parents=True, exist_ok=True)
    try:
        make_dir(path)
    except FileExistsError:
        raise CloneError(f"a clone named {name} exists") from None
    try:
        fd = os.open(path / "data", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        info = CloneInfo(name=name, path=path, volume=volume, snapshot=snapshot, size=size,
                         created=time.time(), uuid=str(uuid.uuid4()),
                         point_seq=point[0] if point else None,
                         base_id=point[1] if point else None)
        write_json(path / "clone.json", {"kind": KIND, "version": VERSION, "name": name,
                                         "volume": volume, "snapshot": snapshot,
                                         "size": size, "created": info.created,
                                         "uuid": info.uuid,
                                         **({"point": {"seq": point[0], "base": point[1]}}
                                            if point else {})})
    except BaseException:
        for p in (path / "clone.json", path / "data"):
            p.unlink(missing_ok=True)
        path.rmdir()
        raise
    return info


def list_clones(data_dir: Path) -> list[CloneInfo]:
    d = clones_dir(data_dir)
    if not d.is_dir():
        return []
    return [CloneInfo.load(p) for p in sorted(d.iterdir()) if (p / "clone.json").exists()]


def find_clone(data_dir: Path, name: str) -> CloneInfo | None:
    path = clones_dir(data_dir) / name
    return CloneInfo.load(path) if (path / "clone.json").exists() else None


def clones_of(data_dir: Path, volume: str, snapshot: str | None = None) -> list[str]:
    """The clones whose base is ``volume`` (``@snapshot``): what must go before it."""
    return [c.name for c in list_clones(data_dir)
            if c.volume == volume and (snapshot is None or c.snapshot == snapshot)]


def delete_clone(data_dir: Path, name: str) -> None:
    """Remove a clone and everything it wrote; refused while a server has it open (an
    open clone holds a shared lock on its data file)."""
    info = find_clone(data_dir, name)
    if info is None:
        raise CloneError(f"no clone named {name}")
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(info.data, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CloneError(f"clone {name} is in use (served to NBD or iSCSI "
                                 "clients): disconnect them first") from None
        finally:
            os.close(fd)
    (info.path / "clone.json").unlink()  # first: a half-deleted clone is no clone
    info.data.unlink(missing_ok=True)
    info.path.rmdir()
    if info.is_point:  # its history may go now (after a crash here, the pin no
        # longer counts: it holds only while the clone's clone.json exists)
        remove_pin(data_dir / "volumes" / info.volume, pin_owner(name))


def allocated_bytes(path: Path) -> int:
    """Disk space a clone's writes take (its blocks, not its apparent size)."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


class Clone:
    """An open clone: reads, writes, zeroes and flushes (thread-safe)."""

    def __init__(self, info: CloneInfo, base: Base, *, readonly: bool = False) -> None:
        if base.size != info.size:
            raise CloneError(f"clone {info.name}: its base is {base.size} bytes, the clone "
                             f"{info.size}")
        self.info = info
        self.base = base
        self.readonly = readonly
        self.fd = os.open(info.data, os.O_RDONLY if readonly else os.O_RDWR)
        fcntl.flock(self.fd, fcntl.LOCK_SH)  # delete_clone waits for nobody: it refuses
        self.block = max(MIN_BLOCK, os.fstat(self.fd).st_blksize)
        self.lock = threading.Lock()  # read-modify-write of a block's unwritten rest

    @property
    def size(self) -> int:
        return self.info.size

    @property
    def name(self) -> str:
        return self.info.name

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"request [{offset}, +{length}) outside clone "
                                        f"{self.name} of {self.size} bytes")

    def _next_data(self, pos: int, end: int) -> int:
        """The first allocated byte at or after ``pos`` (``end`` if none before it)."""
        try:
            return min(end, os.lseek(self.fd, pos, os.SEEK_DATA))
        except OSError as e:
            if e.errno == errno.ENXIO:  # nothing allocated from pos to the end of file
                return end
            raise

    def _next_hole(self, pos: int, end: int) -> int:
        return min(end, os.lseek(self.fd, pos, os.SEEK_HOLE))

    def runs(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, written) runs covering the range, in order."""
        out = []
        pos, end = offset, offset + length
        while pos < end:
            data = self._next_data(pos, end)
            if data > pos:
                out.append((pos, data - pos, False))
                pos = data
                continue
            hole = self._next_hole(pos, end)
            out.append((pos, hole - pos, True))
            pos = hole
        return out

    def read_into(self, buf: bytearray | memoryview, offset: int) -> None:
        self._check(offset, len(buf))
        view = memoryview(buf)
        for pos, n, written in self.runs(offset, len(buf)):
            part = view[pos - offset:pos - offset + n]
            if written:
                got = os.preadv(self.fd, [part], pos)
                if got != n:
                    raise OSError(errno.EIO, f"clone {self.name}: short read at {pos}")
            else:
                self.base.read_into(part, pos)

    def _write_blocks(self, data: bytes | memoryview, offset: int) -> None:
        """pwrite ``data`` at ``offset``, filling the unwritten rest of the first and last
        blocks from the base first."""
        end = offset + len(data)
        b = self.block
        lo, hi = offset - offset % b, min(self.size, -(-end // b) * b)
        if (lo, hi) == (offset, end):
            self._pwrite(data, offset)
            return
        with self.lock:
            buf = bytearray(hi - lo)
            for edge in sorted({lo, (hi - 1) // b * b}):
                n = min(b, hi - edge)
                if not self.runs(edge, n)[0][2]:
                    self.base.read_into(memoryview(buf)[edge - lo:edge - lo + n], edge)
                else:
                    os.preadv(self.fd, [memoryview(buf)[edge - lo:edge - lo + n]], edge)
            buf[offset - lo:end - lo] = data
            self._pwrite(buf, lo)

    def _pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    # The volume's write interface (nbd_plugin's handle calls these alike): a clone has
    # no journal, so there is no sequence number to return (0) and nothing to replicate.
    last_seq = 0

    def write(self, buf: bytes | memoryview, offset: int, fua: bool = False) -> int:
        self._writable(offset, len(buf))
        self._write_blocks(buf, offset)
        if fua:
            self.flush()
        return 0

    def zero(self, offset: int, length: int, may_trim: bool | int = False,
             fua: bool = False) -> int:
        """TRIM and ZERO: zeros written (a hole would show the base again)."""
        self._writable(offset, length)
        step = 1 << 20
        for pos in range(offset, offset + length, step):
            n = min(step, offset + length - pos)
            self._write_blocks(bytes(n), pos)
        if fua:
            self.flush()
        return 0

    def trim(self, offset: int, length: int, fua: bool = False) -> int:
        return self.zero(offset, length, fua=fua)

    def extents(self, offset: int, count: int) -> list[tuple[int, int, bool]]:
        """Everything reads as data (the base's holes are not worth a lookup here)."""
        return [(offset, count, True)]

    def flush(self) -> None:
        if not self.readonly:
            os.fdatasync(self.fd)

    def _writable(self, offset: int, length: int) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, f"clone {self.name} is open read-only")
        self._check(offset, length)
