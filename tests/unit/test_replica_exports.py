"""nbd_plugin.server on a replica's node: the replica's snapshots are listed and opened
read-only (REPLICA@SNAP) while another open of the replica (its receiver) holds it and
applies batches; the replica itself is served read-only as of its last applied batch
with a CDP window, not at all without one; writes are refused."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from blockstore.cdp import CdpPolicy, FollowedPointView, write_policy
from blockstore.clone import create_clone
from blockstore.marks import SNAP_EVENT
from blockstore.record import Op
from blockstore.snapshot import FollowedSnapshotView
from blockstore.volume import Volume, create_volume
from nbd_plugin.server import READER_NICE, Params, PluginError, Server
from nbdgw_common.control_socket import ControlError, request

MiB = 1 << 20
SIZE = 2 * MiB


def snap_mark(sid: int, name: str) -> tuple[int, int, int, int, bytes]:
    return (Op.MARK, 0, 0, 0, msgpack.packb({"event": SNAP_EVENT, "id": sid, "name": name,
                                             "time": 1.0}))


def write(offset: int, byte: int, n: int = 64 * 1024) -> tuple[int, int, int, int, bytes]:
    return (Op.WRITE, 0, offset, n, bytes([byte]) * n)


@pytest.fixture(autouse=True)
def _nice_again() -> Iterator[None]:
    """Reads here run in the test's thread, which they renice: back after each test."""
    tid = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, tid)
    yield
    with contextlib.suppress(PermissionError):
        os.setpriority(os.PRIO_PROCESS, tid, before)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Volume]:
    """The replica r1, open as its receiver holds it, with snapshot s1 of 0x01s."""
    create_volume(tmp_path, "r1", SIZE, replica=True)
    r = Volume.open(tmp_path, "r1")
    r.set_consistent(True)
    r.apply_batch(1, 3, [write(0, 1, SIZE), snap_mark(1, "s1"), write(0, 2)])
    yield r
    r.close()


def server(tmp_path: Path, *volumes: str) -> Server:
    p = Params(data_dir=tmp_path)
    for v in volumes:
        p.set("volume", v)
    return Server(p)


@pytest.mark.parametrize("named", [False, True])
def test_replica_snapshots_are_served_read_only_while_the_receiver_writes(
        tmp_path: Path, receiver: Volume, named: bool) -> None:
    s = server(tmp_path, *(["r1"] if named else []))
    try:
        assert [n for n, _d in s.list_exports()] == ["r1@s1"]
        with pytest.raises(FileNotFoundError, match=r"r1 is a replica.*r1@SNAPSHOT"):
            s.open("r1", False)
        h = s.open("r1@s1", False)
        assert h.readonly and isinstance(h.vol, FollowedSnapshotView)
        with pytest.raises(PermissionError) as e:
            h.writable.write(b"x", 0)
        assert e.value.errno == errno.EROFS
        receiver.apply_batch(4, 5, [write(MiB, 3), snap_mark(2, "s2")])  # goes on
        buf = bytearray(SIZE)
        with h.lock:
            h.vol.read_into(buf, 0)
        assert buf == b"\x01" * SIZE
        assert [n for n, _d in s.list_exports()] == ["r1@s1", "r1@s2"]
        h2 = s.open("r1@s2", True)
        with h2.lock:
            h2.vol.read_into(buf, 0)
        assert buf[:64 * 1024] == b"\x02" * (64 * 1024)
        assert buf[MiB:MiB + 64 * 1024] == b"\x03" * (64 * 1024)
        assert s._snapshot_in_use("r1", "s1")  # counted like any snapshot export
        for x in (h, h2):
            s.close_handle(x)
        assert not s.snapshot_handles
        with pytest.raises(FileNotFoundError, match="no snapshot named 'nope'"):
            s.open("r1@nope", True)
    finally:
        s.close()


def test_a_replica_named_with_no_snapshots_is_not_an_error(tmp_path: Path) -> None:
    create_volume(tmp_path, "r1", SIZE, replica=True)
    s = server(tmp_path, "r1")
    try:
        assert s.list_exports() == []
        with pytest.raises(FileNotFoundError, match="has no snapshots"):
            s.open("r1@s1", True)
    finally:
        s.close()


def test_no_volume_and_no_replica_is_still_refused(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match="no volume can be served"):
        server(tmp_path, "nope")


