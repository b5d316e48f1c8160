"""What the node's running processes say about its volumes right now: the serving
nbdkit's I/O counters (over a volume control socket) and tgtd's iSCSI sessions.  Read by
`nbdgw status --live` (status.py) and by the metrics scrape (metrics.py)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Final

import structlog

from blockstore.volume import list_volumes
from iscsi_bridge import Bridge
from iscsi_bridge.errors import InvalidName
from iscsi_bridge.names import target_iqn
from nbdgw_common.control_socket import ControlError, request
from nbdgw_common.errors import GatewayError

from .config import NodeConfig

log = structlog.get_logger(component="metrics")

STATS_TIMEOUT: Final = 2.0


def io_stats(data_dir: Path, timeout: float = STATS_TIMEOUT) -> dict[str, Any] | None:
    """The serving nbdkit's per-export counters ({export: iostats snapshot}), asked on
    the first volume control socket that answers; None when no nbdkit serves here."""
    for info in list_volumes(data_dir):
        if not (info.path / "control.sock").exists():
            continue
        with contextlib.suppress(ControlError, OSError, ValueError):
            reply = request(info.path, {"op": "stats"}, timeout)
            exports: dict[str, Any] = reply["exports"]
            return exports
    return None


def iscsi_sessions(cfg: NodeConfig) -> dict[str, int] | None:
    """Sessions per exported volume (by target IQN), or None without a running tgtd."""
    if not cfg.iscsi.enabled or cfg.iscsi.iqn is None:
        return None
    try:
        report = Bridge(cfg.iscsi, lambda e: "").status()
    except (GatewayError, OSError) as e:  # tgtadm trouble must not break a scrape
        log.warning("iscsi_status_failed", error=str(e))
        return None
    if report.get("tgtd") != "up":
        return None
    by_iqn = {str(t["iqn"]): len(t["sessions"]) for t in report["targets"]}  # type: ignore[attr-defined]
    out = {}
    for info in list_volumes(cfg.data_dir):
        with contextlib.suppress(InvalidName):
            out[info.name] = by_iqn.get(target_iqn(cfg.iscsi.iqn, info.name), 0)
    return out
