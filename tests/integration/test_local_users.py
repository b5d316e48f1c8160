"""Another local user (issue 20, "hostile input: local users"): as user nobody, nothing
of a volume can be read or written -- not its journal segments, store, snapshot data or
state files, not the control sockets, not the iSCSI bridge's run_dir nor the FUSE file
it mounts for tgtd -- while root's I/O through NBD and through that file goes on.

The data directory is made by `nbdgw volume create` under an admin's umask (022) in a
directory everyone may search, as the README's quick start does."""

from __future__ import annotations

import errno
import os
import random
import socket
import stat
from pathlib import Path

import pytest

from blockstore.volume import volumes_dir
from gateway.config import IscsiConfig
from iscsi_bridge import Bridge, Export
from iscsi_bridge.errors import BridgeError
from iscsi_bridge.fuse import FuseMount
from tests.conftest import Served, need, run_nbdgw
from tests.integration.conftest import Nobody

SECRET = b"issue-20-secret:" + os.urandom(8).hex().encode()
REFUSED = (errno.EACCES, errno.EPERM)


def serve_secret(data: Path) -> tuple[Served, object]:
    """v1 served from ``data``, SECRET written and flushed, kept in snapshot s1 by an
    overwrite (so the snapshot data holds it too)."""
    run_nbdgw("volume", "create", "v1", "--size", "8M", "--data-dir", str(data))
    served = Served(data, [])
    h = served.connect("v1")
    block = SECRET.ljust(4096, b".")
    h.pwrite(block, 0)  # type: ignore[attr-defined]
    h.flush()  # type: ignore[attr-defined]
    run_nbdgw("snapshot", "create", "v1", "--name", "s1", "--data-dir", str(data))
    h.pwrite(b"\0" * 4096, 0)  # type: ignore[attr-defined]  # copy-on-write of SECRET
    h.pwrite(block, 65536)  # type: ignore[attr-defined]
    h.flush()  # type: ignore[attr-defined]
    return served, h


def grep_as(nobody: Nobody, top: Path) -> list[str]:
    """What ``nobody`` finds of SECRET under ``top``, reading every file it can."""
    def search() -> list[str]:
        found = []
        for root, _dirs, files in os.walk(top):
            for name in files:
                try:
                    with open(os.path.join(root, name), "rb") as f:
                        if SECRET in f.read():
                            found.append(os.path.join(root, name))
                except OSError:
                    pass
        return found
    kind, value = nobody.run(search)
    assert kind == "ok", value
    return list(value)


def test_nobody_reads_and_writes_no_volume_file(world_dir: Path, nobody: Nobody) -> None:
    data = world_dir / "data"
    served, h = serve_secret(data)
    vdir = volumes_dir(data) / "v1"
    files = [p for p in vdir.rglob("*") if p.is_file() or p.is_socket()]
    names = {str(p.relative_to(vdir)) for p in files}
    assert {"store", "volume.json", "state.json", "snapshots/data", "snapshots/index",
            "control.sock"} <= names
    assert any(n.startswith("journal/seg-") and n.endswith(".jnl") for n in names)

    assert grep_as(nobody, world_dir) == []  # it was found in journal/seg-*.jnl
    for p in files:
        if p.is_socket():
            def connect(p: Path = p) -> None:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(p))
            assert nobody.errno(connect) in REFUSED, p
            continue
        assert nobody.errno(lambda p=p: os.open(p, os.O_RDONLY)) in REFUSED, p
        assert nobody.errno(lambda p=p: os.open(p, os.O_WRONLY)) in REFUSED, p
    for d in (data, volumes_dir(data), vdir, vdir / "journal", vdir / "snapshots"):
        assert nobody.errno(lambda d=d: os.listdir(d)) in REFUSED, d
        assert nobody.errno(lambda d=d: os.open(d / "x", os.O_CREAT | os.O_WRONLY)) \
            in REFUSED, d

    # Root's I/O goes on, through NBD and the snapshot export.
    assert h.pread(len(SECRET), 65536) == SECRET  # type: ignore[attr-defined]
    snap = served.connect("v1@s1")
    assert snap.pread(len(SECRET), 0) == SECRET  # type: ignore[attr-defined]
    assert served.stop() == 0


