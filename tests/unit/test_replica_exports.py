"""nbd_plugin.server on a replica's node: the replica's snapshots are listed and opened
read-only (REPLICA@SNAP) while another open of the replica (its receiver) holds it and
applies batches; the replica itself is not served; writes are refused."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

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
