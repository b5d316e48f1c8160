"""The volume store: a sparse file (or block device) read and written at offsets.

Every method either does the whole operation or raises OSError: a short write or read
is turned into an error, never returned.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import hashlib
import os

from .record import Flag, Op

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_sync_file_range.restype = ctypes.c_int
SYNC_FILE_RANGE_WRITE = 0x2

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_ZEROS = bytes(1 << 20)

# Large writes go to the page cache in pieces that end at multiples of this, so the
# kernel's page-cache folios stay at most this big.  Linux 6.x (ext4 since 6.16) sizes a
# new folio after the write that creates it: one 1 MiB pwrite makes a 1 MiB folio, and
# every later 4 KiB write into it costs what writing the whole folio's buffer heads
# does, and dirties 1 MiB for writeback instead of 4 KiB.  Smaller folios cost a little
# on reads instead.  Measured here (6.18, ext4, a 1 GiB file filled by 1 MiB writes cut
# into pieces of the folio size, then random 4 KiB preadv and pwrite, per call):
#   folios 1 MiB: read 1.2-1.4 us, write 18-19 us;   256 KiB: read 1.3 us, write 6.4 us;
#   128 KiB: read 1.7 us, write 5.2 us;               64 KiB: read 1.9-2.0 us, write 3.7-4 us.
# Sequential 1 MiB writes run at the same speed with any of them.
FOLIO_CHUNK = 256 * 1024
_FOLIO_MASK = FOLIO_CHUNK - 1


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int,
               what: str = "write") -> None:
    """pwrite all of ``data`` at ``offset`` or raise OSError.

    Writes larger than FOLIO_CHUNK are issued in pieces aligned to FOLIO_CHUNK in the
    file (see above).  A short piece (the disk filled up part way) is retried once so
    that the kernel reports its errno; a second short write is ENOSPC."""
    n = len(data)
    if n <= FOLIO_CHUNK:  # every small write: one syscall, no further call
        done = os.pwrite(fd, data, offset)
        if done != n:
            _write_rest(fd, data, offset, done, what)
        return
    mv = memoryview(data)
    pos = 0
    step = FOLIO_CHUNK - (offset & _FOLIO_MASK)
    while pos < n:
        end = min(pos + step, n)
        piece = mv[pos:end]
        done = os.pwrite(fd, piece, offset + pos)
        if done != end - pos:
            _write_rest(fd, piece, offset + pos, done, what)
        pos, step = end, FOLIO_CHUNK


def _write_rest(fd: int, data: bytes | bytearray | memoryview, offset: int, done: int,
                what: str) -> None:
    """After a short pwrite of ``done`` bytes: the rest once more, for the errno."""
    rest = memoryview(data)[done:]
    if os.pwrite(fd, rest, offset + done) != len(rest):
        raise OSError(errno.ENOSPC, f"No space left on device (short {what} at "
                                    f"{offset + done})")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with flags (os.posix_fallocate cannot punch holes)."""
    if _fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def open_noatime(path: str | os.PathLike[str]) -> int:
    """Open read-only without updating the access time (a reader in another process
    must not dirty the inode the writer syncs), or plainly where that is not allowed
    (O_NOATIME needs the file's owner or CAP_FOWNER)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_NOATIME)
    except PermissionError:
        return os.open(path, os.O_RDONLY)


class Store:
    """A fixed-size byte range on a file descriptor."""

    def __init__(self, path: str, size: int, readonly: bool = False,
                 noatime: bool = False) -> None:
        self.path = path
        self.size = size
        self.fd = open_noatime(path) if noatime else os.open(
            path, os.O_RDONLY if readonly else os.O_RDWR)
        actual = os.fstat(self.fd).st_size
        if actual != size:
            os.close(self.fd)
            raise OSError(errno.EIO, f"store {path} is {actual} bytes, metadata says {size}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def pread_into(self, buf: bytearray | memoryview, offset: int) -> None:
        n = os.preadv(self.fd, [buf], offset)
        if n != len(buf):
            # Only a store truncated behind our back gets here.
            raise OSError(errno.EIO, f"short read from store at {offset}: {n} of {len(buf)}")

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        # A short write to a regular file means the disk filled up part way: the rest
        # is retried once so that the kernel reports the errno (ENOSPC, EIO).
        pwrite_all(self.fd, data, offset, "write to store")

    def punch(self, offset: int, length: int) -> None:
        """Deallocate a range; it reads back as zeros."""
        fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def zero(self, offset: int, length: int, may_trim: bool) -> None:
        """Make a range read back as zeros, deallocating it when allowed."""
        if may_trim:
            try:
                self.punch(offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
        try:
            fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self._write_zeros(offset, length)

    def _write_zeros(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(len(_ZEROS), end - offset)
            self.pwrite(memoryview(_ZEROS)[:n], offset)
            offset += n

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def start_writeback(self) -> None:
        """Start writing the store's dirty pages to the disk without waiting for them
        (sync_file_range SYNC_FILE_RANGE_WRITE; no durability, nothing waits on it).
        Called at each journal rotation, so the checkpoint's fdatasync finds a segment's
        worth of dirty pages, not everything since the last checkpoint: a long fdatasync
        let sustained 1 MiB writes run the journal past its bound, and the request path
        then checkpointed inline (bench/wcost, DESIGN.md §9).  Best effort: an error is
        the next fdatasync's to report."""
        _sync_file_range(self.fd, 0, 0, SYNC_FILE_RANGE_WRITE)

    def apply(self, op: Op, flags: int, offset: int, length: int,
              payload: bytes | memoryview) -> None:
        """Apply one journal record's effect (redo on recovery, and on replicas)."""
        if op is Op.WRITE:
            self.pwrite(payload, offset)
        elif op is Op.TRIM:
            self.punch(offset, length)
        elif op is Op.ZERO:
            self.zero(offset, length, bool(flags & Flag.MAY_TRIM))

    def extents(self, offset: int, count: int) -> list[tuple[int, int, bool]]:
        """Allocated (True) and hole (False) runs covering [offset, offset+count)."""
        end = min(offset + count, self.size)
        out: list[tuple[int, int, bool]] = []
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                data = end  # no data after pos
            data = min(data, end)
            if data > pos:
                out.append((pos, data - pos, False))
                pos = data
                if pos >= end:
                    break
            hole = min(os.lseek(self.fd, pos, os.SEEK_HOLE), end)
            out.append((pos, hole - pos, True))
            pos = hole
        return out


