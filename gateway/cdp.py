"""CDP for the CLI, `nbdgw serve` and the daemon (blockstore/cdp.py, DESIGN.md "CDP"):
the config's windows written where every opener of a volume reads them, the window
shown, points named and exported.

Everything here reads the volume's files as they are (the journal's headers, the bases'
index), so it works on served volumes and on replicas alike; the serving nbdkit process
opens the views (nbd_plugin/points.py)."""

from __future__ import annotations

import time
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
from blockstore.cdp import restore as blockstore_restore
from blockstore.cdp import restore_group as blockstore_restore_group
from blockstore.errors import VolumeInUse
from blockstore.volume import Volume, find_volume, is_replica, list_volumes
from nbdgw_common.control_socket import ControlError, request

from .config import NodeConfig
from .snapshots import _open_all as open_all

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
    point = export_point(data_dir, volume, at, seq, before_last_flush)
    name = (f"{volume}@{format_instant(parse_instant(at))}" if at is not None
            else f"{volume}@seq-{point['seq']}")
    info = find_volume(data_dir, volume)
    write_exports(info.path, [*read_exports(info.path), name])
    return {"export": name, **point}


def export_point(data_dir: Path, volume: str, at: str | None, seq: int | None,
                 before_last_flush: bool) -> dict[str, Any]:
    """The point the options name (what ``export`` would serve), not exported."""
    if sum(x is not None and x is not False for x in (at, seq, before_last_flush)) != 1:
        raise CdpError("name exactly one of --at, --seq, --before-last-flush")
    pts, floor = _points(data_dir, volume)
    if at is not None:
        point = resolve(pts, "at", parse_instant(at), floor)
    elif seq is not None:
        point = resolve(pts, "seq", seq, floor)
    else:
        point = resolve(pts, "before-last-flush", 0, floor)
    return {"volume": volume, "seq": point.seq, "time": format_instant(point.t),
            "flush": point.flush}


def restore(data_dir: Path, volume: str, at: str | None = None, seq: int | None = None,
            before_last_flush: bool = False, snapshot: str | None = None
            ) -> dict[str, Any]:
    """Roll the live volume back to a point (through the journal: replicas follow),
    keeping the state before as a snapshot; on an idle volume here, on a served one
    through its nbdkit process (the control socket)."""
    point = export_point(data_dir, volume, at, seq, before_last_flush)
    snapshot = snapshot or _pre_restore_name()
    try:
        vol = Volume(find_volume(data_dir, volume))
    except VolumeInUse:
        try:
            reply = request(find_volume(data_dir, volume).path,
                            {"op": "cdp-restore", "volume": volume,
                             "point": f"seq-{point['seq']}", "name": snapshot})
        except ControlError as e:
            raise CdpError(str(e)) from None
    else:
        try:
            reply = blockstore_restore(vol, f"seq-{point['seq']}", snapshot)
        finally:
            vol.close()
    return {**point, "snapshot": reply["snapshot"], "bytes_written": reply["bytes_written"]}


def _pre_restore_name() -> str:
    return "pre-restore-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def restore_group(data_dir: Path, volumes: list[str], at: str, snapshot: str | None = None
                  ) -> list[dict[str, Any]]:
    """Roll ``volumes`` (a consistency group of this node: all idle, or all served by
    one nbdgw serve) back to their last FLUSH points at or before instant ``at``, all or
    nothing across a crash (blockstore/cdp.py restore_group); each keeps its state
    before as snapshot ``snapshot``."""
    if len(set(volumes)) != len(volumes):
        raise CdpError("a volume is named twice")
    at_ns = parse_instant(at)
    point = format_instant(at_ns)
    snapshot = snapshot or _pre_restore_name()
    vols = open_all(data_dir, volumes)
    if vols is None:
        try:
            reply = request(find_volume(data_dir, volumes[0]).path,
                            {"op": "cdp-restore", "volumes": volumes, "at": at_ns,
                             "point": point, "name": snapshot})
        except ControlError as e:
            raise CdpError(str(e)) from None
        rows: list[dict[str, Any]] = reply["volumes"]
    else:
        try:
            rows = blockstore_restore_group(vols, at_ns, point, snapshot)
        finally:
            for v in vols:
                v.close()
    return [{**r, "time": point} for r in rows]


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
