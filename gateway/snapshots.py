"""Snapshot operations for the CLI and the scheduler: on an idle volume directly, on a
served one through the serving nbdkit process (nbd_plugin/control.py).

Listing needs neither: the index file is read as it is (an append in progress is a torn
tail and is not shown), so it works on served volumes and on replicas alike.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from blockstore.errors import VolumeInUse
from blockstore.snapshot import list_rows, read_index
from blockstore.volume import Volume, find_volume
from nbd_plugin.control import create_group, snapshot_row
from nbdgw_common.control_socket import ControlError, request
from nbdgw_common.errors import GatewayError


class SnapshotOpError(GatewayError):
    """A snapshot operation was refused or failed (the message says where and why)."""


def _open_all(data_dir: Path, names: list[str]) -> list[Volume] | None:
    """Every volume opened here, or None if they are all in use (served elsewhere)."""
    vols: list[Volume] = []
    busy: list[str] = []
    try:
        for n in names:
            try:
                vols.append(Volume(find_volume(data_dir, n)))
            except VolumeInUse:
                busy.append(n)
    except BaseException:
        for v in vols:
            v.close()
        raise
    if not busy:
        return vols
    for v in vols:
        v.close()
    if vols:
        raise SnapshotOpError(
            f"volumes {', '.join(busy)} are in use and {', '.join(v.name for v in vols)} are "
            "not: a consistency group must be served by one nbdgw serve, or idle")
    return None


def _remote(data_dir: Path, volume: str, req: dict[str, Any]) -> dict[str, Any]:
    try:
        return request(find_volume(data_dir, volume).path, req)
    except ControlError as e:
        raise SnapshotOpError(str(e)) from None


def create(data_dir: Path, volumes: list[str], name: str | None) -> list[dict[str, Any]]:
    """Take snapshot ``name`` of ``volumes`` (several: one consistency group)."""
    if len(set(volumes)) != len(volumes):
        raise SnapshotOpError("a volume is named twice")
    vols = _open_all(data_dir, volumes)
    if vols is None:
        reply = _remote(data_dir, volumes[0], {"op": "create", "volumes": volumes,
                                               "name": name})
        return list(reply["snapshots"])
    try:
        snaps = create_group(vols, name)
        return [snapshot_row(v.name, s) for v, s in zip(vols, snaps, strict=True)]
    finally:
        for v in vols:
            v.close()


def delete(data_dir: Path, volume: str, name: str) -> None:
    vols = _open_all(data_dir, [volume])
    if vols is None:
        _remote(data_dir, volume, {"op": "delete", "volume": volume, "name": name})
        return
    try:
        vols[0].snapshot_delete(name)
    finally:
        vols[0].close()


def rollback(data_dir: Path, volume: str, name: str) -> int:
    """Roll the live volume back to snapshot ``name``; return the bytes written."""
    vols = _open_all(data_dir, [volume])
    if vols is None:
        reply = _remote(data_dir, volume, {"op": "rollback", "volume": volume, "name": name})
        return int(reply["bytes_written"])
    try:
        return vols[0].snapshot_rollback(name)
    finally:
        vols[0].close()


def listing(data_dir: Path, volume: str) -> list[dict[str, Any]]:
    """The volume's snapshots, oldest first (id, name, time, seq, group, held_bytes)."""
    path = find_volume(data_dir, volume).path / "snapshots" / "index"
    with contextlib.suppress(FileNotFoundError):
        shift, index = read_index(path)
        return list_rows(index, shift)
    return []
