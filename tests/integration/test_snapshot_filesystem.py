"""ext4 on a volume, a snapshot, files changed and deleted; the snapshot's export
(`VOLUME@SNAP`, read-only) mounted through nbdfuse + loop shows the old files."""

from __future__ import annotations

import hashlib
import os
import random
from contextlib import ExitStack
from pathlib import Path

from tests.conftest import Served, run_nbdgw
from tests.integration.conftest import (
    FS_MARKS,
    loop_device,
    make_files,
    mounted,
    nbdfuse,
    run,
)

pytestmark = FS_MARKS  # the same root/FUSE/loop requirements


def test_snapshot_of_ext4_mounts_read_only_with_the_old_files(data_dir: Path, tmp_path: Path,
                                                              serve) -> None:
    run_nbdgw("volume", "create", "fs", "--size", "128M", "--data-dir", str(data_dir))
    files = make_files(random.Random(6))  # noqa: S311 - reproducible test data
    old = {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}
    s: Served = serve()
    with nbdfuse(tmp_path / "fuse", s.uri("fs")) as image, loop_device(image) as dev:
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev])
        with mounted(dev, tmp_path / "mnt") as mnt:
            for name, data in files.items():
                (mnt / name).parent.mkdir(parents=True, exist_ok=True)
                (mnt / name).write_bytes(data)
            run(["sync", "-f", str(mnt / "big.bin")])
            run(["fsfreeze", "--freeze", str(mnt)])  # a consistent filesystem image
            try:
                run_nbdgw("snapshot", "create", "fs", "--name", "backup", "--data-dir",
                          str(data_dir))
            finally:
                run(["fsfreeze", "--unfreeze", str(mnt)])
            (mnt / "big.bin").write_bytes(b"changed" * 1000)
            (mnt / "dir/two-mib").unlink()
            (mnt / "new-file").write_bytes(os.urandom(1 << 20))
            os.sync()

        with ExitStack() as stack:
            simage = stack.enter_context(nbdfuse(tmp_path / "sfuse", s.uri("fs@backup"),
                                                 readonly=True))
            sdev = stack.enter_context(loop_device(simage, readonly=True))
            smnt = stack.enter_context(mounted(sdev, tmp_path / "smnt", "ro,noload"))
            got = {n: hashlib.sha256((smnt / n).read_bytes()).hexdigest() for n in files}
            assert not (smnt / "new-file").exists()
            fsck = run(["e2fsck", "-fn", sdev], check=False)
        assert got == old
        assert fsck.returncode == 0, f"e2fsck -fn on the snapshot: {fsck.stdout}{fsck.stderr}"

        with mounted(dev, tmp_path / "mnt") as mnt:  # the live filesystem moved on
            assert (mnt / "big.bin").read_bytes() == b"changed" * 1000
            assert not (mnt / "dir/two-mib").exists()
    assert s.stop() == 0
