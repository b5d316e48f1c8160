"""nbdgw-fuse (iscsi_bridge/fused.py), the bridge's FUSE server, with real processes: an
export of a real `nbdgw serve` shown as a file, written and read with plain syscalls and
checked over NBD; writes that overlap (the reason it exists, shown against nbdfuse on a
slow export); bad input."""

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

import pytest

from iscsi_bridge.fuse import mounted
from tests.conftest import Served
from tests.integration.test_filesystem import nbdfuse

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


@pytest.fixture
def served(serve: Callable[..., Served], data_dir: Path) -> Served:
    from tests.conftest import run_nbdgw

    run_nbdgw("volume", "create", "v1", "--size", "64M", "--data-dir", str(data_dir))
    return serve()


def test_the_export_as_a_file(served: Served, tmp_path: Path) -> None:
    """Writes from eight threads at once (O_DIRECT, as tgtd opens it) and a punched
    hole land in the volume; reads see what NBD clients wrote; fsync is an NBD flush."""
    with fuse_file(tmp_path / "mnt", served.uri("v1")) as disk:
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


def test_bad_input(served: Served, tmp_path: Path) -> None:
    """A write past the end is refused whole; a read-only mount refuses writers; a URI
    that answers nothing is a clear error with no mount left behind."""
    with fuse_file(tmp_path / "rw", served.uri("v1")) as disk:
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
    with fuse_file(tmp_path / "ro", served.uri("v1"), "-r") as disk:
        with pytest.raises(OSError, match=r"Read-only file system|Permission denied") as ei:
            os.open(disk, os.O_RDWR)
        assert ei.value.errno in (errno.EROFS, errno.EACCES)
        h = served.connect("v1")
        whole = h.pread(64 * MiB, 0)
        h.shutdown()
        assert hashlib.sha256(disk.read_bytes()).digest() == hashlib.sha256(whole).digest()
    p = subprocess.run([sys.executable, "-m", "iscsi_bridge.fused", str(tmp_path / "none"),
                        f"nbd+unix:///v1?socket={tmp_path / 'absent.sock'}"],
                       capture_output=True, text=True, timeout=30, check=False)
    assert p.returncode == 1
    assert "nbdgw-fuse: cannot connect to nbd+unix:///v1" in p.stderr
    assert not mounted(tmp_path / "none")


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
