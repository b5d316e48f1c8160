"""Snapshots of one volume: a copy-on-write extent store and its index.

Layout under ``volumes/<V>/snapshots/``::

    index          append-only log: a header (magic, version, COW extent size, volume
                   uuid, CRC32C), then records, each with a magic and a CRC32C
    data           pre-image slots of one COW extent each (sparse; freed slots punched)
    rollback.json  a rollback in progress (volume.py finishes it on the next open)

Model (theory of operation).  Snapshots S1 < S2 < ... < Sn are ordered by id, and ids
rise with the journal seq of the MARK record that took them.  A write to COW extent e
first preserves e's current content for the newest snapshot Sn, unless Sn owns a
pre-image of e already: one dict lookup, so the cost beyond the first overwrite does not
grow with the number of snapshots.  That pre-image is e as it was when Sn was taken
(nothing wrote e between Sn's MARK and the write that preserved it).

Reading Si at e: the pre-image owned by the oldest Sj with j >= i, else the live volume.
(If none of Si..S(j-1) owns e, e was not written between Si and Sj, so e at Sj is e at
Si; if no Sj owns e, e was not written since Si.)

Deleting Sk: each pre-image Sk owns moves to the previous surviving snapshot when that
one owns none of e (it read e through Sk), else it is freed; later snapshots never read
Sk's pre-images.  The move is a function of the index, so one DELETE record makes the
delete atomic and replay recomputes it.

Crash safety (the order is volume.py's): the pre-image data is written and fdatasync'ed,
then its COW record is appended and fdatasync'ed, and only then is the live store
overwritten.  A crash before the record is durable leaves the slot free and the store
untouched.  A freed slot is reused only after its DELETE record is durable.

COW extent: 64 KiB (LVM-thin's default chunk).  A 4 KiB write that is the first to touch
an extent since the newest snapshot copies 64 KiB once (16x); larger extents would make
that worse for the random small writes databases do, smaller ones would grow the index
(about 100 bytes of memory per preserved extent, 1.6 MB per GiB of preserved data) and
the per-extent work of sequential writes.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import heapq
import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from crc32c import crc32c

from .errors import FormatError, InvalidArgument
from .meta import fsync_dir
from .modes import create_file, make_dir
from .store import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, Store, fallocate, open_noatime

INDEX_MAGIC = b"NBDGWSNP"
INDEX_VERSION = 1
DEFAULT_COW_SHIFT = 16  # 64 KiB
MAX_SNAPSHOTS = 512
ZERO_SLOT = -1  # the pre-image is all zeros: nothing stored

_HEADER = struct.Struct("<8sHBB16sQI")  # magic, version, cow_shift, 0, volume uuid, ns, crc
HEADER_SIZE = _HEADER.size  # 40
REC_MAGIC = 0x3152_4E53  # b"SNR1"
_REC = struct.Struct("<IIIB3x")  # magic, crc (of the rest), body length, type
REC_SIZE = _REC.size  # 16
_COW_HEAD = struct.Struct("<II")  # snapshot id, entry count
_COW_ENTRY = struct.Struct("<QqI")  # extent, slot, CRC32C of the pre-image
_ID = struct.Struct("<I")
MAX_BODY = 16 << 20

T_CREATE = 1
T_COW = 2
T_DELETE = 3
T_HIGHWATER = 4  # ids below this were used (a snapshot refused on a replica, compaction)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,63}$")


class SnapshotError(InvalidArgument):
    """A snapshot operation the state does not allow (limit, unknown name, replica)."""


def validate_snapshot_name(name: str) -> str:
    """Return ``name`` if it can be a snapshot name (and part of an export name)."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise SnapshotError(
            f"invalid snapshot name {name!r}: use 1-64 letters, digits, '.', '_', ':', '+' "
            "or '-', starting with a letter or digit")
    return name


# -- codec (pure) ---------------------------------------------------------------------------

def encode_header(cow_shift: int, volume_uuid: bytes, created_ns: int) -> bytes:
    body = _HEADER.pack(INDEX_MAGIC, INDEX_VERSION, cow_shift, 0, volume_uuid, created_ns, 0)
    return body[:-4] + struct.pack("<I", crc32c(body[:-4]))


def decode_header(buf: bytes) -> tuple[int, bytes]:
    """Return (cow_shift, volume uuid) of an index header; FormatError if it is bad."""
    if len(buf) < HEADER_SIZE:
        raise FormatError(f"short snapshot index header ({len(buf)} of {HEADER_SIZE} bytes)")
    magic, version, shift, _r, vuuid, _ns, crc = _HEADER.unpack_from(buf)
    if magic != INDEX_MAGIC:
        raise FormatError(f"bad snapshot index magic {magic!r}")
    if version != INDEX_VERSION:
        raise FormatError(f"unsupported snapshot index version {version} "
                          f"(this is {INDEX_VERSION})")
    if crc32c(buf[:HEADER_SIZE - 4]) != crc:
        raise FormatError("snapshot index header checksum mismatch")
    if not 12 <= shift <= 24:
        raise FormatError(f"snapshot index COW extent shift {shift} out of range")
    return shift, vuuid


