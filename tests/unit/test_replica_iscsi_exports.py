"""gateway.exports.replica_exports: what a secondary's daemon exports over iSCSI in
front of its readers' nbdkit is what that nbdkit lists (nbd_plugin.server with
replicas_only), less each replica's current image: snapshots and exported CDP points
read-only, clones of the replicas writable."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from blockstore.cdp import CdpPolicy, write_exports, write_policy
from blockstore.clone import create_clone
from blockstore.marks import SNAP_EVENT
from blockstore.record import Op
from blockstore.volume import Volume, create_volume
from gateway.config import parse_config
from gateway.daemon import portal_bindable
from gateway.errors import ConfigError
from gateway.exports import replica_exports
from iscsi_bridge import Export
from nbd_plugin.server import Params, Server

SIZE = 2 << 20


def replica_with_snapshot(data_dir: Path, name: str, snap: str) -> None:
    create_volume(data_dir, name, SIZE, replica=True)
    r = Volume.open(data_dir, name)
    try:
        r.set_consistent(True)
        mark = msgpack.packb({"event": SNAP_EVENT, "id": 1, "name": snap, "time": 1.0})
        r.apply_batch(1, 2, [(Op.WRITE, 0, 0, 4096, b"\x01" * 4096),
                             (Op.MARK, 0, 0, 0, mark)])
    finally:
        r.close()


def test_the_readers_luns_are_the_readers_nbdkit_exports_but_the_replicas(
        tmp_path: Path) -> None:
    replica_with_snapshot(tmp_path, "r1", "s1")
    replica_with_snapshot(tmp_path, "r2", "daily")
    write_policy(tmp_path / "volumes/r2", CdpPolicy(3600, 1 << 30))  # r2 keeps a window
    write_exports(tmp_path / "volumes/r2", ["r2@seq-2"])
    create_volume(tmp_path, "p1", SIZE)  # a volume of this node's own: not a reader's
    create_clone(tmp_path, "drill", "r1", "s1", SIZE)
    cfg = parse_config({"version": 1, "node": {"name": "dc"}}).with_overrides(
        data_dir=tmp_path)
    got = replica_exports(cfg)
    assert got == [Export("r1@s1", True), Export("r2@daily", True),
                   Export("r2@seq-2", True), Export("drill", False)]
    p = Params(data_dir=tmp_path)
    p.set("replicas_only", "true")
    s = Server(p)
    try:
        listed = {n for n, _d in s.list_exports()}
    finally:
        s.close()
    assert listed - {"r2"} == {e.name for e in got}  # r2 itself: its current image
    named = parse_config({"version": 1, "node": {"name": "dc"},
                          "volumes": [{"name": "r2", "size": SIZE}]})
    named = named.with_overrides(data_dir=tmp_path)
    assert [e.name for e in replica_exports(named)] == ["r2@daily", "r2@seq-2"]


def test_readers_portal_and_where_tgtd_can_listen() -> None:
    """iscsi.readers_portal moves only the readers' tgtd; without it the portal is used
    where the node has its address (a wildcard, or its own), and 192.0.2.10 (TEST-NET-1,
    on no interface here, as the service address is not on a secondary) is not."""
    base = {"enabled": True, "iqn": "iqn.2026-11.com.example:nbdgw",
            "portal": "192.0.2.10:3260"}
    cfg = parse_config({"version": 1, "iscsi": {**base, "readers_portal": "127.0.0.1:3261"}})
    assert cfg.iscsi.portal == "192.0.2.10:3260"
    assert cfg.iscsi.for_readers().portal == "127.0.0.1:3261"
    plain = parse_config({"version": 1, "iscsi": base}).iscsi
    assert plain.for_readers() == plain
    assert portal_bindable("0.0.0.0") and portal_bindable("127.0.0.1")
    assert not portal_bindable("192.0.2.10")
    with pytest.raises(ConfigError, match="readers_portal"):
        parse_config({"version": 1, "iscsi": {**base, "readers_portal": "nowhere"}})
