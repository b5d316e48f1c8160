"""`nbdgw clone create`: the checks before blockstore/clone.py makes a clone."""

from __future__ import annotations

from pathlib import Path

from blockstore.clone import CloneError, CloneInfo, create_clone
from blockstore.errors import VolumeNotFound
from blockstore.snapshot import read_index
from blockstore.volume import find_volume, validate_name


def create(data_dir: Path, source: str, name: str) -> CloneInfo:
    """A clone ``name`` of ``VOLUME@SNAPSHOT`` (a primary's or a replica's snapshot)."""
    volume, sep, snap = source.partition("@")
    if not sep or not volume or not snap:
        raise CloneError(f"expected VOLUME@SNAPSHOT, got {source!r}")
    validate_name(name)
    info = find_volume(data_dir, volume)
    try:
        _shift, index = read_index(info.path / "snapshots" / "index")
    except FileNotFoundError:
        raise CloneError(f"volume {volume} has no snapshots") from None
    if snap not in index.by_name:
        raise CloneError(f"volume {volume} has no snapshot named {snap!r}")
    try:
        find_volume(data_dir, name)
    except VolumeNotFound:
        pass
    else:
        raise CloneError(f"a volume named {name} exists (clones and volumes share the "
                         "export names)")
    return create_clone(data_dir, name, volume, snap, info.size)
