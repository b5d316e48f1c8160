"""One client connection's handle (NBD, or a FUSE mount served in nbdkit): what the
nbdkit callbacks (plugin.py) and the FUSE workers (fusefile.py) act on."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time

from blockstore.cdp import FollowedPointView, PointView
from blockstore.clone import Clone
from blockstore.snapshot import SnapshotView
from blockstore.volume import Volume

from . import iostats
from .lease import Lease
from .syncgate import SyncGate
from .threadstate import Workers

_clock = time.monotonic_ns

# Readers of a replica's snapshots and points yield the CPU to its receiver: the thread
# that serves them (each NBD connection and each FUSE mount has its own) runs at this
# nice value.
READER_NICE = 10


def yield_to_receiver() -> None:
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        if os.getpriority(os.PRIO_PROCESS, tid) < READER_NICE:
            os.setpriority(os.PRIO_PROCESS, tid, READER_NICE)


class Handle:
    """One client connection: the shared volume (or a snapshot of it, ``VOLUME@SNAP``,
    always read-only), this connection's read-only bit, the lock of its volume (a
    snapshot's is its volume's: writes copy pre-images into the snapshot store), the
    sync gate (None without synchronous peers: then nothing ever waits), and its own I/O
    counters (set by the plugin's open)."""

    __slots__ = ("count_lock", "gate", "io", "lease", "lock", "readonly", "vol", "workers")

    def __init__(self, vol: Volume | SnapshotView | PointView | FollowedPointView | Clone,
                 readonly: bool,
                 gate: SyncGate | None = None, lease: Lease | None = None,
                 lock: threading.Lock | None = None) -> None:
        self.vol = vol
        self.readonly = readonly
        self.gate = gate
        self.lease = lease
        if lock is None:
            assert isinstance(vol, Volume)
            lock = vol.request_lock
        self.lock = lock
        # With a sync gate a connection's requests run in parallel and count under this.
        self.count_lock = threading.Lock() if gate is not None else None
        self.io: list[list[int]] = []
        # The thread states of nbdkit's workers serving this connection (sync peers:
        # PARALLEL), kept from their first request to close (threadstate.py).
        self.workers: Workers | None = None

    @property
    def writable(self) -> Volume | Clone:
        """The volume (or a clone), for a write, trim or zero, or the journal's end:
        never a snapshot (its handles are read-only, so nbdkit and the FUSE server refuse
        writes to it before they get here, and have no sync gate)."""
        vol = self.vol
        if not isinstance(vol, Volume | Clone):
            raise PermissionError(errno.EROFS, f"export {vol.name} is read-only")
        return vol

    def check_lease(self) -> None:
        """Before a write: refuse it if this node's write lease has expired."""
        if self.lease is not None:
            self.lease.check()

    def count(self, op: int, nbytes: int, t: int) -> None:
        """A request of ``op`` that started at ``t`` (monotonic ns) completed."""
        if self.count_lock is None:
            iostats.count(self.io[op], nbytes, _clock() - t)
        else:
            with self.count_lock:
                iostats.count(self.io[op], nbytes, _clock() - t)

    def written(self, seq: int, fua: int | bool) -> None:
        """After a write, trim or zero (journal record ``seq``), outside the volume lock:
        FUA makes the journal durable through it, then the sync peers' acks."""
        if fua:
            self.vol.flush()
        if self.gate is not None:
            self.replicated(seq)

    def flushed(self) -> None:
        """FLUSH, outside the volume lock: the journal's fdatasync (Journal.sync runs
        alongside appends; other requests of this volume go on meanwhile), then the sync
        peers' acks through what was written before the FLUSH arrived."""
        seq = self.writable.last_seq if self.gate is not None else 0
        self.vol.flush()
        if self.gate is not None:
            self.replicated(seq, write=False)

    def replicated(self, seq: int, write: bool = True) -> None:
        """After a write (``seq``: its journal record) or a FLUSH (``write`` False,
        ``seq``: the journal's end when it arrived), outside the volume lock: wait until
        every synchronous peer that holds waiters has the journal through ``seq``
        durably.  A write that waits alone makes the local journal durable meanwhile
        (Volume.sync_ahead): the FLUSH a database sends right after it then costs no
        fdatasync of its own, so a commit costs one round trip, not a round trip plus an
        fdatasync."""
        if self.gate is None:
            return
        vol = self.writable
        assert isinstance(vol, Volume)  # a clone's handle has no gate: never replicated
        self.gate.wait(vol.name, seq, (lambda: vol.sync_ahead(seq)) if write else None)
