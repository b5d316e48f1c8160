"""The iSCSI bridge's FUSE file served inside nbdkit (``iscsi.fuse: nbdkit``, the default).

The bridge mounts a FUSE file system for an export (mount(2), as root) and hands the
/dev/fuse descriptor to the nbdkit process serving the volume, over the volume's control
socket (control.py, op ``fuse``, the descriptor as SCM_RIGHTS).  Here WORKERS threads
answer the kernel's requests with nbdgw_common.fuse_protocol (as nbdgw-fuse does), on the volume
itself: a write from tgtd is ``Volume.write`` under the same lock, write lease, journal
and sync gate as an NBD write, counted in the export's I/O counters like one, without
an NBD round trip (no libnbd client, no socket, no second process).

The attachment ends when the file system is unmounted (the workers read ENODEV) or the
kernel sends DESTROY; then the descriptor is closed and the handle released (a snapshot
export counts as in use while mounted, as an NBD connection does).  If nbdkit exits, the
kernel aborts the mount (tgtd sees ENOTCONN) and the bridge mounts afresh on the next
nbdkit.  After ``close_all`` (nbdkit shutting down) every request fails with ESHUTDOWN
and no volume is touched again.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable

import structlog

from nbdgw_common import fuse_protocol

from . import iostats
from .handle import Handle

log = structlog.get_logger(component="nbd_plugin")

WORKERS = 4  # measured (fio, 16 direct writers): 2 gave less, 8 no more than 4
_clock = time.monotonic_ns


class VolumeFile:
    """fuse_protocol.Backend on a connection handle: every call under its volume's lock (the
    WORKERS threads share the handle, so they count under it too)."""

    def __init__(self, h: Handle) -> None:
        self.h = h
        self.lock = h.lock
        self.closed = False  # set under the lock by close(): the volume is off limits

    def _open(self) -> None:
        if self.closed:
            raise OSError(errno.ESHUTDOWN, "nbdkit is shutting down")

    def get_size(self) -> int:
        return self.h.vol.size

    def pread(self, count: int, offset: int) -> bytearray:
        buf = bytearray(count)
        t = _clock()
        with self.lock:
            self._open()
            self.h.vol.read_into(buf, offset)
            iostats.count(self.h.io[iostats.READ], count, _clock() - t)
        return buf

    def pwrite(self, buf: bytes | memoryview, offset: int) -> None:
        t = _clock()
        self.h.check_lease()
        with self.lock:
            self._open()
            seq = self.h.writable.write(buf, offset)
            if self.h.gate is None:
                iostats.count(self.h.io[iostats.WRITE], len(buf), _clock() - t)
                return
        self._replicated(iostats.WRITE, len(buf), seq, t)

    def flush(self) -> None:
        t = _clock()
        with self.lock:
            self._open()
            seq = self.h.writable.last_seq if self.h.gate is not None else 0
        self.h.vol.flush()  # outside the lock, as an NBD FLUSH (server.Handle.flushed)
        self._replicated(iostats.FLUSH, 0, seq, t)

    def _replicated(self, op: int, nbytes: int, seq: int, t: int) -> None:
        """Outside the lock: wait for the synchronous peers (as an NBD request does),
        then count the request."""
        self.h.replicated(seq, write=op != iostats.FLUSH)
        with self.lock:
            iostats.count(self.h.io[op], nbytes, _clock() - t)

    def trim(self, count: int, offset: int) -> None:
        self._range_op(iostats.TRIM, self.h.writable.trim, count, offset)

    def zero(self, count: int, offset: int) -> None:
        self._range_op(iostats.ZERO, self.h.writable.zero, count, offset)

    def _range_op(self, op: int, fn: Callable[[int, int], int], count: int,
                  offset: int) -> None:
        """A trim or zero: ``fn(offset, count)`` under the lease and the lock, then the
        synchronous peers' acks as for a write."""
        t = _clock()
        self.h.check_lease()
        with self.lock:
            self._open()
            seq = fn(offset, count)
            if self.h.gate is None:
                iostats.count(self.h.io[op], count, _clock() - t)
                return
        self._replicated(op, count, seq, t)


class Attachment:
    """One mounted export served from this process: WORKERS threads on its /dev/fuse
    descriptor, and a reaper that releases everything once they have all stopped."""

    def __init__(self, export: str, h: Handle, fd: int,
                 on_end: Callable[[Attachment], None]) -> None:
        self.export = export
        self.file = VolumeFile(h)
        self.fd = fd
        self.on_end = on_end
        os.set_blocking(fd, True)
        os.set_inheritable(fd, False)  # no child may keep the connection alive past us
        self.server = fuse_protocol.Server([self.file] * WORKERS, "disk", h.readonly)
        self.threads = self.server.serve(fd)
        threading.Thread(target=self._reap, daemon=True, name=f"fuse-reap-{export}").start()
        log.info("fuse_attached", export=export, read_only=h.readonly, workers=WORKERS)

    def _reap(self) -> None:
        for t in self.threads:
            t.join()
        os.close(self.fd)
        log.info("fuse_detached", export=self.export)
        self.on_end(self)

    def close(self) -> None:
        """Stop touching the volume (before it closes): under its lock, so that no
        request is half way through it."""
        with self.file.lock:
            self.file.closed = True
        self.server.stopping.set()
