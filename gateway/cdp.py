"""CDP for the CLI, `nbdgw serve` and the daemon (blockstore/cdp.py, DESIGN.md "CDP"):
the config's windows written where every opener of a volume reads them, the window
shown, points named and exported.

Everything here reads the volume's files as they are (the journal's headers, the bases'
index), so it works on served volumes and on replicas alike; the serving nbdkit process
opens the views (nbd_plugin/points.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog

from blockstore.cdp import (
    CdpError,
    CdpPolicy,
    Point,
    bases_of,
    format_instant,
    parse_instant,
    points,
    read_exports,
    read_policy,
    resolve,
    summary,
    write_exports,
    write_policy,
)
from blockstore.volume import find_volume, is_replica, list_volumes

from .config import NodeConfig

log = structlog.get_logger(component="gateway")


def apply_policies(cfg: NodeConfig) -> list[str]:
    """Write each volume's window from the config (read at the volume's next open, by
    nbdkit or the replica's receiver); return the volumes whose window changed."""
    changed = []
    for info in list_volumes(cfg.data_dir):
        c = cfg.cdp_of(info.name)
        policy = CdpPolicy(c.window, c.max_bytes) if c.window > 0 else None
        if read_policy(info.path) is None and policy is None:
            continue
        if write_policy(info.path, policy):
            changed.append(info.name)
            log.info("cdp_window_set", volume=info.name, window=c.window,
                     max_bytes=c.max_bytes)
    return changed


def window(data_dir: Path, volume: str) -> dict[str, Any]:
    """What `nbdgw cdp list` shows."""
    info = find_volume(data_dir, volume)
    s = summary(info.path, is_replica(info))
    if s is None:
        raise CdpError(f"volume {volume} keeps no history here (set cdp.window in the "
                       "config, then restart nbdgw serve or the daemon)")
    return {"volume": volume, **s}


def _points(data_dir: Path, volume: str) -> tuple[list[Point], int]:
    info = find_volume(data_dir, volume)
    if read_policy(info.path) is None:
        raise CdpError(f"volume {volume} keeps no history here (no cdp.window)")
    bases = bases_of(info.path)
    if not bases:
        raise CdpError(f"volume {volume} holds no history yet (no write since its "
                       "window was set)")
    floor = bases[0].mark_seq
    return points(info.path, floor + 1, is_replica(info)), floor


def export(data_dir: Path, volume: str, at: str | None = None, seq: int | None = None,
           before_last_flush: bool = False) -> dict[str, Any]:
    """Resolve a point and export it: ``--at`` names the instant (resolved, when a
    client opens it, to the last FLUSH point at or before it), ``--seq`` and
    ``--before-last-flush`` a journal seq."""
    if sum(x is not None and x is not False for x in (at, seq, before_last_flush)) != 1:
        raise CdpError("name exactly one of --at, --seq, --before-last-flush")
    pts, floor = _points(data_dir, volume)
    if at is not None:
        t = parse_instant(at)
        point = resolve(pts, "at", t, floor)
        name = f"{volume}@{format_instant(t)}"
    elif seq is not None:
        point = resolve(pts, "seq", seq, floor)
        name = f"{volume}@seq-{point.seq}"
    else:
        point = resolve(pts, "before-last-flush", 0, floor)
        name = f"{volume}@seq-{point.seq}"
    info = find_volume(data_dir, volume)
    write_exports(info.path, [*read_exports(info.path), name])
    return {"export": name, "volume": volume, "seq": point.seq,
            "time": format_instant(point.t), "flush": point.flush}


def unexport(data_dir: Path, volume: str, name: str) -> bool:
    """Stop offering point export ``name`` to new clients; False if it was not."""
    info = find_volume(data_dir, volume)
    if "@" not in name:
        name = f"{volume}@{name}"
    names = read_exports(info.path)
    if name not in names:
        return False
    write_exports(info.path, [n for n in names if n != name])
    return True
