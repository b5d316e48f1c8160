"""The FUSE protocol nbdgw-fuse and nbdkit speak (nbdgw_common/fuse_protocol.py), request
bytes in, reply bytes out, over an in-memory stand-in for a libnbd handle.  The real
server, mounted, is in tests/integration/test_fuse_server.py."""

from __future__ import annotations

import errno
import os
import stat
import struct

import pytest

from nbdgw_common import fuse_protocol as F

SIZE = 1 << 20


class MemNBD:
    """The libnbd calls nbdgw-fuse makes, on a bytearray (with a call log)."""

    def __init__(self, size: int = SIZE) -> None:
        self.data = bytearray(size)
        self.calls: list[tuple[object, ...]] = []

    def get_size(self) -> int:
        return len(self.data)

    def pread(self, n: int, off: int) -> bytes:
        self.calls.append(("pread", n, off))
        return bytes(self.data[off:off + n])

    def pwrite(self, buf: bytes | memoryview, off: int) -> None:
        self.calls.append(("pwrite", len(buf), off))
        self.data[off:off + len(buf)] = buf

    def flush(self) -> None:
        self.calls.append(("flush",))

    def trim(self, n: int, off: int) -> None:
        self.calls.append(("trim", n, off))
        self.data[off:off + n] = bytes(n)

    def zero(self, n: int, off: int) -> None:
        self.calls.append(("zero", n, off))
        self.data[off:off + n] = bytes(n)


def server(read_only: bool = False) -> tuple[F.Server, MemNBD]:
    h = MemNBD()
    return F.Server([h], "disk", read_only), h


def rw_in(offset: int, size: int) -> bytes:
    return F.RW_IN.pack(0, offset, size, 0) + bytes(F.RW_IN_SIZE - F.RW_IN.size)