def encode_record(rtype: int, body: bytes) -> bytes:
    tail = struct.pack("<IB3x", len(body), rtype) + body
    return struct.pack("<II", REC_MAGIC, crc32c(tail)) + tail


def _decode_at(buf: bytes, pos: int) -> tuple[int, bytes, int]:
    """(type, body, next pos) of the record at ``pos``; FormatError if it is not whole."""
    if pos + REC_SIZE > len(buf):
        raise FormatError("short record header")
    magic, crc, blen, rtype = _REC.unpack_from(buf, pos)
    if magic != REC_MAGIC:
        raise FormatError(f"bad record magic 0x{magic:08x}")
    if blen > MAX_BODY:
        raise FormatError(f"record body length {blen} exceeds {MAX_BODY}")
    end = pos + REC_SIZE + blen
    if end > len(buf):
        raise FormatError("short record body")
    if crc32c(buf[pos + 8:end]) != crc:
        raise FormatError("record checksum mismatch")
    if rtype not in (T_CREATE, T_COW, T_DELETE, T_HIGHWATER):
        raise FormatError(f"unknown record type {rtype}")
    return rtype, buf[pos + REC_SIZE:end], end


def scan_records(buf: bytes) -> tuple[list[tuple[int, bytes]], int, int]:
    """Decode every record after the header: (records, end of valid data, torn bytes).

    A bad record with no valid record after it is a torn tail (an interrupted append) and
    ends the log; one with a valid record after it is corruption (FormatError)."""
    out: list[tuple[int, bytes]] = []
    pos = HEADER_SIZE
    while pos < len(buf):
        try:
            rtype, body, nxt = _decode_at(buf, pos)
        except FormatError as e:
            magic = struct.pack("<I", REC_MAGIC)
            i = buf.find(magic, pos + 1)
            while i >= 0:
                try:
                    _decode_at(buf, i)
                except FormatError:
                    i = buf.find(magic, i + 1)
                    continue
                raise FormatError(f"snapshot index corrupt at offset {pos}: {e}") from None
            return out, pos, len(buf) - pos
        out.append((rtype, body))
        pos = nxt
    return out, pos, 0


def encode_create(snap: Snapshot) -> bytes:
    return encode_record(T_CREATE, msgpack.packb(
        {"id": snap.id, "name": snap.name, "seq": snap.mark_seq, "time": snap.created,
         "group": snap.group}))


def encode_cow(snap_id: int, entries: list[tuple[int, int, int]]) -> bytes:
    body = _COW_HEAD.pack(snap_id, len(entries)) + b"".join(
        _COW_ENTRY.pack(e, s, c) for e, s, c in entries)
    return encode_record(T_COW, body)


# -- the index (pure: no I/O) ----------------------------------------------------------------

@dataclass
class Snapshot:
    """One snapshot and the pre-images it owns (extent -> slot, ZERO_SLOT for zeros)."""

    id: int
    name: str
    mark_seq: int
    created: float
    group: str = ""
    owned: dict[int, int] = field(default_factory=dict)

    def stored_extents(self) -> int:
        return sum(1 for s in self.owned.values() if s != ZERO_SLOT)


