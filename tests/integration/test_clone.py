"""Writable clones with real nbdkit and real clients: ext4 on a served volume, files
fsynced, a snapshot taken while the file system is mounted and written (no freeze: a
crash-consistent image, whose journal must be replayed to mount it), a clone of it
mounted read-write (the replay happens on the clone), read, written, checked by e2fsck;
the volume and the snapshot never see the clone's writes; the snapshot cannot be deleted
while the clone exists, nor the clone while it is served."""

from __future__ import annotations

import hashlib
import random
from contextlib import ExitStack
from pathlib import Path

import nbd

from tests.conftest import Served, run_nbdgw
from tests.integration.conftest import (
    FS_MARKS,
    loop_device,
    make_files,
    mounted,
    nbdfuse,
    run,
)

pytestmark = FS_MARKS

MiB = 1 << 20


def image_hash(s: Served, export: str, size: int) -> str:
    h = nbd.NBD()
    h.connect_uri(s.uri(export))
    try:
        d = hashlib.sha256()
        for off in range(0, size, 4 * MiB):
            d.update(h.pread(min(4 * MiB, size - off), off))
        return d.hexdigest()
    finally:
        h.shutdown()


def test_a_clone_of_a_live_ext4_snapshot_mounts_read_write(data_dir: Path, tmp_path: Path,
                                                          serve) -> None:
    dd = ["--data-dir", str(data_dir)]
    run_nbdgw("volume", "create", "fs", "--size", "128M", *dd)
    files = make_files(random.Random(11))  # noqa: S311 - reproducible test data
    want = {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}
    s: Served = serve()
    with nbdfuse(tmp_path / "fuse", s.uri("fs")) as image, loop_device(image) as dev:
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev])
        with mounted(dev, tmp_path / "mnt") as mnt:
            for name, data in files.items():
                (mnt / name).parent.mkdir(parents=True, exist_ok=True)
                (mnt / name).write_bytes(data)
                run(["sync", "-f", str(mnt / name)])
            (mnt / "busy").write_bytes(b"x" * MiB)  # dirty, unsynced: whatever it is
            run_nbdgw("snapshot", "create", "fs", "--name", "s1", *dd)  # mounted, no freeze
            (mnt / "after-snapshot").write_bytes(b"live" * 4096)
            run(["sync", "-f", str(mnt / "after-snapshot")])
            snap_before = image_hash(s, "fs@s1", 128 * MiB)

            out = run_nbdgw("clone", "create", "fs@s1", "drill", *dd).stdout
            assert "created clone drill of fs@s1" in out
            assert "drill" in run_nbdgw("clone", "list", *dd).stdout
            with ExitStack() as stack:
                cimage = stack.enter_context(nbdfuse(tmp_path / "cfuse", s.uri("drill")))
                cdev = stack.enter_context(loop_device(cimage))
                cmnt = stack.enter_context(mounted(cdev, tmp_path / "cmnt"))  # replays
                got = {n: hashlib.sha256((cmnt / n).read_bytes()).hexdigest() for n in files}
                assert got == want
                assert not (cmnt / "after-snapshot").exists()
                (cmnt / "report.txt").write_bytes(b"made on the clone\n" * 1000)
                run(["sync", "-f", str(cmnt / "report.txt")])
                # Neither the snapshot nor the clone can go while the clone is served.
                p = run_nbdgw("snapshot", "delete", "fs", "s1", *dd, check=False)
                assert p.returncode != 0 and "(fs@s1): disconnect them first" in p.stderr
                p = run_nbdgw("clone", "delete", "drill", *dd, check=False)
                assert p.returncode != 0 and "clone drill is in use" in p.stderr
            # Not served now, the clone still needs its snapshot.
            p = run_nbdgw("snapshot", "delete", "fs", "s1", *dd, check=False)
            assert p.returncode != 0 and "is the base of clone drill" in p.stderr
            # The clone again, read-only this time: the clone's file, and a clean fsck.
            with ExitStack() as stack:
                cimage = stack.enter_context(nbdfuse(tmp_path / "cfuse2", s.uri("drill"),
                                                     readonly=True))
                cdev = stack.enter_context(loop_device(cimage, readonly=True))
                fsck = run(["e2fsck", "-fn", cdev], check=False)
                cmnt = stack.enter_context(mounted(cdev, tmp_path / "cmnt2", "ro"))
                assert (cmnt / "report.txt").read_bytes() == b"made on the clone\n" * 1000
            assert fsck.returncode == 0, f"e2fsck -fn on the clone: {fsck.stdout}"
            assert not (mnt / "report.txt").exists()  # the live volume never saw it
            assert (mnt / "after-snapshot").read_bytes() == b"live" * 4096
        assert image_hash(s, "fs@s1", 128 * MiB) == snap_before  # nor did the snapshot

    run_nbdgw("clone", "delete", "drill", *dd)
    assert "no clones" in run_nbdgw("clone", "list", *dd).stdout
    run_nbdgw("snapshot", "delete", "fs", "s1", *dd)  # free to go now
    assert s.stop() == 0


