"""nbd_plugin/lease.py: the write lease file, on the monotonic clock (no wall time)."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

from nbd_plugin import lease as lease_mod
from nbd_plugin.lease import LEASE_SIZE, Lease, LeaseWriter, encode


def test_the_lease_holds_until_its_monotonic_expiry(tmp_path: Path) -> None:
    w = LeaseWriter(tmp_path / "write.lease")
    r = Lease(tmp_path / "write.lease")
    assert not r.valid()  # created expired
    w.set(time.monotonic_ns() + 200_000_000)
    assert r.valid()  # the mapping sees the rewrite at once
    time.sleep(0.25)
    with pytest.raises(OSError, match="write lease expired") as e:
        r.check()
    assert e.value.errno == errno.ESHUTDOWN
    w.set(time.monotonic_ns() + 10**10)
    r.check()
    w.close()  # closing ends it
    assert not r.valid()


def test_wall_clock_time_plays_no_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                       ) -> None:
    """The old lease was the file's mtime against time.time(): a wall clock stepped back
    extended it.  Now a wall-clock jump (and the file's mtime) change nothing."""
    w = LeaseWriter(tmp_path / "write.lease")
    w.set(time.monotonic_ns() - 1)  # expired
    os.utime(tmp_path / "write.lease")  # a fresh mtime means nothing
    monkeypatch.setattr(time, "time", lambda: 0.0)  # the wall clock jumps back
    assert not Lease(tmp_path / "write.lease").valid()


def test_a_torn_or_missing_lease_is_no_lease(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    path = tmp_path / "write.lease"
    r = Lease(path)
    assert not r.valid()  # no file yet
    good = encode(time.monotonic_ns() + 10**10)
    path.write_bytes(good[:8] + bytes(8))  # the complement does not match
    monkeypatch.setattr(lease_mod, "REOPEN_EVERY", 0.0)
    assert not r.valid()
    with path.open("r+b") as f:
        f.write(good)
    assert r.valid()
    assert path.stat().st_size == LEASE_SIZE


def test_writers_racing_the_first_open_all_see_a_valid_lease(tmp_path: Path) -> None:
    """nbdkit's PARALLEL threads share one Lease.  While the first of them opened the
    file, the others found no map and a fresh `tried` and failed their writes with
    ESHUTDOWN though the lease held (the first 16 writes of a sync-mode test, once in a
    dozen runs)."""
    path = tmp_path / "write.lease"
    LeaseWriter(path).set(time.monotonic_ns() + 60_000_000_000)
    failed = 0
    for _ in range(200):
        lease = Lease(path)
        start = threading.Barrier(8)

        def write(lease: Lease = lease, start: threading.Barrier = start) -> None:
            nonlocal failed
            start.wait()
            if not lease.valid():
                failed += 1

        threads = [threading.Thread(target=write) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        lease.close()
    assert failed == 0
