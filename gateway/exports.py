"""What a node exports over iSCSI, from its config (iscsi_bridge.Bridge serves them)."""

from __future__ import annotations

from collections.abc import Iterable

from blockstore.volume import is_replica, list_volumes
from iscsi_bridge import Export

from .config import NodeConfig, Role


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
