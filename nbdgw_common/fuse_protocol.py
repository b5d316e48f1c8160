"""The kernel's FUSE protocol for one file: a directory holding a single file whose bytes
are a ``Backend``'s, spoken on a /dev/fuse descriptor by worker threads.

Two servers use it: nbdgw-fuse (iscsi_bridge/fused.py, a libnbd handle per worker) and
the volume's own nbdkit (nbd_plugin/fusefile.py, the volume itself).  See fused.py for
why it exists (parallel direct writes) and which requests it answers.  No mount, no
process: bytes in, bytes out, and the request loop.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

# Opcodes (linux/fuse.h).
LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
OPEN, READ, WRITE, STATFS, RELEASE, FSYNC, FLUSH, INIT = 14, 15, 16, 17, 18, 20, 25, 26
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR = 27, 28, 29, 30
INTERRUPT, DESTROY, BATCH_FORGET, FALLOCATE = 36, 38, 42, 43
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})

IN_HDR = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, extlen, pad
OUT_HDR = struct.Struct("<IiQ")  # len, error (-errno), unique
# ino, size, blocks, a/m/ctime, their nsecs, mode, nlink, uid, gid, rdev, blksize, flags
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ATTR_OUT = struct.Struct("<QII")  # attr_valid, attr_valid_nsec, dummy; then ATTR
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid, generation, entry/attr valid, nsecs; ATTR
INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags
# major, minor, max_readahead, flags, max_background, congestion_threshold, max_write,
# time_gran, max_pages, map_alignment, flags2, max_stack_depth, unused
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
OPEN_IN = struct.Struct("<II")  # flags, open_flags
OPEN_OUT = struct.Struct("<QIi")  # fh, open_flags, backing_id
RW_IN = struct.Struct("<QQII")  # fh, offset, size, flags (fuse_read_in / fuse_write_in prefix)
RW_IN_SIZE = 40
WRITE_OUT = struct.Struct("<II")
SETATTR_IN = struct.Struct("<IIQQ")  # valid, padding, fh, size
FALLOCATE_IN = struct.Struct("<QQQI")  # fh, offset, length, mode
KSTATFS = struct.Struct("<QQQQQIIII24x")
DIRENT = struct.Struct("<QQII")  # ino, off, namelen, type

FUSE_ASYNC_READ, FUSE_BIG_WRITES, FUSE_ASYNC_DIO, FUSE_MAX_PAGES = 1 << 0, 1 << 5, 1 << 15, 1 << 22
FOPEN_DIRECT_IO, FOPEN_PARALLEL_DIRECT_WRITES = 1 << 0, 1 << 6
FATTR_SIZE = 1 << 3
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10

KERNEL_MAJOR = 7
OUR_MINOR = 38  # the newest protocol whose messages this file handles
MAX_WRITE = 1 << 20
READ_BUFFER = MAX_WRITE + 64 * 1024  # a WRITE request: headers + up to MAX_WRITE of data
ROOT, FILE = 1, 2  # node ids
VALID = 3600  # seconds the kernel may cache names and attributes (nothing changes)


class Backend(Protocol):
    """Where the file's bytes are: a libnbd handle (its method names), or the volume
    itself inside nbdkit (nbd_plugin/fusefile.py).  Failures raise an exception with an
    ``errno`` attribute (OSError, nbd.Error); anything else is an I/O error."""

    def get_size(self) -> int: ...
    def pread(self, count: int, offset: int) -> bytes | bytearray | memoryview: ...
    def pwrite(self, buf: bytes | memoryview, offset: int) -> None: ...
    def flush(self) -> None: ...
    def trim(self, count: int, offset: int) -> None: ...
    def zero(self, count: int, offset: int) -> None: ...



class Server:
    """The file system: one directory holding one file of the export's size."""

    def __init__(self, handles: Sequence[Backend], name: str, read_only: bool) -> None:
        self.name = name.encode()
        self.read_only = read_only
        self.handles = handles  # one per worker thread
        self.size = handles[0].get_size()
        self.stopping = threading.Event()
        self.fd = -1
        self._ops: dict[int, Callable[[Backend, int, memoryview], bytes]] = {
            FSYNC: self._fsync, FSYNCDIR: self._fsync, GETATTR: self._getattr,
            LOOKUP: self._lookup, OPEN: self._open, FLUSH: _nothing, RELEASE: _nothing,
            RELEASEDIR: _nothing, DESTROY: _nothing, FALLOCATE: self._fallocate,
            SETATTR: self._setattr, OPENDIR: _opendir, READDIR: self._readdir,
            STATFS: self._statfs, INIT: self._init}

    def handle(self, h: Backend, op: int, node: int, arg: bytes | memoryview
               ) -> tuple[int, bytes | bytearray | memoryview]:
        """One request's (errno or 0, reply body): what a worker writes back."""
        try:
            return 0, self._handle(h, op, node, memoryview(arg))
        except Exception as e:  # noqa: BLE001 - a worker that died would leave requests unanswered
            err = getattr(e, "errno", None)  # OSError, nbd.Error
            if not isinstance(err, int) or err <= 0:
                print(f"nbdgw-fuse: request {op} failed: {e!r}", file=sys.stderr, flush=True)
                return errno.EIO, b""
            return err, b""

    # -- attributes ----------------------------------------------------------------

    def _attr(self, node: int) -> bytes:
        if node == ROOT:
            return ATTR.pack(ROOT, 0, 0, 0, 0, 0, 0, 0, 0, stat.S_IFDIR | 0o755, 2, 0, 0, 0,
                             4096, 0)
        mode = stat.S_IFREG | (0o400 if self.read_only else 0o600)
        return ATTR.pack(FILE, self.size, (self.size + 511) // 512, 0, 0, 0, 0, 0, 0, mode,
                         1, 0, 0, 0, 4096, 0)

    def _attr_out(self, node: int) -> bytes:
        return ATTR_OUT.pack(VALID, 0, 0) + self._attr(node)

    # -- the request loop ----------------------------------------------------------

    def serve(self, fd: int) -> list[threading.Thread]:
        self.fd = fd
        threads = [threading.Thread(target=self._worker, args=(h,), name=f"fuse-{i}",
                                    daemon=True) for i, h in enumerate(self.handles)]
        for t in threads:
            t.start()
        return threads

    def _worker(self, h: Backend) -> None:
        buf = bytearray(READ_BUFFER)  # one per thread, reused: no allocation per request
        view = memoryview(buf)
        while not self.stopping.is_set():
            try:
                n = os.readv(self.fd, [buf])
            except OSError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue  # ENOENT: the request was interrupted before we read it
                if e.errno != errno.ENODEV:  # ENODEV: unmounted
                    print(f"nbdgw-fuse: reading /dev/fuse: {e}", file=sys.stderr, flush=True)
                break
            _len, opcode, unique, node, _u, _g, _p, _x, _pad = IN_HDR.unpack_from(buf)
            if opcode in NO_REPLY:
                continue
            err, body = self.handle(h, opcode, node, view[IN_HDR.size:n])
            self._reply(unique, err, body)
            if opcode == DESTROY:
                break
        self.stopping.set()

    def _reply(self, unique: int, err: int, body: bytes | bytearray | memoryview) -> None:
        head = OUT_HDR.pack(OUT_HDR.size + (0 if err else len(body)), -err, unique)
        try:
            if err or not body:
                os.write(self.fd, head)
            else:
                os.writev(self.fd, [head, body])
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV):  # interrupted / unmounted
                print(f"nbdgw-fuse: reply: {e}", file=sys.stderr, flush=True)

    def _handle(self, h: Backend, op: int, node: int, arg: memoryview
                ) -> bytes | bytearray | memoryview:
        if op == WRITE:  # the two that carry data first
            _fh, offset, size, _flags = RW_IN.unpack_from(arg)
            self._check(offset, size)
            h.pwrite(arg[RW_IN_SIZE:RW_IN_SIZE + size], offset)
            return WRITE_OUT.pack(size, 0)
        if op == READ:
            _fh, offset, size, _flags = RW_IN.unpack_from(arg)
            size = max(0, min(size, self.size - offset))
            return h.pread(size, offset) if size else b""
        fn = self._ops.get(op)
        if fn is None:
            raise OSError(errno.ENOSYS, "not implemented")
        return fn(h, node, arg)

    def _fsync(self, h: Backend, _node: int, _arg: memoryview) -> bytes:
        if not self.read_only:
            h.flush()
        return b""

    def _getattr(self, _h: Backend, node: int, _arg: memoryview) -> bytes:
        return self._attr_out(node)

    def _lookup(self, _h: Backend, node: int, arg: memoryview) -> bytes:
        name = bytes(arg).split(b"\0", 1)[0]
        if node != ROOT or name != self.name:
            raise OSError(errno.ENOENT, "no such file")
        return ENTRY_OUT.pack(FILE, 0, VALID, VALID, 0, 0) + self._attr(FILE)

    def _open(self, _h: Backend, _node: int, arg: memoryview) -> bytes:
        flags, _ = OPEN_IN.unpack_from(arg)
        if self.read_only and flags & os.O_ACCMODE != os.O_RDONLY:
            raise OSError(errno.EROFS, "read-only export")
        return OPEN_OUT.pack(0, FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES, 0)

    def _setattr(self, _h: Backend, node: int, arg: memoryview) -> bytes:
        valid, _pad, _fh, size = SETATTR_IN.unpack_from(arg)
        if valid & FATTR_SIZE and size != self.size:
            raise OSError(errno.EPERM, "the export's size is fixed")
        return self._attr_out(node)

    def _statfs(self, _h: Backend, _node: int, _arg: memoryview) -> bytes:
        blocks = (self.size + 4095) // 4096
        return KSTATFS.pack(blocks, 0, 0, 2, 0, 4096, 255, 4096, 0)

    def _check(self, offset: int, size: int) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only export")
        if offset + size > self.size:
            raise OSError(errno.ENOSPC, "past the end of the export")

    def _fallocate(self, h: Backend, _node: int, arg: memoryview) -> bytes:
        _fh, offset, length, mode = FALLOCATE_IN.unpack_from(arg)
        length = min(length, max(0, self.size - offset))
        if mode & FALLOC_FL_PUNCH_HOLE:
            self._check(offset, length)
            if length:
                h.trim(length, offset)
        elif mode & FALLOC_FL_ZERO_RANGE:
            self._check(offset, length)
            if length:
                h.zero(length, offset)
        elif mode & ~FALLOC_FL_KEEP_SIZE:
            raise OSError(errno.EOPNOTSUPP, "unsupported fallocate mode")
        return b""  # plain allocation: every byte of the export exists already

    def _readdir(self, _h: Backend, _node: int, arg: memoryview) -> bytes:
        _fh, offset, size, _flags = RW_IN.unpack_from(arg)
        entries = [(ROOT, b".", stat.S_IFDIR), (ROOT, b"..", stat.S_IFDIR),
                   (FILE, self.name, stat.S_IFREG)]
        out = b""
        for i, (ino, name, mode) in enumerate(entries[offset:], start=offset + 1):
            ent = DIRENT.pack(ino, i, len(name), mode >> 12) + name
            ent += bytes(-len(ent) % 8)
            if len(out) + len(ent) > size:
                break
            out += ent
        return out

    def _init(self, _h: Backend, _node: int, arg: memoryview) -> bytes:
        major, minor, max_readahead, flags = INIT_IN.unpack_from(arg)
        if major != KERNEL_MAJOR:
            raise OSError(errno.EPROTO, f"FUSE protocol {major}.{minor} (want 7.x)")
        want = flags & (FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO | FUSE_MAX_PAGES)
        return INIT_OUT.pack(KERNEL_MAJOR, min(minor, OUR_MINOR), max_readahead, want,
                             16, 12, MAX_WRITE, 1, MAX_WRITE // 4096, 0, 0, 0)


def _nothing(_h: Backend, _node: int, _arg: memoryview) -> bytes:
    return b""


def _opendir(_h: Backend, _node: int, _arg: memoryview) -> bytes:
    return OPEN_OUT.pack(0, 0, 0)
