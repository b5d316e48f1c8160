"""`nbdgw clone create`: the checks before blockstore/clone.py makes a clone, of a
snapshot or of a CDP point (the point's history pinned for as long as the clone
exists: blockstore/cdp.py ``add_pin``)."""

from __future__ import annotations

from pathlib import Path

from blockstore.cdp import CdpError, add_pin, bases_of, is_point_name
from blockstore.clone import CloneError, CloneInfo, create_clone, delete_clone, pin_owner
from blockstore.errors import VolumeNotFound
from blockstore.snapshot import read_index
from blockstore.volume import VolumeInfo, find_volume, validate_name

from .cdp import export_point


def create(data_dir: Path, source: str, name: str, at: str | None = None,
           seq: int | None = None, before_last_flush: bool = False) -> CloneInfo:
    """A clone ``name`` of ``VOLUME@SNAPSHOT`` or ``VOLUME@<point>`` (``seq-N`` or an
    instant as `nbdgw cdp export` prints it), or of ``VOLUME`` at the point the options
    name, on a primary or a replica."""
    volume, sep, snap = source.partition("@")
    by_option = at is not None or seq is not None or before_last_flush
    if not volume or (sep and not snap) or (not sep and not by_option) or (
            sep and by_option):
        raise CloneError(f"expected VOLUME@SNAPSHOT, VOLUME@POINT, or VOLUME with one of "
                         f"--at, --seq, --before-last-flush; got {source!r}")
    validate_name(name)
    info = find_volume(data_dir, volume)
    try:
        find_volume(data_dir, name)
    except VolumeNotFound:
        pass
    else:
        raise CloneError(f"a volume named {name} exists (clones and volumes share the "
                         "export names)")
    if by_option or is_point_name(snap):
        return _create_of_point(data_dir, info, name, snap, at, seq, before_last_flush)
    try:
        _shift, index = read_index(info.path / "snapshots" / "index")
    except FileNotFoundError:
        raise CloneError(f"volume {volume} has no snapshots") from None
    if snap not in index.by_name:
        raise CloneError(f"volume {volume} has no snapshot named {snap!r}")
    return create_clone(data_dir, name, volume, snap, info.size)


def _create_of_point(data_dir: Path, info: VolumeInfo, name: str, point: str,
                     at: str | None, seq: int | None, before_last_flush: bool
                     ) -> CloneInfo:
    """The point resolved once, here (its seq is what the clone reads, whatever newer
    points a replica receives later), its base pinned for the clone."""
    if point:
        if point.startswith("seq-"):
            seq = int(point[4:])
        else:
            at = point
    p = export_point(data_dir, info.name, at, seq, before_last_flush)
    bases = [b for b in bases_of(info.path) if b.mark_seq <= p["seq"]]
    if not bases:
        raise CdpError(f"point seq {p['seq']} of {info.name} is older than the window")
    base = bases[-1]
    label = point or f"seq-{p['seq']}"
    clone = create_clone(data_dir, name, info.name, label, info.size,
                         point=(p["seq"], base.id))
    try:  # after clone.json exists: the pin holds while it does
        add_pin(info.path, pin_owner(name), base.id, p["seq"],
                str((clone.path / "clone.json").relative_to(data_dir)))
    except BaseException:
        delete_clone(data_dir, name)
        raise
    return clone
