"""A real filesystem on an nbdgw volume: nbdfuse -> loop device -> ext4 -> files.

The stack a Linux host without kernel NBD would use: `nbdfuse` shows the export as a
file, `losetup` makes it a block device, and ext4 lives on it.  After unmounting and
stopping the server the volume's checksum is stable across a restart, the filesystem
is clean (`e2fsck -fn`), and a read-only mount gives back every file bit for bit.
"""

from __future__ import annotations

import hashlib
import os
import random
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.conftest import Served, need, run_nbdgw
from tests.integration.conftest import FS_MARKS, loop_device, make_files, mounted, nbdfuse, run

MiB = 1 << 20

pytestmark = FS_MARKS


@pytest.fixture(autouse=True)
def _tools() -> None:
    for tool in ("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "e2fsck"):
        need(tool)


def checksum(data_dir: Path, name: str) -> tuple[str, str]:
    """(digest, stderr) of `nbdgw volume checksum NAME`."""
    p = run_nbdgw("volume", "checksum", name, "--data-dir", str(data_dir))
    digest, vol = p.stdout.split()
    assert vol == name
    return digest, p.stderr


def test_ext4_on_nbdfuse_loop_survives_restart(data_dir: Path, tmp_path: Path,
                                               serve) -> None:
    """mkfs + files over nbdfuse/loop; clean fsck; checksum stable over a restart; files
    read back from a read-only mount."""
    run_nbdgw("volume", "create", "fs", "--size", "256M", "--data-dir", str(data_dir))
    files = make_files(random.Random(256))  # noqa: S311 - reproducible test data
    digests = {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}

    s: Served = serve()
    with nbdfuse(tmp_path / "fuse", s.uri("fs")) as image:
        assert image.stat().st_size == 256 * MiB
        with loop_device(image) as dev:
            run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev])
            with mounted(dev, tmp_path / "mnt") as mnt:
                for name, data in files.items():
                    (mnt / name).parent.mkdir(parents=True, exist_ok=True)
                    (mnt / name).write_bytes(data)
            assert not os.path.ismount(mnt)
            fsck = run(["e2fsck", "-fn", dev], check=False)
            assert fsck.returncode == 0, f"e2fsck -fn: {fsck.stdout}\n{fsck.stderr}"
    assert not os.path.ismount(tmp_path / "fuse")

    assert s.stop() == 0
    before, _ = checksum(data_dir, "fs")
    assert before != hashlib.sha256(bytes(256 * MiB)).hexdigest()

    s2: Served = serve()
    during, warning = checksum(data_dir, "fs")  # served and idle: the store as it is
    assert "is being served" in warning
    assert during == before
    with ExitStack() as stack:
        image = stack.enter_context(nbdfuse(tmp_path / "fuse", s2.uri("fs"), readonly=True))
        dev = stack.enter_context(loop_device(image, readonly=True))
        mnt = stack.enter_context(mounted(dev, tmp_path / "mnt", "ro,noload"))
        got = {n: hashlib.sha256((mnt / n).read_bytes()).hexdigest() for n in files}
        assert sorted(p.relative_to(mnt).as_posix() for p in mnt.rglob("*") if p.is_file()
                      ) == sorted(files)
    assert got == digests
    assert s2.stop() == 0
    after, _ = checksum(data_dir, "fs")
    assert after == before