def test_a_group_gets_metadata_not_data(world_dir: Path, nobody: Nobody) -> None:
    """control.group opens the metadata for `nbdgw status`, never the volume data."""
    from blockstore.modes import open_to_group

    data = world_dir / "data"
    served, _h = serve_secret(data)
    open_to_group(data, nobody.gid)  # nogroup stands for control.group here
    vdir = volumes_dir(data) / "v1"
    assert nobody.errno(lambda: len((vdir / "state.json").read_bytes())) == 0
    assert grep_as(nobody, world_dir) == []
    for p in [vdir / "store", vdir / "snapshots" / "data", *vdir.glob("journal/*.jnl")]:
        assert nobody.errno(lambda p=p: os.open(p, os.O_RDONLY)) in REFUSED, p
    assert served.stop() == 0


def run_dir_config(run_dir: Path) -> IscsiConfig:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    for _ in range(1000):
        control = random.randint(20000, 32767)  # noqa: S311 - not a secret
        if not Path(f"/var/run/tgtd/socket.{control}").exists():
            break
    return IscsiConfig(enabled=True, portal_host="127.0.0.1", portal_port=port,
                       iqn="iqn.2026-11.com.example:nbdgw", control_port=control,
                       run_dir=run_dir)


def test_the_bridge_run_dir_and_fuse_file_refuse_nobody(world_dir: Path,
                                                        nobody: Nobody) -> None:
    for tool in ("tgtd", "fusermount3"):
        need(tool)
    data = world_dir / "data"
    served, h = serve_secret(data)
    run_dir = world_dir / "iscsi"
    run_dir.mkdir(mode=0o755)  # as an older nbdgw (or an admin) left it: tightened
    bridge = Bridge(run_dir_config(run_dir), served.uri, None, data)
    try:
        bridge.reconcile([Export("v1")])
        disk = run_dir / "mnt" / "v1" / "disk"
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
        assert nobody.errno(lambda: os.listdir(run_dir)) in REFUSED
        assert nobody.errno(lambda: os.open(disk, os.O_RDONLY)) in REFUSED

        # Even with the directories open, the mount itself refuses another user: the
        # kernel checks the file's 0600 (default_permissions), and without allow_other
        # only the mounting user (root) may use it at all.
        run_dir.chmod(0o755)
        (run_dir / "mnt").chmod(0o755)
        assert nobody.errno(lambda: os.open(disk, os.O_RDONLY)) in REFUSED
        assert nobody.errno(lambda: os.open(disk, os.O_WRONLY)) in REFUSED

        # Root's I/O through the file (tgtd's way in) and NBD goes on.
        fd = os.open(disk, os.O_RDWR)
        try:
            assert os.pread(fd, len(SECRET), 65536) == SECRET
            os.pwrite(fd, b"root was here".ljust(4096, b"."), 1 << 20)
            os.fsync(fd)
        finally:
            os.close(fd)
        assert h.pread(13, 1 << 20) == b"root was here"  # type: ignore[attr-defined]
    finally:
        bridge.stop()
    assert served.stop() == 0


def test_a_run_dir_of_another_user_is_refused(world_dir: Path, nobody: Nobody) -> None:
    run_dir = world_dir / "iscsi"
    run_dir.mkdir()
    os.chown(run_dir, nobody.uid, nobody.gid)
    bridge = Bridge(run_dir_config(run_dir), lambda e: f"nbd://127.0.0.1/{e}", None, None)
    try:
        with pytest.raises(BridgeError) as e:
            bridge.reconcile([])
    finally:
        bridge.stop()  # before the fix, a tgtd started
    assert str(e.value) == (
        f"iscsi.run_dir {run_dir} belongs to uid {nobody.uid}, not to uid 0 that runs "
        f"nbdgw: remove it, or give it to uid 0 (chown) if its content is trusted")


@pytest.mark.parametrize("server", ["nbdgw", "nbdfuse"])
def test_the_other_fuse_servers_refuse_nobody(world_dir: Path, nobody: Nobody,
                                              server: str) -> None:
    """nbdgw-fuse (the same mount code as in nbdkit) and nbdfuse, on their own."""
    need("fusermount3")
    data = world_dir / "data"
    served, _h = serve_secret(data)
    mnt = world_dir / "mnt" / "v1"
    m = FuseMount("v1", mnt, served.uri("v1"), False, server)
    m.start()
    try:
        mnt.parent.chmod(0o755)
        assert nobody.errno(lambda: os.open(m.file, os.O_RDONLY)) in REFUSED
        assert nobody.errno(lambda: os.open(m.file, os.O_WRONLY)) in REFUSED
        with open(m.file, "rb") as f:
            assert f.read(len(SECRET)) == b"\0" * len(SECRET)
            f.seek(65536)
            assert f.read(len(SECRET)) == SECRET
    finally:
        m.stop()
    assert served.stop() == 0