def test_clone_refusals(data_dir: Path) -> None:
    dd = ["--data-dir", str(data_dir)]
    run_nbdgw("volume", "create", "v1", "--size", "16M", *dd)
    run_nbdgw("snapshot", "create", "v1", "--name", "s1", *dd)
    for args, msg in ((("v1", "c1"), "expected VOLUME@SNAPSHOT"),
                      (("v1@nope", "c1"), "has no snapshot named 'nope'"),
                      (("nope@s1", "c1"), "nope"),
                      (("v1@s1", "v1"), "a volume named v1 exists"),
                      (("v1@s1", "c1", "--seq", "3"), "expected VOLUME@SNAPSHOT"),
                      (("v1", "c1", "--at", "2026-12-02T10:15:03Z"), "keeps no history"),
                      (("v1@seq-3", "c1"), "keeps no history")):
        p = run_nbdgw("clone", "create", *args, *dd, check=False)
        assert p.returncode != 0 and msg in p.stderr, p.stderr
    run_nbdgw("clone", "create", "v1@s1", "c1", *dd)
    p = run_nbdgw("clone", "create", "v1@s1", "c1", *dd, check=False)
    assert p.returncode != 0 and "a clone named c1 exists" in p.stderr
    p = run_nbdgw("volume", "create", "c1", "--size", "16M", *dd, check=False)
    assert p.returncode != 0 and "a clone named c1 exists" in p.stderr
    p = run_nbdgw("clone", "delete", "c2", *dd, check=False)
    assert p.returncode != 0 and "no clone named c2" in p.stderr


def test_a_clone_reads_its_base_and_its_writes(data_dir: Path, serve) -> None:
    dd = ["--data-dir", str(data_dir)]
    run_nbdgw("volume", "create", "v1", "--size", "8M", *dd)
    s: Served = serve()
    h = nbd.NBD()
    h.connect_uri(s.uri("v1"))
    base = bytes(random.Random(3).randbytes(8 * MiB))  # noqa: S311 - test data
    h.pwrite(base, 0)
    h.flush()
    run_nbdgw("snapshot", "create", "v1", "--name", "s1", *dd)
    h.pwrite(b"\xff" * MiB, 0)  # the volume moves on
    h.flush()
    run_nbdgw("clone", "create", "v1@s1", "c1", *dd)
    c = nbd.NBD()
    c.set_full_info(True)
    c.connect_uri(s.uri("c1"))
    assert c.pread(8 * MiB, 0) == base
    c.pwrite(b"abc", 4097)  # inside a block: the rest of it stays the base's
    c.zero(8192, 3 * MiB + 100)  # libnbd: count, offset (unaligned both ends)
    c.flush()
    want = bytearray(base)
    want[4097:4100] = b"abc"
    want[3 * MiB + 100:3 * MiB + 100 + 8192] = bytes(8192)
    got = c.pread(8 * MiB, 0)
    bad = next((i for i in range(0, 8 * MiB, 512) if got[i:i + 512] != want[i:i + 512]), None)
    assert bad is None, f"first difference in the 512 bytes at {bad}"
    assert h.pread(MiB, 0) == b"\xff" * MiB  # the volume has its own data
    assert c.get_export_description() == "nbdgw clone c1"
    c.shutdown()
    h.shutdown()
    assert s.stop() == 0
