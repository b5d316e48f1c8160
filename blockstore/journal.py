"""The write journal: numbered records in append-only segment files.

Segment files are named ``seg-<first seq, 16 hex digits>.jnl`` and start with a segment
header (magic, version, journal id, first seq).  Records carry consecutive sequence
numbers across segments.  The active (last) segment is appended to; when it would pass
``segment_bytes`` it is sealed and a new one begins.  Sealed segments stay until
released (once every peer has them, or past the retention cap).

Opening checks the active segment record by record.  A bad record at the end with no
valid record after it is a torn tail (an interrupted append): it is cut.  A bad record
with a valid one after it, a bad record in a sealed segment, or a gap in the sequence is
corruption: ``JournalCorrupt`` names the segment and offset, and nothing past it is used.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from crc32c import crc32c

from .errors import FormatError, JournalCorrupt, JournalGap
from .meta import fsync_dir
from .modes import create_file, make_dir
from .record import (
    REC_HEADER_SIZE,
    REC_MAGIC,
    SEG_HEADER_SIZE,
    Op,
    RecordHeader,
    check_payload,
    decode_header,
    decode_segment_header,
    encode_header,
    encode_segment_header,
)
from .store import FALLOC_FL_KEEP_SIZE, FOLIO_CHUNK, fallocate, pwrite_all

_SEG_RE = re.compile(r"^seg-([0-9a-f]{16})\.jnl$")
_SPARE_PREFIX = "spare-"  # preallocated future segments: spare-<pid>-<n>.tmp
SPARE_POOL = 4  # released segments kept for reuse
_MAGIC_BYTES = struct.pack("<I", REC_MAGIC)
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
# Payloads at least this large are written into the journal by the journal's writer
# thread while the caller's ``alongside`` (the store write) runs: the two page-cache
# copies then run on two cores.  Below it the thread handoff (~15 us) costs more than
# it saves, and the record is written inline.  Measured by bench/datapath.
PARALLEL_MIN = 128 * 1024


def _pwrite_all(fd: int, data: bytes | memoryview, pos: int) -> None:
    """pwrite all of ``data`` or raise (a short write is retried once for the errno);
    in folio-sized pieces (blockstore.store.pwrite_all)."""
    pwrite_all(fd, data, pos, "journal append")


class PayloadWriter:
    """The journal's writer thread: CRC32C and pwrite of one record's payload while the
    caller writes the store.  One job at a time; the caller always waits for its
    result before the request returns, so the payload buffer (nbdkit's, valid only
    during the request) is never used after it, and every returned write has its whole
    record in the page cache (kill -9 loses nothing a write call returned)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[int, bytes | memoryview, int] | None] = (
            queue.SimpleQueue())
        self._done: queue.SimpleQueue[int | Exception] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self, fd: int, payload: bytes | memoryview, pos: int) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="nbdgw-journal",
                                            daemon=True)
            self._thread.start()
        self._jobs.put((fd, payload, pos))

    def result(self) -> int:
        """Wait for the job; return the payload's CRC32C, or raise its error."""
        r = self._done.get()
        if isinstance(r, Exception):
            raise r
        return r

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fd, payload, pos = job
            try:
                crc = crc32c(payload)  # releases the GIL for large buffers
                _pwrite_all(fd, payload, pos)
            except Exception as e:  # noqa: BLE001 (handed to the waiting request, re-raised there)
                self._done.put(e)
            else:
                self._done.put(crc)
            del job, payload

    def stop(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None


def segment_name(first_seq: int) -> str:
    return f"seg-{first_seq:016x}.jnl"


# -- reading a journal another process writes (the format's one owner) --------------------

def journal_bounds(directory: Path) -> tuple[int, int]:
    """(first retained seq, last complete seq) of a journal another process appends to.

    Reads the record headers of the active segment (checked by their own CRC), and the
    payload of the last one only, so it is cheap enough for each handshake: a record whose
    payload is still being written is not counted (streaming may resume right after it).
    """
    firsts = segment_firsts(directory)
    if not firsts:
        raise FormatError(f"journal {directory}: no segment files")
    last_first = firsts[-1]
    seq = last_first - 1
    fd = os.open(directory / segment_name(last_first), os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = SEG_HEADER_SIZE
        last: tuple[RecordHeader, int] | None = None
        while pos + REC_HEADER_SIZE <= size:
            try:
                hdr = decode_header(os.pread(fd, REC_HEADER_SIZE, pos))
            except FormatError:
                break
            if hdr.seq != seq + 1:
                break
            seq = hdr.seq
            last = hdr, pos + REC_HEADER_SIZE
            pos += REC_HEADER_SIZE + hdr.payload_len
        if last is not None:
            hdr, at = last
            try:
                check_payload(hdr, os.pread(fd, hdr.payload_len, at))
            except FormatError:
                seq -= 1  # still being written
    finally:
        os.close(fd)
    return firsts[0], seq


def segment_firsts(directory: Path) -> list[int]:
    """The first seq of each segment file of the journal in ``directory``, ascending."""
    return sorted(int(m.group(1), 16) for n in os.listdir(directory) if (m := _SEG_RE.match(n)))


def segment_files(directory: Path) -> list[Path]:
    """The segment files of the journal in ``directory``, ascending (for their sizes:
    any of them may be released meanwhile)."""
    return [directory / segment_name(f) for f in segment_firsts(directory)]


def retained_extents(directory: Path, from_seq: int, through_seq: int, shift: int
                     ) -> set[int]:
    """Extents (2^shift bytes) touched by the journal's records from_seq..through_seq,
    from their headers only.  Raises FormatError or FileNotFoundError if they are not all
    there (released meanwhile): the caller must not take that as "nothing touched"."""
    out: set[int] = set()
    if from_seq > through_seq:
        return out
    firsts = segment_firsts(directory)
    for first, nxt in zip(firsts, [*firsts[1:], through_seq + 1], strict=True):
        last = min(nxt - 1, through_seq)
        if last < from_seq or first > through_seq:
            continue
        for hdr in record_headers(directory / segment_name(first), first, last):
            if hdr.seq >= from_seq and is_data_op(hdr.op) and hdr.length:
                out.update(range(hdr.offset >> shift,
                                 ((hdr.offset + hdr.length - 1) >> shift) + 1))
    if not firsts or firsts[0] > from_seq:
        raise FileNotFoundError(f"journal {directory}: seq {from_seq} is no longer retained")
    return out


def count_writes(directory: Path, from_seq: int, through_seq: int) -> tuple[int, int]:
    """(data records, bytes they covered) among the journal's records
    ``from_seq..through_seq``, from their headers only.  Raises FileNotFoundError when
    the journal no longer holds ``from_seq`` (released), FormatError on a bad header:
    "unknown", never "none"."""
    if from_seq > through_seq:
        return 0, 0
    firsts = segment_firsts(directory)
    if not firsts or firsts[0] > from_seq:
        raise FileNotFoundError(f"records from seq {from_seq} were released from the journal")
    records = nbytes = 0
    for first, nxt in zip(firsts, [*firsts[1:], through_seq + 1], strict=True):
        last = min(nxt - 1, through_seq)
        if last < from_seq or first > through_seq:
            continue
        for hdr in record_headers(directory / segment_name(first), first, last):
            if hdr.seq >= from_seq and is_data_op(hdr.op):
                records += 1
                nbytes += hdr.length
    return records, nbytes


def last_write_time(directory: Path) -> float | None:
    """When the journal last changed (the newest segment's mtime), None if empty."""
    times = [os.stat(directory / segment_name(f)).st_mtime for f in segment_firsts(directory)]
    return max(times, default=None)


def bytes_after(directory: Path, acked: int, last: int, scan_limit: int) -> int:
    """Bytes of the journal records after ``acked`` through ``last`` (header and
    payload); past ``scan_limit`` records, whole segment sizes (an estimate)."""
    if last <= acked:
        return 0
    firsts = segment_firsts(directory)
    total = 0
    for i, first in enumerate(firsts):
        end = firsts[i + 1] - 1 if i + 1 < len(firsts) else last
        if end <= acked:
            continue
        path = directory / segment_name(first)
        if last - acked > scan_limit:
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
            continue
        with contextlib.suppress(FileNotFoundError, FormatError):
            try:
                for hdr in record_headers(path, first, end):
                    if hdr.seq > acked:
                        total += REC_HEADER_SIZE + hdr.payload_len
            except PermissionError:  # a control.group member: the journal is root's alone
                total += path.stat().st_size  # (DESIGN.md §10): the estimate, as above
    return total


def segment_sizes(directory: Path) -> list[tuple[int, int]]:
    """(first seq, bytes) of each segment file, ascending."""
    return [(f, os.stat(directory / segment_name(f)).st_size)
            for f in segment_firsts(directory)]


@dataclass(frozen=True)
class Segment:
    path: Path
    first_seq: int


@dataclass(frozen=True)
class ScanResult:
    """What opening the journal found."""

    first_seq: int  # oldest retained record (== next_seq when empty)
    last_seq: int  # newest record, or first_seq - 1 when empty
    torn_bytes: int  # bytes cut from the tail


class Journal:
    """Append-only record log of one volume (or, later, one consistency group)."""

    def __init__(self, directory: Path, journal_id: bytes, volume: int = 0,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES,
                 on_rotate: Callable[[], None] | None = None) -> None:
        self.dir = directory
        self.journal_id = journal_id
        self.volume = volume
        self.segment_bytes = segment_bytes
        self.on_rotate = on_rotate
        self.fd = -1
        self.pos = 0
        self.next_seq = 1
        self.segments: list[Segment] = []
        # Sealed segments not yet fdatasync'ed, as (first seq, fd): the next sync()
        # (FLUSH/FUA) does them, so a rotation never stalls the request that triggered
        # it; a segment released first is just closed (see release_through).
        self._unsynced: list[tuple[int, int]] = []
        # A preallocated file (fd, path) that the next rotation renames into place, and
        # whether a rename still needs the directory fsync'ed (done by the next sync()).
        # prepare_spare() and release run on the volume's checkpoint thread: `_lock`
        # guards the spare and the segment list between it and the request path.
        self._spares: list[tuple[int, Path]] = []
        self._spare_ids = itertools.count()
        self._dir_unsynced = False
        self._lock = threading.Lock()
        self._writer = PayloadWriter()
        self._sync_lock = threading.Lock()  # one sync() at a time
        # Every record through synced_seq is durable (sync_ahead lets a FLUSH skip its
        # fdatasync); an error sync_ahead met is raised by the next sync().
        self.synced_seq = 0
        self.sync_error: OSError | None = None
        # Test hook (NBDGW_TEST_SYNC_DELAY, set by the plugin and the receiver): seconds
        # every sync sleeps where its fdatasync is, under the same locks, to stand for a
        # slow disk.
        self.sync_delay = 0.0

    # -- opening ---------------------------------------------------------------

    @staticmethod
    def create(directory: Path, journal_id: bytes) -> None:
        make_dir(directory)
        Journal(directory, journal_id)._new_segment(1)

    def _list(self) -> list[Segment]:
        segs = []
        for name in os.listdir(self.dir):
            m = _SEG_RE.match(name)
            if m:
                segs.append(Segment(self.dir / name, int(m.group(1), 16)))
        segs.sort(key=lambda s: s.first_seq)
        return segs

    def open(self, cut_torn: bool = True) -> ScanResult:
        """Find the segments, check the active one, cut a torn tail (unless told not
        to: then it is reported in torn_bytes and left); open for append."""
        for name in os.listdir(self.dir):  # leftovers of a crash: never part of the journal
            if name.startswith(_SPARE_PREFIX) or name.endswith(".jnl.tmp"):
                (self.dir / name).unlink()
        self.segments = self._list()
        if not self.segments:
            raise FormatError(f"journal {self.dir}: no segment files")
        for prev, seg in zip(self.segments, self.segments[1:], strict=False):
            if seg.first_seq <= prev.first_seq:
                raise JournalCorrupt(seg.path.name, 0, "segment sequence out of order")
        for seg in self.segments[:-1]:
            self._check_segment_header(seg)
        active = self.segments[-1]
        last_seq, end, torn = self._scan_active(active)
        self.fd = os.open(active.path, os.O_RDWR)
        if torn and cut_torn:
            os.ftruncate(self.fd, end)
            os.fsync(self.fd)
        self._preallocate()
        self.pos = end
        self.next_seq = last_seq + 1
        return ScanResult(self.segments[0].first_seq, last_seq, torn)

    def _check_segment_header(self, seg: Segment) -> None:
        with open(seg.path, "rb") as f:
            buf = f.read(SEG_HEADER_SIZE)
        try:
            hdr = decode_segment_header(buf)
        except FormatError as e:
            raise JournalCorrupt(seg.path.name, 0, str(e)) from None
        if hdr.journal_id != self.journal_id:
            raise JournalCorrupt(seg.path.name, 0, "segment belongs to another journal")
        if hdr.first_seq != seg.first_seq:
            raise JournalCorrupt(seg.path.name, 0, "segment header and file name disagree")

    def _scan_active(self, seg: Segment) -> tuple[int, int, int]:
        """Return (last seq, end of valid data, torn bytes) of the active segment."""
        self._check_segment_header(seg)
        size = seg.path.stat().st_size
        fd = os.open(seg.path, os.O_RDONLY)
        try:
            pos = SEG_HEADER_SIZE
            seq = seg.first_seq - 1
            while pos < size:
                try:
                    hdr, _ = self._read_record(fd, pos, seq + 1)
                except FormatError as e:
                    # Search for later records past this one's payload when its header
                    # is sound: the payload may hold journal bytes of its own (a guest
                    # storing journals on the volume), which are not records here.
                    after = pos + 1
                    with contextlib.suppress(FormatError):
                        after = pos + REC_HEADER_SIZE + decode_header(
                            os.pread(fd, REC_HEADER_SIZE, pos)).payload_len
                    if self._valid_record_after(fd, after, size, seq):
                        raise JournalCorrupt(seg.path.name, pos, str(e)) from None
                    return seq, pos, size - pos
                seq = hdr.seq
                pos += REC_HEADER_SIZE + hdr.payload_len
            return seq, pos, 0
        finally:
            os.close(fd)

    @staticmethod
    def _read_record(fd: int, pos: int, want_seq: int | None) -> tuple[RecordHeader, bytes]:
        hdr = decode_header(os.pread(fd, REC_HEADER_SIZE, pos))
        if want_seq is not None and hdr.seq != want_seq:
            raise FormatError(f"record seq {hdr.seq} where {want_seq} was expected")
        payload = os.pread(fd, hdr.payload_len, pos + REC_HEADER_SIZE) if hdr.payload_len else b""
        check_payload(hdr, payload)
        return hdr, payload

    @staticmethod
    def _valid_record_after(fd: int, pos: int, size: int, seq: int) -> bool:
        """Is there a whole, checksum-valid record later than ``seq`` at or after ``pos``?"""
        if pos >= size:
            return False
        tail = os.pread(fd, size - pos, pos)
        i = tail.find(_MAGIC_BYTES)
        while i >= 0:
            try:
                hdr = decode_header(tail[i:i + REC_HEADER_SIZE])
                start = i + REC_HEADER_SIZE
                check_payload(hdr, tail[start:start + hdr.payload_len])
            except FormatError:
                pass
            else:
                if hdr.seq > seq:
                    return True
            i = tail.find(_MAGIC_BYTES, i + 1)
        return False

    # -- appending -------------------------------------------------------------

    def _new_segment(self, first_seq: int) -> None:
        path = self.dir / segment_name(first_seq)
        tmp = path.with_name(path.name + ".tmp")
        fd = create_file(tmp, os.O_WRONLY | os.O_TRUNC, data=True)
        try:
            os.write(fd, encode_segment_header(self.journal_id, first_seq, time.time_ns()))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(self.dir)
        with self._lock:
            self.segments.append(Segment(path, first_seq))

    def _preallocate(self, fd: int | None = None) -> None:
        """Reserve a segment's blocks (file size unchanged): an append that extends a
        file into unallocated blocks costs several times a plain write, and a reserved
        journal keeps accepting records when the disk fills up.  Best effort: on failure
        (a full disk) any partial reservation is given back and appends allocate."""
        fd = self.fd if fd is None else fd
        try:
            fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, self.segment_bytes)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, os.fstat(fd).st_size)

    def prepare_spare(self) -> None:
        """Create and preallocate the file the next rotation will use (any thread).
        No fsync here: the next sync() after the rotation makes it durable."""
        with self._lock:
            if self._spares or self.fd < 0:
                return
        path = self.dir / f"{_SPARE_PREFIX}{os.getpid()}-{next(self._spare_ids)}.tmp"
        fd = create_file(path, os.O_RDWR | os.O_EXCL, data=True)
        self._preallocate(fd)
        self._adopt_spare(fd, path)

    def _rotate(self) -> None:
        """Seal the active segment and continue in a new one.  On the request path:
        with a spare ready this is a header write and a rename, no fsync."""
        if self.on_rotate is not None:
            self.on_rotate()
        self._cut_stale_tail()
        with self._lock:
            self._unsynced.append((self.segments[-1].first_seq, self.fd))
        first = self.next_seq
        with self._lock:
            spare = self._spares.pop() if self._spares else None
        if spare is None:
            self._new_segment(first)
            self.fd = os.open(self.segments[-1].path, os.O_RDWR)
            self._preallocate()
        else:
            fd, tmp = spare
            path = self.dir / segment_name(first)
            os.pwrite(fd, encode_segment_header(self.journal_id, first, time.time_ns()), 0)
            os.rename(tmp, path)
            self._dir_unsynced = True
            with self._lock:
                self.segments.append(Segment(path, first))
            self.fd = fd
        self.pos = SEG_HEADER_SIZE

    def append(self, op: int, flags: int, offset: int, length: int,
               payload: bytes | memoryview = b"",
               alongside: Callable[[], None] | None = None) -> int:
        """Append one record; return its sequence number.  On error nothing is kept.

        ``alongside`` (the store write of this change) runs before the record becomes
        valid: if it raises, nothing is appended and its error propagates.  For a large
        payload the payload is written by the writer thread meanwhile, and the header,
        which makes the record valid (magic, seq, CRCs), is written last, once both
        copies are in: a reader or a crash meanwhile sees a torn tail, never a record
        of a store write that failed."""
        plen = len(payload)
        if self.pos + REC_HEADER_SIZE + plen > self.segment_bytes and self.pos > SEG_HEADER_SIZE:
            self._rotate()
        if alongside is not None and plen >= PARALLEL_MIN:
            return self._append_parallel(op, flags, offset, length, payload, alongside)
        if alongside is not None:
            alongside()
        seq = self.next_seq
        hdr = encode_header(seq, op, flags, self.volume, offset, length, plen,
                            crc32c(payload) if plen else 0)
        want = REC_HEADER_SIZE + plen
        try:
            if want > FOLIO_CHUNK:
                # In folio-sized pieces: the payload, then the header that makes it valid.
                _pwrite_all(self.fd, payload, self.pos + REC_HEADER_SIZE)
                _pwrite_all(self.fd, hdr, self.pos)
            elif (n := os.pwritev(self.fd, [hdr, payload] if plen else [hdr], self.pos)
                  ) != want:
                # A partial append (disk full part way): let the kernel say why.
                rest = (hdr + bytes(payload))[n:]
                os.pwrite(self.fd, rest, self.pos + n)
                raise OSError(28, "No space left on device (short journal append)")
        except OSError:
            self._cut(self.pos)
            raise
        self.pos += want
        self.next_seq = seq + 1
        return seq

    def _append_parallel(self, op: int, flags: int, offset: int, length: int,
                         payload: bytes | memoryview, alongside: Callable[[], None]) -> int:
        pos, seq, plen = self.pos, self.next_seq, len(payload)
        self._writer.start(self.fd, payload, pos + REC_HEADER_SIZE)
        try:
            alongside()
        except BaseException:
            # Nothing may use the payload after we return: wait for the writer first.
            with contextlib.suppress(Exception):
                self._writer.result()
            self._cut(pos)
            raise
        try:
            crc = self._writer.result()
            _pwrite_all(self.fd, encode_header(seq, op, flags, self.volume, offset, length,
                                               plen, crc), pos)
        except OSError:
            self._cut(pos)
            raise
        self.pos = pos + REC_HEADER_SIZE + plen
        self.next_seq = seq + 1
        return seq

    def _cut(self, pos: int) -> None:
        """Drop everything from ``pos`` on in the active segment (undo a failed append)."""
        # Truncating only frees space; if even that fails the bytes past pos are a torn
        # tail that the next open cuts.  Appends continue from pos either way.
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, pos)
        self.pos = pos

    def _cut_stale_tail(self) -> None:
        """A recycled segment holds old bytes past the last record: a sealed or cleanly
        closed segment must end exactly at its last record (readers rely on it)."""
        if os.fstat(self.fd).st_size > self.pos:
            os.ftruncate(self.fd, self.pos)

    def sync(self) -> None:
        """Make every appended record durable (sealed segments first)."""
        with self._sync_lock:
            if self.sync_error is not None:
                err, self.sync_error = self.sync_error, None
                raise err
            self._sync_locked()

    def sync_ahead(self, through: int) -> None:
        """From a thread other than the appender's (a write waiting for its sync peers):
        make the journal durable through ``through``, unless it is already or a sync is
        under way (then return at once), so that the FLUSH that usually follows finds
        nothing to do.  An error is kept for the next sync() to raise, as if that sync
        had met it."""
        if self.synced_seq >= through or not self._sync_lock.acquire(blocking=False):
            return
        try:
            if self.fd >= 0 and self.sync_error is None:
                self._sync_locked()
        except OSError as e:
            self.sync_error = e
        finally:
            self._sync_lock.release()

    def _sync_locked(self) -> None:
        """sync() with _sync_lock held.  The records to make durable are fixed first,
        under _lock, with the files holding them: appends (and rotations) may go on
        meanwhile in another thread; no file is closed while _sync_lock is held."""
        with self._lock:
            through, active, sealed = self.last_seq, self.fd, list(self._unsynced)
        if self.sync_delay:
            time.sleep(self.sync_delay)
        for _first, fd in sealed:
            os.fdatasync(fd)
        os.fdatasync(active)
        if self._dir_unsynced:
            self._dir_unsynced = False
            fsync_dir(self.dir)
        with self._lock:
            for item in sealed:
                if item in self._unsynced:
                    self._unsynced.remove(item)
                    os.close(item[1])
        self.synced_seq = max(self.synced_seq, through)

    @property
    def last_seq(self) -> int:
        return self.next_seq - 1

    def seal_for_close(self) -> None:
        """Before a clean close: the active segment ends at its last record."""
        if self.fd >= 0:
            self._cut_stale_tail()

    def close(self) -> None:
        self._writer.stop()
        with self._sync_lock:  # after a sync_ahead under way: it uses these files
            self._close_files()

    def _close_files(self) -> None:
        for _first, fd in self._unsynced:
            os.close(fd)
        self._unsynced.clear()
        with self._lock:
            spares, self._spares = self._spares, []
        for fd, path in spares:
            os.close(fd)
            path.unlink(missing_ok=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- reading and releasing -------------------------------------------------

    def records(self, from_seq: int) -> Iterator[tuple[RecordHeader, bytes]]:
        """Yield every record with seq >= from_seq, in order, checking each one."""
        segs = self.segments or self._list()
        for i, seg in enumerate(segs):
            nxt = segs[i + 1].first_seq if i + 1 < len(segs) else None
            if nxt is not None and nxt <= from_seq:
                continue
            self._check_segment_header(seg)
            fd = os.open(seg.path, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                pos = SEG_HEADER_SIZE
                seq = seg.first_seq
                while pos < size and (nxt is None or seq < nxt):
                    if seg is segs[-1] and self.fd >= 0 and pos >= self.pos:
                        break
                    try:
                        hdr, payload = self._read_record(fd, pos, seq)
                    except FormatError as e:
                        raise JournalCorrupt(seg.path.name, pos, str(e)) from None
                    if hdr.seq >= from_seq:
                        yield hdr, payload
                    pos += REC_HEADER_SIZE + hdr.payload_len
                    seq += 1
                if nxt is not None and seq != nxt:
                    raise JournalCorrupt(seg.path.name, pos,
                                         f"segment ends at seq {seq - 1}, next begins at {nxt}")
            finally:
                os.close(fd)

    def truncate_after(self, seq: int) -> int:
        """Drop every record after ``seq`` (a replica's uncommitted tail); return the
        number of records dropped.  Only while opened, before any append."""
        if seq >= self.last_seq:
            return 0
        dropped = self.last_seq - seq
        self.synced_seq = min(self.synced_seq, seq)  # the seqs after it will name others
        keep = [s for s in self.segments if s.first_seq <= seq + 1]
        for seg in self.segments[len(keep):]:
            seg.path.unlink()
        seg = keep[-1]
        fd = os.open(seg.path, os.O_RDWR)
        pos, cur = SEG_HEADER_SIZE, seg.first_seq
        while cur <= seq:
            hdr, _ = self._read_record(fd, pos, cur)
            pos += REC_HEADER_SIZE + hdr.payload_len
            cur += 1
        os.ftruncate(fd, pos)
        os.fsync(fd)
        for _first, old in self._unsynced:
            os.close(old)
        self._unsynced.clear()
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.pos, self.next_seq, self.segments = fd, pos, seq + 1, keep
        self._preallocate()
        fsync_dir(self.dir)
        return dropped

    def sealed(self) -> list[tuple[Segment, int]]:
        """The sealed segments, oldest first, each with the seq of its last record."""
        with self._lock:
            segs = list(self.segments)
        return [(seg, nxt.first_seq - 1) for seg, nxt in itertools.pairwise(segs)]

    def retained_bytes(self) -> int:
        """Bytes in the segments still held.  Safe against the checkpoint thread: a
        segment it releases meanwhile counts as nothing."""
        with self._lock:
            sealed = self.segments[:-1]
        total = self.pos
        for seg in sealed:
            with contextlib.suppress(FileNotFoundError):
                total += seg.path.stat().st_size
        return total

    def release_through(self, seq: int) -> int:
        """Release sealed segments whose records all have seq <= ``seq``; return bytes
        freed.  The caller has made those records durable elsewhere (the store, at a
        checkpoint), so a released segment that no FLUSH synced yet is closed, not
        synced.  Released segments become spares up to SPARE_POOL (recycling, as
        databases do with their WAL): their pages are allocated and often still cached,
        so appends overwrite them instead of allocating new ones (several times
        cheaper here than writing fresh pages: bench/datapath)."""
        freed = 0
        while True:
            with self._sync_lock, self._lock:  # not while sync() fdatasyncs one of these
                if len(self.segments) < 2 or self.segments[1].first_seq - 1 > seq:
                    break
                seg = self.segments.pop(0)
                recycle = len(self._spares) < SPARE_POOL and self.fd >= 0
                for first, fd in [u for u in self._unsynced if u[0] == seg.first_seq]:
                    self._unsynced.remove((first, fd))
                    os.close(fd)
            freed += seg.path.stat().st_size
            if recycle:
                tmp = self.dir / f"{_SPARE_PREFIX}{os.getpid()}-{next(self._spare_ids)}.tmp"
                os.rename(seg.path, tmp)
                self._adopt_spare(os.open(tmp, os.O_RDWR), tmp)
            else:
                seg.path.unlink()
        if freed:
            fsync_dir(self.dir)
        return freed

    def _adopt_spare(self, fd: int, path: Path) -> None:
        with self._lock:
            if len(self._spares) < SPARE_POOL:
                self._spares.append((fd, path))
                return
        os.close(fd)
        path.unlink()


def is_data_op(op: Op) -> bool:
    return op in (Op.WRITE, Op.TRIM, Op.ZERO)


def record_headers(path: Path, first_seq: int, through_seq: int) -> Iterator[RecordHeader]:
    """The headers of a segment's records ``first_seq..through_seq``, payloads skipped
    (each header is checked by its own CRC; the data is not read).  Raises FormatError if
    the segment ends or holds a bad header before ``through_seq``, and FileNotFoundError
    if it is gone (released meanwhile): callers that need every extent touched treat
    both as "unknown", never as "nothing"."""
    fd = os.open(path, os.O_RDONLY)
    try:
        hdr_seg = decode_segment_header(os.pread(fd, SEG_HEADER_SIZE, 0))
        if hdr_seg.first_seq != first_seq:
            raise FormatError(f"{path.name}: begins at seq {hdr_seg.first_seq}, not {first_seq}")
        pos, seq = SEG_HEADER_SIZE, first_seq
        while seq <= through_seq:
            hdr = decode_header(os.pread(fd, REC_HEADER_SIZE, pos))
            if hdr.seq != seq:
                raise FormatError(f"{path.name}: record seq {hdr.seq} where {seq} was expected")
            yield hdr
            pos += REC_HEADER_SIZE + hdr.payload_len
            seq += 1
    finally:
        os.close(fd)


def sync_delays_for_tests(text: str) -> dict[str, float]:
    """NBDGW_TEST_SYNC_DELAY="VOLUME=SECONDS,...": the test hook that makes each journal
    sync of those volumes take that much longer (``Journal.sync_delay``; read by the
    nbdkit plugin for primaries, by the receiver for replicas)."""
    out = {}
    for item in filter(None, text.split(",")):
        name, _, secs = item.partition("=")
        out[name] = float(secs)
    return out


class JournalTail:
    """Follows a journal that another process is appending to (the replication view).

    ``read(from_seq)`` returns the complete records from ``from_seq`` on, as many as fit
    in ``max_bytes``, and an empty list when nothing new is there yet.  A record that is
    incomplete at the end of the active segment is "not yet written"; if it stays bad
    while a valid record follows it, or a sealed segment holds a bad record, that is
    corruption (JournalCorrupt).  Asking for records already released raises JournalGap.
    Keeps a cursor, so following the journal costs one read per record.
    """

    STUCK_SECONDS = 2.0

    def __init__(self, directory: Path, journal_id: bytes) -> None:
        self.dir = directory
        self.journal_id = journal_id
        self._reader = Journal(directory, journal_id)
        self._seg: Segment | None = None
        self._fd = -1
        self._pos = 0
        self._next = -1
        self._stuck_at: tuple[int, int] | None = None
        self._stuck_since = 0.0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _segments(self) -> list[Segment]:
        return self._reader._list()

    def _open_segment(self, seg: Segment) -> None:
        self._reader._check_segment_header(seg)
        self.close()
        self._fd = os.open(seg.path, os.O_RDONLY)
        self._seg = seg
        self._pos = SEG_HEADER_SIZE
        self._next = seg.first_seq

    def _seek(self, seq: int) -> None:
        segs = self._segments()
        if not segs:
            raise FormatError(f"journal {self.dir}: no segment files")
        if seq < segs[0].first_seq:
            raise JournalGap(seq, segs[0].first_seq)
        seg = [s for s in segs if s.first_seq <= seq][-1]
        self._open_segment(seg)
        while self._next < seq:
            if self._read_one(sealed=seg is not segs[-1]) is None:
                raise ValueError(f"seq {seq} is beyond the end of journal {self.dir}")

    def _read_one(self, sealed: bool) -> tuple[RecordHeader, bytes] | None:
        assert self._seg is not None
        try:
            hdr, payload = Journal._read_record(self._fd, self._pos, self._next)
        except FormatError as e:
            size = os.fstat(self._fd).st_size
            if self._pos >= size:
                return None  # clean end of what is written so far
            if sealed:
                if not self._seg.path.exists():
                    # Released (and recycled) while we read it: the records are gone.
                    raise JournalGap(self._next, self._first_retained()) from None
                raise JournalCorrupt(self._seg.path.name, self._pos, str(e)) from None
            self._check_stuck(size, e)
            return None
        self._stuck_at = None
        self._pos += REC_HEADER_SIZE + hdr.payload_len
        self._next += 1
        return hdr, payload

    def _check_stuck(self, size: int, err: FormatError) -> None:
        """A bad record at the tail is normal for a moment (an append in progress);
        if it stays bad while a valid record lies after it, it is corruption."""
        assert self._seg is not None
        where = (self._seg.first_seq, self._pos)
        now = time.monotonic()
        if self._stuck_at != where:
            self._stuck_at, self._stuck_since = where, now
            return
        if now - self._stuck_since < self.STUCK_SECONDS:
            return
        if not self._seg.path.exists():
            raise JournalGap(self._next, self._first_retained())
        # A recycled active segment has old records past the end: those are older than
        # anything we read, so only a newer valid record proves corruption.  Scanned at
        # most once per STUCK_SECONDS.
        self._stuck_since = now
        if Journal._valid_record_after(self._fd, self._pos + 1, size, self._next - 1):
            raise JournalCorrupt(self._seg.path.name, self._pos, str(err))

    def _first_retained(self) -> int:
        segs = self._segments()
        return segs[0].first_seq if segs else self._next

    def _from_later_segment(self) -> tuple[RecordHeader, bytes] | None:
        """At the end of the current segment: the next record, if a later segment
        exists (the writer creates it only after the last record here was written)."""
        assert self._seg is not None
        later = [s for s in self._segments() if s.first_seq > self._seg.first_seq]
        if not later:
            return None
        rec = self._read_one(sealed=True)  # completed while we looked: still this segment
        if rec is not None:
            return rec
        nxt = later[0]
        if nxt.first_seq != self._next:
            raise JournalCorrupt(nxt.path.name, 0,
                                 f"segment begins at seq {nxt.first_seq}, expected {self._next}")
        self._open_segment(nxt)
        return self._read_one(sealed=len(later) > 1)

    def read(self, from_seq: int, max_bytes: int = 8 << 20, through: int | None = None
             ) -> list[tuple[RecordHeader, bytes]]:
        """Complete records from ``from_seq`` on (at least one if any is there); with
        ``through``, none past it.  Reading up to a record known to be written (a sync
        waiter's) then stops there, without probing the end of the journal (a failed
        read and a listing of the segments: a third of a small step's cost)."""
        if self._fd < 0 or from_seq != self._next:
            self._seek(from_seq)
        out: list[tuple[RecordHeader, bytes]] = []
        total = 0
        while total < max_bytes and (through is None or self._next <= through):
            rec = self._read_one(sealed=False) or self._from_later_segment()
            if rec is None:
                break
            out.append(rec)
            total += REC_HEADER_SIZE + rec[0].payload_len
        return out