class SnapshotIndex:
    """The snapshots of a volume and who owns which pre-image (see the module doc)."""

    def __init__(self) -> None:
        self.snaps: dict[int, Snapshot] = {}
        self.order: list[int] = []  # ids, ascending
        self.by_name: dict[str, int] = {}
        self.next_id = 1
        self.slot_crc: dict[int, int] = {}  # slots in use -> CRC32C of their content

    def __len__(self) -> int:
        return len(self.order)

    @property
    def newest(self) -> Snapshot | None:
        return self.snaps[self.order[-1]] if self.order else None

    def get(self, name: str) -> Snapshot:
        sid = self.by_name.get(name)
        if sid is None:
            raise SnapshotError(f"no snapshot named {name!r}")
        return self.snaps[sid]

    def add(self, snap: Snapshot) -> None:
        if snap.id < self.next_id or snap.id in self.snaps:
            raise FormatError(f"snapshot id {snap.id} is not above {self.next_id - 1}")
        if snap.name in self.by_name:
            raise FormatError(f"snapshot name {snap.name!r} twice in the index")
        self.snaps[snap.id] = snap
        self.order.append(snap.id)
        self.by_name[snap.name] = snap.id
        self.next_id = snap.id + 1

    def highwater(self, next_id: int) -> None:
        self.next_id = max(self.next_id, next_id)

    def cow(self, snap_id: int, entries: list[tuple[int, int, int]]) -> None:
        snap = self.snaps.get(snap_id)
        if snap is None:
            raise FormatError(f"pre-images for unknown snapshot {snap_id}")
        for extent, slot, crc in entries:
            if extent in snap.owned:
                raise FormatError(f"snapshot {snap_id} owns extent {extent} twice")
            if slot != ZERO_SLOT:
                if slot in self.slot_crc:
                    raise FormatError(f"slot {slot} is used twice")
                self.slot_crc[slot] = crc
            snap.owned[extent] = slot

    def delete(self, snap_id: int) -> list[int]:
        """Remove a snapshot; move its pre-images to the previous one where that one
        reads through them; return the slots freed."""
        snap = self.snaps.pop(snap_id)
        i = self.order.index(snap_id)
        self.order.pop(i)
        del self.by_name[snap.name]
        prev = self.snaps[self.order[i - 1]] if i > 0 else None
        freed: list[int] = []
        for extent, slot in snap.owned.items():
            if prev is not None and extent not in prev.owned:
                prev.owned[extent] = slot
            elif slot != ZERO_SLOT:
                freed.append(slot)
                del self.slot_crc[slot]
        return freed

    def target_before(self, seq: int) -> Snapshot | None:
        """The newest snapshot taken before journal seq ``seq``: the one a record with
        that seq preserves pre-images for (redo replays records older than the newest)."""
        if not self.order:
            return None
        newest = self.snaps[self.order[-1]]
        if newest.mark_seq < seq:
            return newest
        seqs = [self.snaps[i].mark_seq for i in self.order]
        k = bisect.bisect_left(seqs, seq)
        return self.snaps[self.order[k - 1]] if k else None

    def owner_slot(self, snap_id: int, extent: int) -> int | None:
        """Where snapshot ``snap_id`` reads ``extent``: a slot, ZERO_SLOT, or None for
        the live volume."""
        i = bisect.bisect_left(self.order, snap_id)
        for sid in self.order[i:]:
            slot = self.snaps[sid].owned.get(extent)
            if slot is not None:
                return slot
        return None

    def changed_since(self, snap_id: int) -> set[int]:
        """Extents written since ``snap_id`` was taken (owned by it or a later one)."""
        out: set[int] = set()
        i = bisect.bisect_left(self.order, snap_id)
        for sid in self.order[i:]:
            out.update(self.snaps[sid].owned)
        return out

    def apply(self, rtype: int, body: bytes) -> list[int]:
        """Apply one decoded record; return slots it freed."""
        if rtype == T_CREATE:
            d = msgpack.unpackb(body)
            self.add(Snapshot(int(d["id"]), str(d["name"]), int(d["seq"]), float(d["time"]),
                              str(d.get("group", ""))))
        elif rtype == T_COW:
            sid, count = _COW_HEAD.unpack_from(body)
            if len(body) != _COW_HEAD.size + count * _COW_ENTRY.size:
                raise FormatError(f"COW record of {count} entries has {len(body)} bytes")
            self.cow(sid, list(_COW_ENTRY.iter_unpack(body[_COW_HEAD.size:])))
        elif rtype == T_DELETE:
            (sid,) = _ID.unpack(body)
            if sid not in self.snaps:
                raise FormatError(f"delete of unknown snapshot {sid}")
            return self.delete(sid)
        elif rtype == T_HIGHWATER:
            (nxt,) = _ID.unpack(body)
            self.highwater(nxt)
        return []


def read_index(path: Path) -> tuple[int, SnapshotIndex]:
    """(COW shift, index) of an index file, read without changing it (a served volume's
    index may be read by another process: a record being appended is a torn tail)."""
    with open(path, "rb") as f:
        buf = f.read()
    shift, _ = decode_header(buf)
    records, _end, _torn = scan_records(buf)
    index = SnapshotIndex()
    for rtype, body in records:
        index.apply(rtype, body)
    return shift, index


# -- the store (file I/O) --------------------------------------------------------------------

