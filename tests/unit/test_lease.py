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


def test_a_renewal_that_comes_late_holds_the_write_instead_of_failing_it(
        tmp_path: Path) -> None:
    """The lab's etcd leader was killed and the cluster split its first vote: the
    keepalive that renewed the lease was answered 6 ms after the lease had run out, and
    the write that came in between failed with ESHUTDOWN (CI of af9a0bc).  A renewal is
    continuous in etcd (and in the node core), so the write waits a bounded time for it
    instead of failing."""
    w = LeaseWriter(tmp_path / "write.lease")
    r = Lease(tmp_path / "write.lease")
    w.set(time.monotonic_ns() + 50_000_000)
    renew = threading.Timer(0.2, lambda: w.set(time.monotonic_ns() + 10**10))
    renew.start()
    time.sleep(0.1)  # expired now, renewed 0.1 s later
    t = time.monotonic()
    r.check()
    assert 0.05 < time.monotonic() - t < lease_mod.RENEWAL_WAIT
    renew.join()
    w.close()


def test_a_lease_never_renewed_fails_after_one_wait_and_at_once_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease_mod, "RENEWAL_WAIT", 0.3)
    w = LeaseWriter(tmp_path / "write.lease")
    r = Lease(tmp_path / "write.lease")
    w.set(time.monotonic_ns() - 1)
    t = time.monotonic()
    with pytest.raises(OSError, match="write lease expired"):
        r.check()
    assert 0.3 <= time.monotonic() - t < 1.0  # waited once for a renewal
    t = time.monotonic()
    with pytest.raises(OSError, match="write lease expired"):
        r.check()
    assert time.monotonic() - t < 0.1  # the same lapsed lease: no second wait
    w.set(time.monotonic_ns() + 10**10)
    r.check()  # renewed: writes again
    w.set(0)  # the daemon ends it on purpose (fenced, demoted): no wait at all
    t = time.monotonic()
    with pytest.raises(OSError, match="write lease"):
        r.check()
    assert time.monotonic() - t < 0.1
    w.close()