DIGEST_SIZE = 16
_DIGEST_PIECE = 1 << 20


@functools.lru_cache(maxsize=8)
def zeros_digest(length: int) -> bytes:
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    for pos in range(0, length, len(_ZEROS)):
        h.update(memoryview(_ZEROS)[:min(len(_ZEROS), length - pos)])
    return h.digest()


def extent_digest(fd: int, offset: int, length: int, size: int) -> bytes:
    """blake2b-128 of ``length`` bytes at ``offset`` of a store of ``size`` bytes (online
    verify).  Holes are hashed as the zeros they read as, without reading them, so both
    ends get the same digest however sparse each store is."""
    end = min(offset + length, size)
    try:
        first_data = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as e:
        if e.errno != errno.ENXIO:
            raise
        first_data = end
    if first_data >= end:
        return zeros_digest(end - offset)  # all hole: the common case, no hashing
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    pos = offset
    while pos < end:
        try:
            data_at = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            data_at = end  # nothing but a hole up to the end of the file
        data_at = min(data_at, end)
        while pos < data_at:  # a hole: zeros
            n = min(data_at - pos, len(_ZEROS))
            h.update(memoryview(_ZEROS)[:n])
            pos += n
        if pos >= end:
            break
        hole_at = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        while pos < hole_at:
            n = min(hole_at - pos, _DIGEST_PIECE)
            data = os.pread(fd, n, pos)
            if len(data) != n:
                raise OSError(errno.EIO, f"short read at {pos}: {len(data)} of {n} bytes")
            h.update(data)
            pos += n
    return h.digest()