def test_the_replica_control_socket_serves_fuse_and_stats_only(tmp_path: Path,
                                                               receiver: Volume) -> None:
    s = server(tmp_path)
    vdir = tmp_path / "volumes" / "r1"
    try:
        assert request(vdir, {"op": "stats"}, timeout=10)["ok"]
        with pytest.raises(ControlError, match="r1 is a replica here"):
            request(vdir, {"op": "create", "volumes": ["r1"], "name": "x"}, timeout=10)
        with pytest.raises(ControlError, match="r1 is a replica here"):
            request(vdir, {"op": "delete", "volume": "r1", "name": "s1"}, timeout=10)
        with pytest.raises(ControlError, match=r"held by its receiver \(stop replicating"):
            request(vdir, {"op": "withdraw"}, timeout=10)  # nbdgw volume delete asks this
        # A FUSE mount of a replica snapshot is attached through the same open as an NBD
        # client's (a real mount: tests/integration/test_replica_read.py).
        with pytest.raises(ControlError, match="no snapshot named 'none'"):
            request(vdir, {"op": "fuse", "export": "r1@none", "read_only": True},
                    timeout=10, fds=(os.open(os.devnull, os.O_RDONLY),))
    finally:
        s.close()


def test_replica_snapshot_reads_yield_the_cpu_and_leave_atime(tmp_path: Path,
                                                              receiver: Volume) -> None:
    """A replica snapshot's reader runs at nice READER_NICE (its own thread: nbdkit and
    the FUSE server give each connection and mount one) and never dirties the store's
    inode the receiver syncs (O_NOATIME)."""
    s = server(tmp_path)
    store = tmp_path / "volumes" / "r1" / "store"
    old = store.stat().st_atime_ns - 10**9
    os.utime(store, ns=(old, store.stat().st_mtime_ns))  # relatime would update it
    try:
        h = s.open("r1@s1", True)
        done: list[int] = []

        def read() -> None:
            buf = bytearray(4096)
            with h.lock:
                h.vol.read_into(buf, MiB)  # read through to the live store
            done.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

        t = threading.Thread(target=read)
        t.start()
        t.join(10)
        assert done == [READER_NICE]
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < READER_NICE
        assert store.stat().st_atime_ns == old
        s.close_handle(h)
    finally:
        s.close()


def whole(h: Any) -> bytes:
    buf = bytearray(SIZE)
    with h.lock:
        h.vol.read_into(buf, 0)
    return bytes(buf)


@pytest.mark.parametrize("replicas_only", [False, True])
def test_the_replica_itself_is_served_as_of_its_last_applied_batch(
        tmp_path: Path, replicas_only: bool) -> None:
    """With a CDP window: ``r2`` reads the records of every batch committed when it was
    opened (those after the batch's last TIME mark too: there is none here), and keeps
    that state while the receiver applies the next; writes are refused."""
    info = create_volume(tmp_path, "r2", SIZE, replica=True)
    write_policy(info.path, CdpPolicy(3600, 1 << 30))
    r = Volume.open(tmp_path, "r2")
    r.set_consistent(True)
    p = Params(data_dir=tmp_path, replicas_only=replicas_only)
    s = Server(p)
    try:
        r.apply_batch(1, 2, [write(0, 1, SIZE), write(MiB, 2)])
        assert "r2" in [n for n, _d in s.list_exports()]
        h = s.open("r2", False)
        assert h.readonly and isinstance(h.vol, FollowedPointView)
        r.apply_batch(3, 3, [write(0, 3)])  # after the open: not in that connection's view
        want = bytearray([1]) * SIZE
        want[MiB:MiB + 64 * 1024] = bytes([2]) * (64 * 1024)
        assert whole(h) == want
        with pytest.raises(PermissionError):
            h.writable.write(b"x", 0)
        s.close_handle(h)
        h = s.open("r2", True)
        want[:64 * 1024] = bytes([3]) * (64 * 1024)
        assert whole(h) == want
        s.close_handle(h)
    finally:
        s.close()
        r.close()


def test_a_replicas_only_server_never_serves_a_volume_of_its_own(tmp_path: Path) -> None:
    create_volume(tmp_path, "p1", SIZE)
    s = Server(Params(data_dir=tmp_path, replicas_only=True))
    try:
        assert "p1" not in [n for n, _d in s.list_exports()]
        with pytest.raises(FileNotFoundError, match="p1 is not served by this node"):
            s.open("p1", False)
    finally:
        s.close()


def test_a_clone_of_a_replica_snapshot_opens(tmp_path: Path, receiver: Volume) -> None:
    """The clone opens its base (the replica's follower) under the server's members
    lock, which it already holds: a non-reentrant lock hung that open for ever."""
    create_clone(tmp_path, "c1", "r1", "s1", SIZE)
    s = server(tmp_path)
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(s.open("c1", False)), daemon=True)
    t.start()
    t.join(10)
    try:
        assert got, "opening a clone of a replica snapshot did not return in 10 s"
        h = got[0]
        assert not h.readonly
        h.writable.write(b"\xab" * 4096, 0)
        buf = bytearray(8192)
        with h.lock:
            h.vol.read_into(buf, 0)
        assert bytes(buf) == b"\xab" * 4096 + b"\x01" * 4096  # r1@s1 holds 0x01 there
        s.close_handle(h)
    finally:
        s.close()