class SnapshotStore:
    """The index and the pre-image data of one volume, open for reading or writing."""

    def __init__(self, directory: Path, size: int, *, readonly: bool = False) -> None:
        self.dir = directory
        self.size = size
        self.readonly = readonly
        self.index_fd = -1
        self.data_fd = -1
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def create(directory: Path, volume_uuid: bytes, cow_shift: int = DEFAULT_COW_SHIFT
               ) -> None:
        """An empty index and data file, made durable, renamed into place last."""
        tmp = directory.with_name(directory.name + ".creating")
        if tmp.exists():
            for p in tmp.iterdir():
                p.unlink()
        else:
            make_dir(tmp)
        for name, content in (("index", encode_header(cow_shift, volume_uuid, time.time_ns())),
                              ("data", b"")):
            fd = create_file(tmp / name, os.O_WRONLY | os.O_TRUNC, data=name == "data")
            try:
                os.write(fd, content)
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(tmp)
        os.rename(tmp, directory)
        fsync_dir(directory.parent)

    def _open(self) -> None:
        flags = os.O_RDONLY if self.readonly else os.O_RDWR
        self.index_fd = os.open(self.dir / "index", flags)
        self.data_fd = os.open(self.dir / "data", flags)
        buf = _read_all(self.index_fd)
        try:
            self.shift, _ = decode_header(buf)
            records, end, torn = scan_records(buf)
        except FormatError as e:
            raise FormatError(f"{self.dir / 'index'}: {e}") from None
        self.ext = 1 << self.shift
        self.index = SnapshotIndex()
        for rtype, body in records:
            self.index.apply(rtype, body)
        self.records = len(records)
        self.pos = end
        self.torn = torn
        if torn and not self.readonly:
            os.ftruncate(self.index_fd, end)
            os.fsync(self.index_fd)
        used = self.index.slot_crc
        self.slot_hw = max(used) + 1 if used else 0
        self.free = [s for s in range(self.slot_hw) if s not in used]
        heapq.heapify(self.free)

    def close(self) -> None:
        for name in ("index_fd", "data_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    # -- index appends -----------------------------------------------------------------

    def _append(self, rec: bytes) -> None:
        """Append one record durably; on failure nothing of it is kept."""
        if self.readonly:
            raise OSError(errno.EROFS, "snapshot index is open read-only")
        try:
            n = os.pwrite(self.index_fd, rec, self.pos)
            if n != len(rec):
                raise OSError(errno.ENOSPC, "No space left on device (short index append)")
            os.fdatasync(self.index_fd)
        except OSError:
            with contextlib.suppress(OSError):  # else the next open cuts the torn tail
                os.ftruncate(self.index_fd, self.pos)
            raise
        self.pos += len(rec)
        self.records += 1

    def add(self, snap: Snapshot) -> None:
        if len(self.index) >= MAX_SNAPSHOTS:
            raise SnapshotError(f"already {MAX_SNAPSHOTS} snapshots (the maximum)")
        self._append(encode_create(snap))
        self.index.add(snap)

    def skip(self, snap_id: int) -> None:
        """Never take snapshot ``snap_id`` (a replica refused it); redo must not either."""
        self._append(encode_record(T_HIGHWATER, _ID.pack(snap_id + 1)))
        self.index.highwater(snap_id + 1)

    def delete(self, snap_id: int) -> None:
        self._append(encode_record(T_DELETE, _ID.pack(snap_id)))
        freed = self.index.delete(snap_id)
        for slot in freed:  # durable DELETE first: only then may a slot be reused
            with contextlib.suppress(OSError):  # space kept; the slot is free anyway
                fallocate(self.data_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                          slot << self.shift, self.ext)
            heapq.heappush(self.free, slot)
        if self.records > 2 * self.live_records() + 1024:
            self.compact()

    def live_records(self) -> int:
        return 1 + 2 * len(self.index) + sum(
            len(s.owned) // 4096 for s in self.index.snaps.values())

    def compact(self) -> None:
        """Rewrite the index as the records of the current state (temp, fsync, rename)."""
        tmp = self.dir / "index.tmp"
        _shift, vuuid = decode_header(os.pread(self.index_fd, HEADER_SIZE, 0))
        parts = [encode_header(self.shift, vuuid, time.time_ns())]
        count = 1
        for sid in self.index.order:
            snap = self.index.snaps[sid]
            parts.append(encode_create(Snapshot(snap.id, snap.name, snap.mark_seq,
                                                snap.created, snap.group)))
            items = [(e, s, self.index.slot_crc.get(s, 0)) for e, s in snap.owned.items()]
            count += 1
            for i in range(0, len(items), 4096):
                parts.append(encode_cow(sid, items[i:i + 4096]))
                count += 1
        # Last: the ids of deleted (or refused) snapshots stay used.
        parts.append(encode_record(T_HIGHWATER, _ID.pack(self.index.next_id)))
        data = b"".join(parts)
        fd = create_file(tmp, os.O_RDWR | os.O_TRUNC)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        os.replace(tmp, self.dir / "index")
        fsync_dir(self.dir)
        os.close(self.index_fd)
        self.index_fd, self.pos, self.records = fd, len(data), count

    # -- copy-on-write -----------------------------------------------------------------

    def extent_range(self, offset: int, length: int) -> range:
        if length <= 0:
            return range(0)
        return range(offset >> self.shift, ((offset + length - 1) >> self.shift) + 1)

    def extent_len(self, extent: int) -> int:
        return min(self.ext, self.size - (extent << self.shift))

    def unpreserved(self, snap: Snapshot, offset: int, length: int) -> list[int]:
        """Extents of [offset, offset+length) that ``snap`` owns no pre-image of yet."""
        owned = snap.owned
        return [e for e in self.extent_range(offset, length) if e not in owned]

    def preserve(self, snap: Snapshot, extents: list[int], store: Store) -> None:
        """Copy the store's current content of ``extents`` into pre-images owned by
        ``snap``, durably (data, then index record), before the caller overwrites them.
        Holes and all-zero extents cost an index entry only."""
        holes = _hole_extents(store, extents, self.shift) if len(extents) > 1 else set()
        entries: list[tuple[int, int, int]] = []
        taken: list[int] = []
        zeros = bytes(self.ext)
        try:
            for e in extents:
                n = self.extent_len(e)
                if e in holes:
                    entries.append((e, ZERO_SLOT, 0))
                    continue
                buf = bytearray(n)
                store.pread_into(buf, e << self.shift)
                if buf == zeros[:n]:
                    entries.append((e, ZERO_SLOT, 0))
                    continue
                slot = heapq.heappop(self.free) if self.free else self.slot_hw
                if slot == self.slot_hw:
                    self.slot_hw += 1
                taken.append(slot)
                _pwrite_all(self.data_fd, buf, slot << self.shift)
                entries.append((e, slot, crc32c(buf)))
            if taken:
                os.fdatasync(self.data_fd)
            for i in range(0, len(entries), 4096):
                self._append(encode_cow(snap.id, entries[i:i + 4096]))
                self.index.cow(snap.id, entries[i:i + 4096])
                taken = [s for s in taken if s not in self.index.slot_crc]
        finally:
            for slot in taken:  # not recorded: free again
                heapq.heappush(self.free, slot)

    # -- reading a snapshot --------------------------------------------------------------

    def read_slot(self, slot: int, extent: int) -> bytes:
        n = self.extent_len(extent)
        data = os.pread(self.data_fd, n, slot << self.shift)
        if len(data) != n or crc32c(data) != self.index.slot_crc.get(slot):
            raise OSError(errno.EIO, f"snapshot pre-image of extent {extent} (slot {slot}) "
                          "fails its checksum")
        return data

    def read_into(self, snap_id: int, buf: bytearray | memoryview, offset: int,
                  store: Store) -> None:
        """Read snapshot ``snap_id`` at [offset, offset+len(buf)) into ``buf``."""
        view = memoryview(buf)
        pos, end = offset, offset + len(buf)
        while pos < end:
            e = pos >> self.shift
            e_end = min((e + 1) << self.shift, end)
            slot = self.index.owner_slot(snap_id, e)
            # Runs of extents read from the live store are read in one call.
            if slot is None:
                while e_end < end and self.index.owner_slot(snap_id, e_end >> self.shift
                                                            ) is None:
                    e_end = min(e_end + self.ext, end)
                store.pread_into(view[pos - offset:e_end - offset], pos)
            elif slot == ZERO_SLOT:
                view[pos - offset:e_end - offset] = bytes(e_end - pos)
            else:
                data = self.read_slot(slot, e)
                base = e << self.shift
                view[pos - offset:e_end - offset] = data[pos - base:e_end - base]
            pos = e_end

    def extents(self, snap_id: int, offset: int, count: int, store: Store
                ) -> list[tuple[int, int, bool]]:
        """Allocated (True) and hole (False) runs from ``offset`` (a prefix of the range
        at most 64 MiB long, as NBD block status allows)."""
        end = min(offset + count, self.size, offset + (64 << 20))
        out: list[tuple[int, int, bool]] = []

        def put(o: int, n: int, alloc: bool) -> None:
            if out and out[-1][2] == alloc and out[-1][0] + out[-1][1] == o:
                out[-1] = (out[-1][0], out[-1][1] + n, alloc)
            else:
                out.append((o, n, alloc))

        pos = offset
        while pos < end:
            e = pos >> self.shift
            e_end = min((e + 1) << self.shift, end)
            slot = self.index.owner_slot(snap_id, e)
            if slot is None:
                for o, n, alloc in store.extents(pos, e_end - pos):
                    put(o, n, alloc)
            else:
                put(pos, e_end - pos, slot != ZERO_SLOT)
            pos = e_end
        return out


def _hole_extents(store: Store, extents: list[int], shift: int) -> set[int]:
    """The extents among ``extents`` that lie wholly in holes of the store."""
    lo, hi = min(extents), max(extents)
    out: set[int] = set()
    want = set(extents)
    start = lo << shift
    for o, n, alloc in store.extents(start, ((hi + 1) << shift) - start):
        if alloc:
            continue
        first = (o + (1 << shift) - 1) >> shift
        last = (o + n) >> shift  # exclusive: extents wholly inside [o, o+n)
        if (o + n) >= store.size:
            last = hi + 1
        out.update(e for e in range(first, last) if e in want)
    return out


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0)
    if len(data) != size:
        raise OSError(errno.EIO, "short read of the snapshot index")
    return data


def _write_all(fd: int, data: bytes) -> None:
    _pwrite_all(fd, data, 0)


def _pwrite_all(fd: int, data: bytes | bytearray, offset: int) -> None:
    n = os.pwrite(fd, data, offset)
    if n != len(data):
        raise OSError(errno.ENOSPC, f"short write of a snapshot pre-image at {offset}")


class SnapshotView:
    """Snapshot ``snap`` of a volume, read-only (what a ``VOLUME@SNAP`` export reads).
    Refuses to read once the snapshot is deleted (its pre-images may be reused)."""

    readonly = True

    def __init__(self, snaps: SnapshotStore, store: Store | None, snap: Snapshot,
                 volume: str) -> None:
        assert store is not None
        self.snaps = snaps
        self.store = store
        self.snap = snap
        self.name = f"{volume}@{snap.name}"
        self.size = snaps.size

    def _check(self) -> None:
        if self.snaps.index.snaps.get(self.snap.id) is not self.snap:
            raise OSError(errno.EIO, f"snapshot {self.name} was deleted")

    def read_into(self, buf: bytearray | memoryview, offset: int) -> None:
        self._check()
        if offset < 0 or offset + len(buf) > self.size:
            raise OSError(errno.EINVAL, f"read [{offset}, +{len(buf)}) outside {self.size}")
        self.snaps.read_into(self.snap.id, buf, offset, self.store)

    def extents(self, offset: int, count: int) -> list[tuple[int, int, bool]]:
        self._check()
        return self.snaps.extents(self.snap.id, offset, count, self.store)

    def flush(self) -> None:
        """Nothing to make durable: a snapshot is never written."""


def list_rows(index: SnapshotIndex, shift: int) -> list[dict[str, Any]]:
    """One row per snapshot, oldest first: what `nbdgw snapshot list` shows."""
    return [{"id": s.id, "name": s.name, "time": s.created, "seq": s.mark_seq,
             "group": s.group, "held_bytes": s.stored_extents() << shift,
             "extents": len(s.owned)}
            for s in (index.snaps[i] for i in index.order)]


ROLLBACK_FILE = "rollback.json"


# -- reading from another process (a replica's snapshots while its receiver writes) ------------

REDO_FILE = "redo"  # "R <token>" while redo rewrites the store, "D <token>" after
_REDO_LEN = 18
REDO_WAIT = 10.0  # seconds a read waits for the writer's redo to finish, then EIO


class RedoFence:
    """The writer's side of the one case the COW order does not cover: redo after a
    crash replays records older than a snapshot's MARK into the store, so an extent a
    snapshot reads through the live store passes through older contents for a while.
    ``begin`` before redo writes the store, ``end`` after; each writes a fresh token, so a
    reader that sees the same "D" token before and after its read knows no redo ran in
    between (SnapshotFollower).  Not made durable: readers of a crashed machine are gone."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / REDO_FILE

    def _put(self, state: bytes) -> None:
        fd = create_file(self.path, os.O_WRONLY)
        try:
            _pwrite_all(fd, state + b" " + os.urandom(8).hex().encode(), 0)
        finally:
            os.close(fd)

    def begin(self) -> None:
        self._put(b"R")

    def end(self) -> None:
        self._put(b"D")


class SnapshotFollower:
    """Read-only snapshots of a volume another process writes (a replica's receiver):
    the index is followed, not owned, and every read runs the protocol below.

    Following: the index file is append-only between compactions; ``refresh`` decodes
    the whole records appended since the last one (a record being appended fails its CRC
    and is picked up next time), and reloads the file when it was replaced (compaction
    renames a new index over it: another inode), truncated (a failed append cut), or
    when what follows does not decode.  After ``refresh`` returns, the index holds every
    record appended before it began.

    Reading snapshot S at [offset, +n) (``read_into``, ``extents``):

    1. refresh; S must still exist (else ESHUTDOWN);
    2. plan each COW extent from the index: a pre-image slot, zeros, or the live store;
       read them;
    3. refresh again; S must still exist; each extent read from the live store that a
       snapshot at or after S owns now is read again from its pre-image.

    Why that is S's image: the writer makes a pre-image durable, then appends its COW
    record, and only then writes the store (volume.py ``_cow``).  If the store read of
    extent e in step 2 saw anything written after S was taken, the COW record that gave
    e to a snapshot >= S was appended before that write began, so before step 3's refresh:
    step 3 finds it and reads the preserved copy.  If step 3 finds no owner, nothing wrote
    e since S before the store read ended, so the store held S's image of e.  Pre-image
    slots never change while they are owned, and stay owned by a snapshot S reads
    through while S exists (a deleted later snapshot hands them back); a slot is reused
    only after a durable DELETE of its last reader, which step 3 sees: ESHUTDOWN, never
    another snapshot's bytes.  Redo is the exception (RedoFence): a read that saw the
    fence change, or in progress, is retried (up to REDO_WAIT seconds).

    Not thread-safe: one lock around each call (the caller's)."""

    def __init__(self, directory: Path, store: Store, volume: str) -> None:
        self.dir = directory
        self.store = store
        self.volume = volume
        self.size = store.size
        self.index_fd = -1
        self.data_fd = open_noatime(directory / "data")
        self.reloads = 0
        self.rechecked = 0  # extents found owned only by step 3 (tests, curiosity)
        self.gone = False  # the volume was deleted (or re-created): nothing more to read
        self.uuid = b""
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for name in ("index_fd", "data_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    # -- following the index -------------------------------------------------------------

    def _load(self) -> None:
        fd = open_noatime(self.dir / "index")
        try:
            buf = _read_all(fd)
            shift, _ = decode_header(buf)
            records, end, _torn = scan_records(buf)
            index = SnapshotIndex()
            for rtype, body in records:
                index.apply(rtype, body)
        except FormatError as e:
            os.close(fd)
            raise OSError(errno.EIO, f"{self.dir / 'index'}: {e}") from None
        except BaseException:
            os.close(fd)
            raise
        if self.index_fd >= 0:
            os.close(self.index_fd)
        self.index_fd, self.ino, self.pos = fd, os.fstat(fd).st_ino, end
        vuuid = decode_header(buf)[1]
        if self.uuid and (vuuid != self.uuid or self._replaced()):
            self._gone("re-created")
        self.uuid = vuuid
        self.shift, self.ext, self.index = shift, 1 << shift, index
        self.reloads += 1

    def _replaced(self) -> bool:
        """Whether the data file or the store is another file than the ones open."""
        try:
            return (os.stat(self.dir / "data").st_ino != os.fstat(self.data_fd).st_ino
                    or os.stat(self.store.path).st_ino != os.fstat(self.store.fd).st_ino)
        except FileNotFoundError:
            return True

    def _gone(self, how: str) -> None:
        self.gone = True
        raise OSError(errno.ESHUTDOWN, f"volume {self.volume} was {how} on this node: "
                      "its snapshots served before are gone, reconnect")

    def refresh(self) -> None:
        """Take in every record appended (or compaction made) before this call."""
        if self.gone:
            self._gone("deleted or re-created")
        try:
            ino = os.stat(self.dir / "index").st_ino
        except FileNotFoundError:
            self._gone("deleted")
        if ino != self.ino:
            self._load()  # compacted: the old file (our fd) may lack the last records
            return
        size = os.fstat(self.index_fd).st_size
        if size < self.pos:
            self._load()
            return
        if size == self.pos:
            return
        buf = os.pread(self.index_fd, size - self.pos, self.pos)
        pos = 0
        try:
            while pos < len(buf):
                try:
                    rtype, body, nxt = _decode_at(buf, pos)
                except FormatError:
                    # Being appended (wait for it), or replaced after a failed append.
                    if buf.find(struct.pack("<I", REC_MAGIC), pos + 1) >= 0:
                        self._load()
                        return
                    break
                self.index.apply(rtype, body)
                pos = nxt
        except FormatError:
            self._load()
            return
        self.pos += pos

    def redo_token(self) -> bytes:
        """The writer's RedoFence state (b"" when it never ran a redo)."""
        try:
            with open(self.dir / REDO_FILE, "rb") as f:
                return f.read(_REDO_LEN)
        except FileNotFoundError:
            return b""

    # -- the protocol --------------------------------------------------------------------

    def snapshot(self, name: str) -> Snapshot:
        self.refresh()
        return self.index.get(name)

    def _alive(self, snap: Snapshot) -> None:
        now = self.index.snaps.get(snap.id)
        if now is None or now.name != snap.name:
            raise OSError(errno.ESHUTDOWN, f"snapshot {self.volume}@{snap.name} was deleted "
                          "(on the primary): reconnect to another snapshot")

    def _settled(self, deadline: float) -> bytes:
        """The redo token once no redo runs (waits until ``deadline``, then EIO)."""
        while True:
            token = self.redo_token()
            if not token.startswith(b"R"):
                return token
            if time.monotonic() >= deadline:
                raise OSError(errno.EIO, f"volume {self.volume} is recovering (redo after a "
                              "crash of its receiver): try again")
            time.sleep(0.05)

    def _read_slot(self, slot: int, extent: int) -> bytes:
        n = min(self.ext, self.size - (extent << self.shift))
        data = os.pread(self.data_fd, n, slot << self.shift)
        if len(data) != n or crc32c(data) != self.index.slot_crc.get(slot):
            raise OSError(errno.EIO, f"snapshot pre-image of extent {extent} (slot {slot}) "
                          "fails its checksum")
        return data

    def _fill(self, view: memoryview, offset: int, e: int, slot: int) -> None:
        """Extent ``e``'s part of ``view`` (which starts at ``offset``) from a pre-image."""
        lo = max(offset, e << self.shift)
        hi = min(offset + len(view), (e + 1) << self.shift)
        if slot == ZERO_SLOT:
            view[lo - offset:hi - offset] = bytes(hi - lo)
        else:
            base = e << self.shift
            view[lo - offset:hi - offset] = self._read_slot(slot, e)[lo - base:hi - base]

    def read_into(self, snap: Snapshot, buf: bytearray | memoryview, offset: int) -> None:
        """Snapshot ``snap`` at [offset, +len(buf)) into ``buf`` (the class doc's steps)."""
        if offset < 0 or offset + len(buf) > self.size:
            raise OSError(errno.EINVAL, f"read [{offset}, +{len(buf)}) outside {self.size}")
        view = memoryview(buf)
        deadline = time.monotonic() + REDO_WAIT
        while True:
            token = self._settled(deadline)
            self.refresh()  # step 1
            self._alive(snap)
            live: list[int] = []  # step 2
            pos, end = offset, offset + len(buf)
            while pos < end:
                e = pos >> self.shift
                e_end = min((e + 1) << self.shift, end)
                slot = self.index.owner_slot(snap.id, e)
                if slot is None:
                    live.append(e)
                    while e_end < end and self.index.owner_slot(
                            snap.id, e_end >> self.shift) is None:
                        live.append(e_end >> self.shift)
                        e_end = min(e_end + self.ext, end)
                    self.store.pread_into(view[pos - offset:e_end - offset], pos)
                else:
                    self._fill(view, offset, e, slot)
                pos = e_end
            self.refresh()  # step 3
            self._alive(snap)
            if self.redo_token() != token:
                if time.monotonic() >= deadline:
                    raise OSError(errno.EIO, f"volume {self.volume} is recovering (redo "
                                  "after a crash of its receiver): try again")
                continue  # a redo ran meanwhile: the live reads may have seen it
            for e in live:
                slot = self.index.owner_slot(snap.id, e)
                if slot is not None:
                    self.rechecked += 1
                    self._fill(view, offset, e, slot)
            return

    def extents(self, snap: Snapshot, offset: int, count: int
                ) -> list[tuple[int, int, bool]]:
        """Allocated and hole runs of ``snap`` from ``offset`` (at most 64 MiB), by the
        same protocol: runs from the live store are dropped for extents owned by step 3."""
        end = min(offset + count, self.size, offset + (64 << 20))
        deadline = time.monotonic() + REDO_WAIT
        while True:
            token = self._settled(deadline)
            self.refresh()
            self._alive(snap)
            plan: list[tuple[int, int, int | None]] = []  # (start, end, slot or None)
            pos = offset
            while pos < end:
                e = pos >> self.shift
                e_end = min((e + 1) << self.shift, end)
                plan.append((pos, e_end, self.index.owner_slot(snap.id, e)))
                pos = e_end
            found = {s: self.store.extents(s, t - s) for s, t, slot in plan if slot is None}
            self.refresh()
            self._alive(snap)
            if self.redo_token() != token:
                if time.monotonic() >= deadline:
                    raise OSError(errno.EIO, f"volume {self.volume} is recovering (redo "
                                  "after a crash of its receiver): try again")
                continue
            out: list[tuple[int, int, bool]] = []
            for s, t, planned in plan:
                slot = planned if planned is not None else self.index.owner_slot(
                    snap.id, s >> self.shift)
                runs = found[s] if slot is None else [(s, t - s, slot != ZERO_SLOT)]
                for o, n, alloc in runs:
                    if out and out[-1][2] == alloc and out[-1][0] + out[-1][1] == o:
                        out[-1] = (out[-1][0], out[-1][1] + n, alloc)
                    else:
                        out.append((o, n, alloc))
            return out


class FollowedSnapshotView(SnapshotView):
    """Snapshot ``snap_name`` of a volume another process writes, read-only, through a
    SnapshotFollower (what ``REPLICA@SNAP`` exports read on a replica's node).  A
    snapshot deleted under it (the primary deleted it) fails reads with ESHUTDOWN."""

    def __init__(self, follower: SnapshotFollower, snap_name: str) -> None:
        self.follower = follower
        self.snap = follower.snapshot(snap_name)
        self.name = f"{follower.volume}@{snap_name}"
        self.size = follower.size

    def read_into(self, buf: bytearray | memoryview, offset: int) -> None:
        self.follower.read_into(self.snap, buf, offset)

    def extents(self, offset: int, count: int) -> list[tuple[int, int, bool]]:
        return self.follower.extents(self.snap, offset, count)
