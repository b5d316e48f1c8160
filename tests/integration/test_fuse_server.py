"""The bridge's own FUSE servers with real processes: nbdgw-fuse (iscsi_bridge/fused.py,
over NBD) and the same protocol code inside the volume's nbdkit (nbd_plugin/fusefile.py,
iscsi.fuse: nbdkit).  An export of a real `nbdgw serve` shown as a file, written and read
with plain syscalls and checked over NBD; writes that overlap (the reason nbdgw-fuse
exists, shown against nbdfuse on a slow export); what serving inside nbdkit adds (the
I/O counters, the switchover hold, snapshot exports in use, nbdkit stopping under a
mount); bad input."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blockstore.volume import volumes_dir
from iscsi_bridge.errors import FuseError
from iscsi_bridge.fuse import FuseMount, mounted
from nbdgw_common import control_socket as control
from nbdgw_common.control_socket import ControlError
from tests.conftest import Served
from tests.integration.conftest import nbdfuse

MiB = 1 << 20


@contextlib.contextmanager
def fuse_file(mnt: Path, uri: str, *extra: str, timeout: float = 15) -> Iterator[Path]:
    """The export at ``uri`` as ``mnt/disk``, served by nbdgw-fuse."""
    mnt.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "iscsi_bridge.fused", *extra, str(mnt), uri]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not (mounted(mnt) and (mnt / "disk").exists()):
            assert proc.poll() is None, f"nbdgw-fuse exited: {proc.stdout.read()}"
            assert time.monotonic() < deadline, f"{argv} did not mount in {timeout} s"
            time.sleep(0.05)
        yield mnt / "disk"
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False,
                       capture_output=True)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


KINDS = pytest.mark.parametrize("kind", ["nbdkit", "nbdgw"])


@contextlib.contextmanager
def mount_file(kind: str, served: Served, mnt: Path, export: str = "v1",
               read_only: bool = False) -> Iterator[Path]:
    """``export`` as ``mnt/disk``: served inside nbdkit (a FuseMount, as the bridge makes
    it) or by nbdgw-fuse over NBD."""
    if kind == "nbdgw":
        with fuse_file(mnt, served.uri(export), *(["-r"] if read_only else [])) as disk:
            yield disk
        return
    m = FuseMount(export, mnt, str(volumes_dir(served.data_dir) / export.partition("@")[0]),
                  read_only, "nbdkit")
    m.start()
    try:
        assert m.pid() == served.nbdkit_pid()
        yield m.file
    finally:
        m.stop()


@pytest.fixture
def served(serve: Callable[..., Served], data_dir: Path) -> Served:
    from tests.conftest import run_nbdgw

    run_nbdgw("volume", "create", "v1", "--size", "64M", "--data-dir", str(data_dir))
    return serve()


@KINDS
def test_the_export_as_a_file(served: Served, tmp_path: Path, kind: str) -> None:
    """Writes from eight threads at once (O_DIRECT, as tgtd opens it) and a punched
    hole land in the volume; reads see what NBD clients wrote; fsync is an NBD flush."""
    with mount_file(kind, served, tmp_path / "mnt") as disk:
        assert disk.stat().st_size == 64 * MiB
        assert os.listdir(disk.parent) == ["disk"]
        blocks = {i: os.urandom(64 * 1024) for i in range(64)}
        fd = os.open(disk, os.O_RDWR | os.O_DIRECT)
        try:
            def writer(k: int) -> None:
                buf = _aligned(64 * 1024)  # O_DIRECT wants aligned buffers
                for i in range(k, 64, 8):
                    buf[:] = blocks[i]
                    assert os.pwrite(fd, buf, i * MiB) == 64 * 1024
            threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            os.fsync(fd)
        finally:
            os.close(fd)
        h = served.connect("v1")
        for i, data in blocks.items():
            assert h.pread(64 * 1024, i * MiB) == data
        h.pwrite(b"\x5a" * 4096, 63 * MiB)
        h.flush()
        with open(disk, "rb") as f:
            f.seek(63 * MiB)
            assert f.read(4096) == b"\x5a" * 4096  # no stale page cache in between
        fd = os.open(disk, os.O_RDWR)
        try:
            _fallocate(fd, 0, 0, 4096)  # plain allocation: every byte exists already
            _fallocate(fd, 0x01 | 0x02, 0, 64 * 1024)  # KEEP_SIZE | PUNCH_HOLE
        finally:
            os.close(fd)
        assert h.pread(64 * 1024, 0) == bytes(64 * 1024)
        h.shutdown()


def test_writes_overlap_where_nbdfuse_serialises_them(tmp_path: Path) -> None:
    """Eight threads each write 4 KiB at once to an export that takes 200 ms per write
    (nbdkit's delay filter, parallel thread model): through nbdgw-fuse (4 connections)
    the writes overlap; through nbdfuse the kernel holds the file's lock per write."""
    sock = tmp_path / "slow.sock"
    slow = subprocess.Popen(["nbdkit", "-U", str(sock), "-f", "--exit-with-parent",
                             "--filter=delay", "memory", "64M", "wdelay=200ms"])
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        uri = f"nbd+unix:///?socket={sock}"
        took = {}
        mounts = {"nbdgw": lambda: fuse_file(tmp_path / "nbdgw", uri, "-C", "4"),
                  "nbdfuse": lambda: nbdfuse(tmp_path / "nbdfuse", uri)}
        for server, mount in mounts.items():
            with mount() as disk:
                fd = os.open(disk, os.O_RDWR | os.O_DIRECT)
                try:
                    def one(i: int, fd: int = fd) -> None:
                        os.pwrite(fd, _aligned(4096, fill=i + 1), i * MiB)
                    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
                    t0 = time.monotonic()
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    took[server] = time.monotonic() - t0
                    for i in range(8):
                        assert os.pread(fd, 4096, i * MiB) == bytes([i + 1]) * 4096
                finally:
                    os.close(fd)
        # 8 x 200 ms one at a time is 1.6 s; two waves of four overlapping ones 0.4 s.
        assert took["nbdfuse"] > 1.4, took
        assert took["nbdgw"] < 0.9, took
    finally:
        slow.kill()
        slow.wait()


@KINDS
def test_bad_input(served: Served, tmp_path: Path, kind: str) -> None:
    """A write past the end is refused whole; a read-only mount refuses writers."""
    with mount_file(kind, served, tmp_path / "rw") as disk:
        fd = os.open(disk, os.O_RDWR | os.O_DIRECT)
        try:
            with pytest.raises(OSError, match=r"No space left|File too large") as ei:
                os.pwrite(fd, _aligned(8192), 64 * MiB - 4096)
            assert ei.value.errno in (errno.ENOSPC, errno.EFBIG)
        finally:
            os.close(fd)
        h = served.connect("v1")
        assert h.pread(4096, 64 * MiB - 4096) == bytes(4096)
        h.shutdown()
    with mount_file(kind, served, tmp_path / "ro", read_only=True) as disk:
        with pytest.raises(OSError, match=r"Read-only file system|Permission denied") as ei:
            os.open(disk, os.O_RDWR)
        assert ei.value.errno in (errno.EROFS, errno.EACCES)
        h = served.connect("v1")
        whole = h.pread(64 * MiB, 0)
        h.shutdown()
        assert hashlib.sha256(disk.read_bytes()).digest() == hashlib.sha256(whole).digest()


def test_an_unreachable_export_is_a_clear_error(served: Served, tmp_path: Path) -> None:
    """nbdgw-fuse on a URI that answers nothing, nbdkit asked for an export it does not
    serve, a control request without the descriptor: each says what is wrong, and no
    mount is left behind."""
    p = subprocess.run([sys.executable, "-m", "iscsi_bridge.fused", str(tmp_path / "none"),
                        f"nbd+unix:///v1?socket={tmp_path / 'absent.sock'}"],
                       capture_output=True, text=True, timeout=30, check=False)
    assert p.returncode == 1
    assert "nbdgw-fuse: cannot connect to nbd+unix:///v1" in p.stderr
    assert not mounted(tmp_path / "none")

    vdir = volumes_dir(served.data_dir) / "v1"
    for export, ro, why in (("v2", False, "no export named 'v2'"),
                            ("v1@nosuch", True, "no export named 'v1@nosuch'")):
        m = FuseMount(export, tmp_path / export, str(vdir), ro, "nbdkit")
        with pytest.raises(FuseError, match=f"nbdkit cannot serve {export} over FUSE: "
                                            f"cannot serve {export} over FUSE: {why}"):
            m.start(timeout=10)
        assert not mounted(m.dir) and not m.dir.exists() and m.pid() is None
    with pytest.raises(ControlError, match="fuse needs export, read_only and one /dev/fuse"):
        control.request(vdir, {"op": "fuse", "export": "v1", "read_only": False})
    with pytest.raises(FuseError, match=r"nothing answers .* needs the volume served by "
                                        r"`nbdgw serve` on this host"):
        FuseMount("v1", tmp_path / "gone", str(tmp_path), False, "nbdkit").start(timeout=5)
    assert not mounted(tmp_path / "gone")
    # and the volume is still served, unharmed
    h = served.connect("v1")
    assert h.pread(4096, 0) == bytes(4096)
    h.shutdown()


def _stats(served: Served) -> dict[str, Any]:
    reply = control.request(volumes_dir(served.data_dir) / "v1", {"op": "stats"})
    return reply["exports"]["v1"]["ops"]  # type: ignore[no-any-return]


def test_inside_nbdkit_io_is_counted_and_held(served: Served, tmp_path: Path) -> None:
    """Served inside nbdkit, the file's I/O is the export's I/O: counted with NBD's, and
    stopped by the switchover hold (the lock every NBD request takes) until released."""
    with mount_file("nbdkit", served, tmp_path / "mnt") as disk:
        before = _stats(served)  # the export's counters exist once something opened it
        fd = os.open(disk, os.O_RDWR | os.O_DIRECT)
        try:
            assert os.pwrite(fd, _aligned(65536, fill=7), 0) == 65536
            os.fsync(fd)
            assert os.pread(fd, 4096, 0) == b"\x07" * 4096
            after = _stats(served)
            assert after["write"]["requests"] - before["write"]["requests"] >= 1
            assert after["write"]["bytes"] - before["write"]["bytes"] == 65536
            assert after["flush"]["requests"] > before["flush"]["requests"]
            assert after["read"]["bytes"] - before["read"]["bytes"] >= 4096

            sock, seqs = control.hold(volumes_dir(served.data_dir) / "v1", max_s=30)
            done = threading.Event()

            def write() -> None:
                os.pwrite(fd, _aligned(4096, fill=9), 8192)
                done.set()
            t = threading.Thread(target=write)
            t.start()
            try:
                assert not done.wait(1.0), "a write went through while I/O was held"
            finally:
                sock.close()  # release
            assert done.wait(10)
            t.join()
        finally:
            os.close(fd)
    h = served.connect("v1")
    assert h.pread(4096, 8192) == b"\x09" * 4096
    h.shutdown()
    assert seqs["v1"] >= 1


def test_a_snapshot_mounted_inside_nbdkit_is_in_use(served: Served, tmp_path: Path) -> None:
    """A mounted snapshot export is read-only and cannot be deleted, as with an NBD
    client connected.  Unmounting returns only once nbdkit has released it (shown by
    holding nbdkit's lock, which the release needs, across the unmount), so a withdrawn
    snapshot can be deleted at once."""
    from tests.conftest import run_nbdgw

    vdir = volumes_dir(served.data_dir) / "v1"
    h = served.connect("v1")
    h.pwrite(b"\x11" * 4096, 0)
    h.flush()
    run_nbdgw("snapshot", "create", "v1", "--name", "s1", "--data-dir", str(served.data_dir))
    h.pwrite(b"\x22" * 4096, 0)
    h.flush()
    h.shutdown()
    m = FuseMount("v1@s1", tmp_path / "snap", str(vdir), True, "nbdkit")
    m.start()
    try:
        with open(m.file, "rb") as f:
            assert f.read(4096) == b"\x11" * 4096
        with pytest.raises(OSError, match=r"Read-only file system|Permission denied"):
            os.open(m.file, os.O_RDWR)
        p = run_nbdgw("snapshot", "delete", "v1", "s1", "--data-dir", str(served.data_dir),
                      check=False)
        assert p.returncode != 0 and "exported to 1 client" in p.stderr
        assert control.request(vdir, {"op": "stats"})["fuse_mounts"] == ["v1@s1"]
        sock, _ = control.hold(vdir, max_s=30)
        stopper = threading.Thread(target=m.stop)
        stopper.start()
        try:
            stopper.join(1.0)
            assert stopper.is_alive(), "unmount returned before nbdkit released the export"
            assert not mounted(m.dir)
        finally:
            sock.close()
        stopper.join(20)
        assert not stopper.is_alive()
    finally:
        m.stop()
    assert control.request(vdir, {"op": "stats"})["fuse_mounts"] == []
    run_nbdgw("snapshot", "delete", "v1", "s1", "--data-dir", str(served.data_dir))


def _copied_into(pid: int, mount_dir: Path, timeout: float = 10) -> None:
    """Until process ``pid`` runs in a mount namespace of its own holding ``mount_dir``."""
    ours = os.readlink("/proc/self/ns/mnt")
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            if (os.readlink(f"/proc/{pid}/ns/mnt") != ours and
                    f" {mount_dir} " in Path(f"/proc/{pid}/mountinfo").read_text()):
                return
        assert time.monotonic() < deadline, f"no mount namespace with {mount_dir} in {pid}"
        time.sleep(0.02)


def test_a_mount_copied_into_another_namespace_is_released_at_once(
        served: Served, tmp_path: Path) -> None:
    """A mount namespace made while a mount exists (`ip netns exec`, as another session's
    lab runs it; `unshare -m`; a container starting) holds a copy of the mount.  Where /
    is not a shared mount (this machine) the lazy unmount does not reach that copy, and
    the copy kept the FUSE connection, so nbdkit's attachment, alive for as long as the
    namespace lived (test_replica_iscsi, 1 run in 3: still held after 15 s).  stop ends
    the connection itself: released within 1 s, withdrawal after withdrawal."""
    vdir = volumes_dir(served.data_dir) / "v1"
    holders: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(3):
            m = FuseMount("v1", tmp_path / f"mnt{i}", str(vdir), False, "nbdkit")
            m.start()
            try:
                fd = os.open(m.file, os.O_RDWR | os.O_DIRECT)  # as tgtd holds its LUN
                # what `ip netns exec` does: a new mount namespace, a slave of ours
                holders.append(subprocess.Popen(
                    ["unshare", "--mount", "--propagation", "slave", "sleep", "60"]))
                _copied_into(holders[-1].pid, m.dir)
                os.close(fd)  # the LUN deleted
                t0 = time.monotonic()
                m.stop(timeout=5)
                took = time.monotonic() - t0
                held = control.request(vdir, {"op": "stats"})["fuse_mounts"]
                assert held == [] and took < 1, (
                    f"withdrawal {i}: stop took {took:.2f} s, nbdkit serves {held} after it")
            finally:
                m.stop(timeout=1)
    finally:
        for p in holders:
            p.kill()
            p.wait()


def test_nbdkit_stopping_under_a_mount(served: Served, tmp_path: Path) -> None:
    """`nbdgw serve` stops cleanly with a mount attached (no worker holds it up); the
    mount is then dead, not hung, and the bridge's stop cleans it up."""
    m = FuseMount("v1", tmp_path / "mnt", str(volumes_dir(served.data_dir) / "v1"), False,
                  "nbdkit")
    m.start()
    try:
        fd = os.open(m.file, os.O_RDWR | os.O_DIRECT)
        os.pwrite(fd, _aligned(4096, fill=3), 0)
        t0 = time.monotonic()
        assert served.stop() == 0
        assert time.monotonic() - t0 < 30
        with pytest.raises(OSError, match=r"not connected|aborted|Input/output") as ei:
            os.pwrite(fd, _aligned(4096, fill=4), 0)
        assert ei.value.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
        with contextlib.suppress(OSError):  # the close's FLUSH: ENOTCONN; closed anyway
            os.close(fd)
        assert not m.healthy()
    finally:
        m.stop()
    assert not mounted(m.dir)


def _aligned(n: int, fill: int = 0) -> memoryview:
    """A page-aligned buffer (O_DIRECT) of ``n`` bytes."""
    import mmap

    m = mmap.mmap(-1, n)
    if fill:
        m.write(bytes([fill]) * n)
    return memoryview(m)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    from blockstore.store import fallocate

    fallocate(fd, mode, offset, length)


def test_inside_nbdkit_writes_need_the_lease(data_dir: Path, tmp_path: Path) -> None:
    """A node whose write lease has expired (its daemon gone: it may no longer be the
    primary) refuses iSCSI writes through the FUSE file as it refuses NBD writes, with
    ESHUTDOWN, and takes them again once the lease is renewed.  nbdkit runs the plugin
    here directly, with a short lease."""
    from gateway.serve import PLUGIN_PATH, plugin_site_dirs
    from tests.conftest import run_nbdgw

    run_nbdgw("volume", "create", "v1", "--size", "64M", "--data-dir", str(data_dir))
    from nbd_plugin.lease import LeaseWriter

    lease, sock = tmp_path / "lease", tmp_path / "nbd.sock"
    writer = LeaseWriter(lease)

    def renew(seconds: float) -> None:
        writer.set(time.monotonic_ns() + int(seconds * 1e9))

    nbdkit = subprocess.Popen(
        ["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), "python", str(PLUGIN_PATH),
         f"data_dir={data_dir}", f"lease={lease}"],
        env={**os.environ, "NBDGW_SITE": plugin_site_dirs()}, stderr=subprocess.DEVNULL)
    m = FuseMount("v1", tmp_path / "mnt", str(volumes_dir(data_dir) / "v1"), False, "nbdkit")
    try:
        deadline = time.monotonic() + 20
        while not (volumes_dir(data_dir) / "v1" / control.SOCKET_NAME).exists():
            assert nbdkit.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        m.start()
        fd = os.open(m.file, os.O_RDWR | os.O_DIRECT)
        try:
            renew(1.0)
            assert os.pwrite(fd, _aligned(4096, fill=1), 0) == 4096
            time.sleep(1.3)  # no renewal: expired
            with pytest.raises(OSError, match="transport endpoint shutdown") as ei:
                os.pwrite(fd, _aligned(4096, fill=2), 0)
            assert ei.value.errno == errno.ESHUTDOWN
            assert os.pread(fd, 4096, 0) == b"\x01" * 4096  # reads go on; nothing written
            renew(10.0)  # seen at the next write: the file is mapped
            assert os.pwrite(fd, _aligned(4096, fill=3), 0) == 4096
            assert os.pread(fd, 4096, 0) == b"\x03" * 4096
        finally:
            os.close(fd)
    finally:
        m.stop()
        nbdkit.terminate()
        nbdkit.wait(30)
        writer.close()