def test_init_negotiates_what_both_sides_have() -> None:
    s, h = server()
    offered = F.FUSE_ASYNC_READ | F.FUSE_MAX_PAGES | F.FUSE_ASYNC_DIO | (1 << 12)
    err, body = s.handle(h, F.INIT, 0, F.INIT_IN.pack(7, 41, 131072, offered) + bytes(48))
    assert err == 0 and len(body) == 64
    major, minor, _ra, flags, _bg, _ct, max_write, _tg, max_pages, *_ = F.INIT_OUT.unpack(body)
    assert (major, minor) == (7, F.OUR_MINOR)  # the older of the two
    assert flags == F.FUSE_ASYNC_READ | F.FUSE_MAX_PAGES | F.FUSE_ASYNC_DIO  # not bit 12
    assert (max_write, max_pages) == (F.MAX_WRITE, F.MAX_WRITE // 4096)
    err, _ = s.handle(h, F.INIT, 0, F.INIT_IN.pack(8, 0, 0, 0))
    assert err == errno.EPROTO


def test_open_asks_for_direct_and_parallel_writes() -> None:
    s, h = server()
    err, body = s.handle(h, F.OPEN, F.FILE, F.OPEN_IN.pack(os.O_RDWR, 0))
    assert err == 0
    _fh, flags, _ = F.OPEN_OUT.unpack(body)
    assert flags == F.FOPEN_DIRECT_IO | F.FOPEN_PARALLEL_DIRECT_WRITES
    ro, h = server(read_only=True)
    assert ro.handle(h, F.OPEN, F.FILE, F.OPEN_IN.pack(os.O_RDWR, 0))[0] == errno.EROFS
    assert ro.handle(h, F.OPEN, F.FILE, F.OPEN_IN.pack(os.O_RDONLY, 0))[0] == 0


def test_lookup_and_attributes() -> None:
    s, h = server()
    err, body = s.handle(h, F.LOOKUP, F.ROOT, b"disk\0")
    assert err == 0
    node = struct.unpack_from("<Q", body)[0]
    attr = F.ATTR.unpack_from(body, F.ENTRY_OUT.size)
    assert node == F.FILE and attr[1] == SIZE and stat.S_ISREG(attr[9])
    assert s.handle(h, F.LOOKUP, F.ROOT, b"other\0")[0] == errno.ENOENT
    assert s.handle(h, F.LOOKUP, F.FILE, b"disk\0")[0] == errno.ENOENT
    err, body = s.handle(h, F.GETATTR, F.ROOT, bytes(16))
    assert stat.S_ISDIR(F.ATTR.unpack_from(body, F.ATTR_OUT.size)[9])
    truncate = F.SETATTR_IN.pack(F.FATTR_SIZE, 0, 0, 4096) + bytes(64)
    assert s.handle(h, F.SETATTR, F.FILE, truncate)[0] == errno.EPERM
    same = F.SETATTR_IN.pack(F.FATTR_SIZE, 0, 0, SIZE) + bytes(64)
    assert s.handle(h, F.SETATTR, F.FILE, same)[0] == 0


def test_read_write_and_their_bounds() -> None:
    s, h = server()
    payload = os.urandom(8192)
    err, body = s.handle(h, F.WRITE, F.FILE, rw_in(4096, 8192) + payload)
    assert err == 0 and F.WRITE_OUT.unpack(body) == (8192, 0)
    assert bytes(h.data[4096:12288]) == payload
    assert bytes(s.handle(h, F.READ, F.FILE, rw_in(4096, 8192))[1]) == payload
    # Reads stop at the end of the export; writes past it are refused whole.
    assert len(s.handle(h, F.READ, F.FILE, rw_in(SIZE - 100, 4096))[1]) == 100
    assert s.handle(h, F.READ, F.FILE, rw_in(SIZE, 4096))[1] == b""
    before = len(h.calls)
    err, _ = s.handle(h, F.WRITE, F.FILE, rw_in(SIZE - 4096, 8192) + bytes(8192))
    assert err == errno.ENOSPC and len(h.calls) == before
    assert s.handle(h, F.FSYNC, F.FILE, bytes(16)) == (0, b"")
    assert h.calls[-1] == ("flush",)


def test_read_only_refuses_changes() -> None:
    s, h = server(read_only=True)
    assert s.handle(h, F.WRITE, F.FILE, rw_in(0, 4096) + bytes(4096))[0] == errno.EROFS
    punch = F.FALLOCATE_IN.pack(0, 0, 4096, F.FALLOC_FL_PUNCH_HOLE | F.FALLOC_FL_KEEP_SIZE)
    assert s.handle(h, F.FALLOCATE, F.FILE, punch + bytes(4))[0] == errno.EROFS
    assert s.handle(h, F.FSYNC, F.FILE, bytes(16)) == (0, b"")
    assert h.calls == []


def test_fallocate_modes() -> None:
    s, h = server()
    h.data[:] = b"\xff" * SIZE

    def falloc(off: int, n: int, mode: int) -> int:
        return s.handle(h, F.FALLOCATE, F.FILE, F.FALLOCATE_IN.pack(0, off, n, mode) + bytes(4))[0]

    assert falloc(0, 4096, F.FALLOC_FL_PUNCH_HOLE | F.FALLOC_FL_KEEP_SIZE) == 0
    assert falloc(8192, 4096, F.FALLOC_FL_ZERO_RANGE) == 0
    assert falloc(0, SIZE, 0) == 0  # plain allocation: nothing to do
    assert falloc(0, 4096, 0x08) == errno.EOPNOTSUPP  # COLLAPSE_RANGE
    assert h.calls == [("trim", 4096, 0), ("zero", 4096, 8192)]
    assert bytes(h.data[:4096]) == bytes(4096) and h.data[4096] == 0xFF


@pytest.mark.parametrize("offset", [0, 1, 2, 3])
def test_readdir_pages_by_offset(offset: int) -> None:
    s, h = server()
    err, body = s.handle(h, F.READDIR, F.ROOT, rw_in(offset, 4096))
    assert err == 0
    names, pos = [], 0
    while pos < len(body):
        _ino, _off, namelen, _type = F.DIRENT.unpack_from(body, pos)
        names.append(bytes(body[pos + F.DIRENT.size:pos + F.DIRENT.size + namelen]))
        pos += (F.DIRENT.size + namelen + 7) // 8 * 8
    assert names == [b".", b"..", b"disk"][offset:]
    # A buffer too small for the next entry returns what fits (here: nothing).
    assert s.handle(h, F.READDIR, F.ROOT, rw_in(0, 8))[1] == b""


def test_unknown_requests_are_enosys() -> None:
    s, h = server()
    assert s.handle(h, 39, F.FILE, bytes(64))[0] == errno.ENOSYS  # IOCTL
    assert s.handle(h, 22, F.FILE, bytes(64))[0] == errno.ENOSYS  # GETXATTR


def test_a_malformed_request_is_an_error_not_a_dead_worker() -> None:
    s, h = server()
    assert s.handle(h, F.WRITE, F.FILE, b"\0" * 8) == (errno.EIO, b"")  # header cut short
    assert s.handle(h, F.LOOKUP, F.ROOT, b"disk\0")[0] == 0  # still serving
