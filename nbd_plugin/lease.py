"""The primary's write lease: until when nbdkit may take writes (DESIGN.md §6).

One 16-byte file, ``<data_dir>/run/write.lease``: the expiry as CLOCK_MONOTONIC
nanoseconds (u64, little-endian) followed by its bitwise complement, so that a reader
that races the writer sees a mismatch instead of a torn value.  The daemon (the node
core decides the expiry: gateway/nodecore.py) rewrites it in place with pwrite, never
replaces it, and writes 0 when the node must stop.  nbdkit maps the file and compares
the expiry with its own monotonic clock before every write: a daemon that hangs, dies or
is frozen stops renewing it, so writes stop when the lease runs out, before any other
node can be elected.  Monotonic time on one host is shared by the daemon and nbdkit and
is not moved by settimeofday or NTP steps, so no wall-clock jump can extend a lease.

A write that finds the lease run out (not ended: the file does not say 0) waits up to
``RENEWAL_WAIT`` for the daemon to renew it before it fails.  A renewal means the lease
never lapsed where it counts (etcd answers a keepalive only for a lease it still holds;
the node core renews only while a majority still backs it), so a keepalive answered a
few milliseconds late, as after an etcd leader election, is a pause for the client and
not an error.  The wait is paid once per lapsed lease: later writes fail at once until it
is renewed.  Nothing is written while the lease is not valid.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import threading
import time
from pathlib import Path
from typing import Final

from blockstore.modes import make_dir

LEASE_SIZE: Final = 16
_MASK: Final = (1 << 64) - 1
_FMT: Final = "<QQ"
REOPEN_EVERY: Final = 0.05  # seconds between attempts to open a lease file not there yet
RENEWAL_WAIT: Final = 1.0  # s: how long a write waits for a lease that ran out
RENEWAL_POLL: Final = 0.005  # s


def encode(until_ns: int) -> bytes:
    until_ns = max(0, min(until_ns, _MASK))
    return struct.pack(_FMT, until_ns, until_ns ^ _MASK)


class LeaseWriter:
    """The daemon's side: create the file (0600, expired) and rewrite it in place."""

    def __init__(self, path: Path) -> None:
        self.path = path
        make_dir(path.parent, parents=True, exist_ok=True)  # <data_dir>/run
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.until_ns = -1
        self.set(0)

    def set(self, until_ns: int) -> None:
        """Valid until ``until_ns`` (CLOCK_MONOTONIC); 0 ends it now."""
        if until_ns != self.until_ns:
            os.pwrite(self.fd, encode(until_ns), 0)
            self.until_ns = until_ns

    def close(self) -> None:
        try:
            self.set(0)
        finally:
            os.close(self.fd)


class Lease:
    """nbdkit's side: ``check()`` before a write raises ESHUTDOWN unless the lease holds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.map: mmap.mmap | None = None
        self.failed_at = -REOPEN_EVERY  # when an open last failed (no file, or a short one)
        self.opening = threading.Lock()  # nbdkit's threads share one Lease
        self.logged = False
        self.lapsed = -1  # the expiry a write already waited out in vain

    def _open(self) -> mmap.mmap | None:
        # One thread opens; the others wait for it and use its map.  Only a failed open
        # (no file yet, or a short one) is throttled: a thread that found the map missing
        # because another was opening it must not read "no lease".
        with self.opening:
            if self.map is not None or time.monotonic() - self.failed_at < REOPEN_EVERY:
                return self.map
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                self.failed_at = time.monotonic()
                return None
            try:
                if os.fstat(fd).st_size < LEASE_SIZE:
                    self.failed_at = time.monotonic()
                    return None
                self.map = mmap.mmap(fd, LEASE_SIZE, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            return self.map

    def until_ns(self) -> int:
        """The expiry now in the file (0 when there is none, or it cannot be read)."""
        m = self.map or self._open()
        if m is None:
            return 0
        for _ in range(3):
            a, b = struct.unpack_from(_FMT, m)
            if a ^ b == _MASK:
                return int(a)
        return 0  # kept changing under us: treat as expired, the next write retries

    def valid(self) -> bool:
        return time.monotonic_ns() < self.until_ns()

    def check(self) -> None:
        until = self.until_ns()
        if time.monotonic_ns() < until:
            return
        if until not in (0, self.lapsed):
            deadline = time.monotonic() + RENEWAL_WAIT
            while time.monotonic() < deadline:
                time.sleep(RENEWAL_POLL)
                if self.valid():
                    return
            self.lapsed = until
        raise OSError(errno.ESHUTDOWN, "write lease expired: this node may no longer be "
                                       "the primary")

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None
