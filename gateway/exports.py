"""What a node exports over iSCSI, from its config (iscsi_bridge.Bridge serves them)."""

from __future__ import annotations

from collections.abc import Iterable

import structlog

from blockstore.cdp import read_exports, read_policy
from blockstore.clone import list_clones
from blockstore.errors import BlockstoreError
from blockstore.snapshot import read_index
from blockstore.volume import is_replica, list_volumes
from iscsi_bridge import Export

from .config import NodeConfig, Role

log = structlog.get_logger(component="iscsi")


def exports_from_config(cfg: NodeConfig, primary: bool | None = None,
                        snapshots: Iterable[str] = ()) -> list[Export]:
    """The exports a node serves over iSCSI: its volumes when primary, plus snapshots.

    Volumes are the config's `volumes` list, or every non-replica volume in data_dir
    when the list is empty (as `nbdgw serve` does).  Only the primary exposes
    writable LUNs (``primary`` defaults to node.role); snapshots are read-only
    wherever they are exported.
    """
    if primary is None:
        primary = cfg.role is Role.PRIMARY
    out: list[Export] = []
    if primary:
        if cfg.volumes:
            out += [Export(v.name, v.read_only) for v in cfg.volumes]
        else:
            out += [Export(v.name) for v in list_volumes(cfg.data_dir) if not is_replica(v)]
    out += [Export(s, read_only=True) for s in snapshots]
    return out


def replica_exports(cfg: NodeConfig) -> list[Export]:
    """What a secondary's or DR node's readers' nbdkit serves, as iSCSI exports: each
    replica's snapshots (``REPLICA@SNAP``) and exported CDP points, read-only, and the
    clones made from them, writable.  Not the replica itself: its read-only view is
    fixed when a client connects, and its target name is the primary's writable LUN.

    Replicas are the config's `volumes` that are replicas here, or with an empty list
    every replica in data_dir (as the readers' nbdkit serves them)."""
    named = {v.name for v in cfg.volumes}
    replicas = [v for v in list_volumes(cfg.data_dir)
                if is_replica(v) and (not named or v.name in named)]
    out: list[Export] = []
    for info in replicas:
        try:
            _shift, index = read_index(info.path / "snapshots" / "index")
            snaps = [index.snaps[i].name for i in index.order]
        except FileNotFoundError:
            snaps = []
        except (BlockstoreError, OSError) as e:
            log.error("replica_snapshots_unreadable", volume=info.name, error=str(e))
            continue
        out += [Export(f"{info.name}@{s}", read_only=True) for s in snaps]
        if read_policy(info.path) is not None:  # points are served with a CDP window
            out += [Export(e, read_only=True) for e in read_exports(info.path)
                    if e.partition("@")[2] not in snaps]  # a snapshot of the name wins
    bases = {i.name for i in replicas}
    out += [Export(c.name) for c in list_clones(cfg.data_dir) if c.volume in bases]
    return out
