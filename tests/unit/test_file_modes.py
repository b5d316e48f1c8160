"""Modes of what nbdgw creates under a data directory (DESIGN.md §10; issue 20,
"hostile input: local users"): volume data, state files and directories are their
owner's alone whatever the umask of the process that makes them (an admin's CLI runs
with 022); a volume made before is made private when opened; control.group opens the
metadata, never the data; the FUSE mount and the control sockets keep other users out.
The same as another user, with real processes: tests/integration/test_local_users.py."""

from __future__ import annotations

import grp
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockstore.meta import write_json
from blockstore.peers import write_dirty, write_refused
from blockstore.volume import Volume, create_volume, find_volume, volumes_dir

MiB = 1 << 20
SEGMENT = 64 * 1024  # small: the journal rotates and recycles segments


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)  # an admin's
    yield
    os.umask(old)


def modes(top: Path) -> dict[str, int]:
    """Mode bits of ``top`` and of every directory and regular file under it."""
    out = {".": stat.S_IMODE(top.stat().st_mode)}
    for p in top.rglob("*"):
        st = p.lstat()
        if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
            out[str(p.relative_to(top))] = stat.S_IMODE(st.st_mode)
    return out


def not_private(top: Path) -> dict[str, str]:
    return {k: oct(m) for k, m in modes(top).items()
            if m != (0o700 if (top / k).is_dir() else 0o600)}


def use_volume(data: Path) -> None:
    """Make a volume write everything it writes: journal segments (rotated, recycled),
    the store, the activity log, snapshot data and index, state files, resync and dirty
    sets, a refused link."""
    create_volume(data, "v1", 4 * MiB)
    vol = Volume.open(data, "v1", segment_bytes=SEGMENT)
    try:
        for i in range(64):
            vol.write(bytes([i]) * 4096, i * 4096)
        vol.flush()
        vol.snapshot_create("s1")
        for i in range(64):
            vol.write(b"\xff" * 4096, i * 4096)  # copy-on-write into the snapshot
        vol.flush()
        vol.add_resync([0], "test")
        vol.checkpoint()
        vol.release_journal()
        for i in range(64):
            vol.write(b"\xee" * 4096, i * 4096)
        vol.flush()
    finally:
        vol.close()
    info = find_volume(data, "v1")
    write_dirty(info, "dc", reason="test", from_seq=1, through_seq=2, shift=22, extents=[0])
    write_refused(info, "dc", side="sender", by="peer", reason="test", split_brain=False,
                  settle=None)


def test_a_volume_is_private_under_an_admins_umask(tmp_path: Path, umask_022: None) -> None:
    data = tmp_path / "data"
    use_volume(data)
    names = modes(data)
    assert {"volumes/v1/store", "volumes/v1/state.json", "volumes/v1/snapshots/data",
            "volumes/v1/al"} <= set(names)
    assert sum(k.startswith("volumes/v1/journal/seg-") for k in names) >= 2
    assert not_private(data) == {}  # segments and state files were 0644, dirs 0755


def test_the_nodes_own_files_are_private(tmp_path: Path, umask_022: None) -> None:
    from blockstore.node_state import write_outdated
    from gateway import audit, nodestate
    from gateway.events import EventLog
    from gateway.nodecore import HardState
    from gateway.serve import lease_path
    from nbd_plugin.lease import LeaseWriter

    data = tmp_path / "data"
    audit.record(data, "volume create", {"name": "v1"}, "done", "")
    nodestate.save_hard(data, HardState(role="primary", epoch=1), "test")
    write_outdated(data, 1, ["dc"])
    LeaseWriter(lease_path(data))
    EventLog(data / "run").emit([{"event": "test"}])
    assert len(modes(data)) >= 6
    assert not_private(data) == {}


def test_state_files_are_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_json(tmp_path / "x.json", {"kind": "x", "version": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o600


def test_a_volume_made_before_is_made_private_when_opened(tmp_path: Path) -> None:
    data = tmp_path / "data"
    use_volume(data)
    for p in [data, *data.rglob("*")]:  # as an nbdgw that set no modes left it
        p.chmod(0o755 if p.is_dir() else 0o644)
    Volume.open(data, "v1", segment_bytes=SEGMENT).close()
    loose = not_private(data)
    # Every directory is private again, so no file is reachable by another user; the
    # journal's files (recycled, mode and all) are 0600 too.
    assert {k for k in loose if (data / k).is_dir() or "/journal/" in k} == set()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another group needs root")
def test_a_group_gets_the_metadata_never_the_data(tmp_path: Path) -> None:
    from blockstore.modes import open_to_group

    data = tmp_path / "data"
    use_volume(data)
    gid = grp.getgrnam("daemon").gr_gid
    open_to_group(data, gid)
    create_volume(data, "v2", 4 * MiB)  # made after: follows its directories
    vol = Volume.open(data, "v2", segment_bytes=SEGMENT)
    vol.snapshot_create("s1")
    for i in range(64):
        vol.write(b"\x01" * 4096, i * 4096)
    vol.close()
    for v in ("v1", "v2"):
        vdir = volumes_dir(data) / v
        for p in [data, vdir, vdir / "journal", vdir / "snapshots"]:
            st = p.stat()
            assert (oct(stat.S_IMODE(st.st_mode)), st.st_gid) == ("0o2750", gid), p
        for p in [vdir / "state.json", vdir / "volume.json"]:
            st = p.stat()
            assert (oct(stat.S_IMODE(st.st_mode)), st.st_gid) == ("0o640", gid), p
        data_files = [vdir / "store", vdir / "snapshots" / "data",
                      *(vdir / "journal").iterdir()]
        assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in data_files} == {
            p.name: "0o600" for p in data_files}


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    from blockstore.modes import NotOwned, make_own_dir

    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    make_own_dir(mine, "iscsi.run_dir")
    assert stat.S_IMODE(mine.stat().st_mode) == 0o700  # tightened
    make_own_dir(tmp_path / "a" / "new", "iscsi.run_dir")
    assert stat.S_IMODE((tmp_path / "a" / "new").stat().st_mode) == 0o700
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(NotOwned) as e:
        make_own_dir(theirs, "iscsi.run_dir")
    assert str(e.value) == (f"iscsi.run_dir {theirs} belongs to uid 65534, not to uid 0 "
                            "that runs nbdgw: remove it, or give it to uid 0 (chown) if "
                            "its content is trusted")
    assert stat.S_IMODE(theirs.stat().st_mode) == 0o755  # not taken over


def test_the_fuse_mount_checks_modes_and_admits_root_only() -> None:
    from iscsi_bridge.fused import mount_options

    opts = mount_options(7).split(",")
    assert "default_permissions" in opts
    assert "allow_other" not in opts
    assert {"user_id=0", "group_id=0"} <= set(opts)


def test_control_sockets_are_0600_whatever_the_umask(tmp_path: Path) -> None:
    from gateway.daemon import Control
    from nbd_plugin.control import bind_private

    old = os.umask(0)
    try:
        s = bind_private(tmp_path / "control.sock")
        c = Control(tmp_path / "daemon.sock", lambda _req: None, tmp_path, "n1")
    finally:
        os.umask(old)
    try:
        for name in ("control.sock", "daemon.sock"):
            st = (tmp_path / name).stat()
            assert (stat.S_ISSOCK(st.st_mode), oct(stat.S_IMODE(st.st_mode))) == (
                True, "0o600"), name
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(tmp_path / "control.sock"))  # root: still connects
    finally:
        s.close()
        c.close()
