"""Rejoin and split brain (DESIGN.md §5): what a former primary holds that the new primary
lacks, and the record a split brain leaves for the operator.

A primary that learns of a newer primary becomes STALE.  If it was fenced or down when
the other was promoted (an automatic failover, a DR promotion after the main site was
lost), the writes it may have taken that never reached the new primary are the tail an
asynchronous link had not shipped: they are kept as a ``diverged-<generation>`` snapshot
(counted in ``diverged.json``) and the node rejoins as a replica, Inconsistent until its
resync from the new primary completes (``blockstore.roles.demote_volume``).  If it was still
*serving* when it learned of the other primary (a forced promotion while it was alive),
and it holds writes the new primary never acknowledged, both sides took writes: split
brain.  Nothing is synced automatically; ``<data_dir>/split-brain.json`` says who has
what since when, `nbdgw status` shows it, and `nbdgw resolve --discard NODE` settles it.

Peerlink finds split brains too: a link whose histories share no generation, or forked
on one epoch, is refused by both ends and kept in ``peers/<peer>.refused.json`` (status
shows it with the commands that settle it).  ``refused_split_brain`` gathers those in
``record_split_brain``'s form, for the daemon to record so that `nbdgw resolve` takes it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from blockstore.errors import FormatError
from blockstore.journal import journal_bounds, last_write_time, retained_extents
from blockstore.meta import read_json, write_json
from blockstore.peers import covers, dirty_shift, known_peers, read_dirty, read_refused, rescale
from blockstore.volume import VolumeInfo, list_volumes, read_resync

SPLIT_FILE = "split-brain.json"
SPLIT_KIND = "split-brain"
SPLIT_VERSION = 1


def unshipped(info: VolumeInfo, peer: str) -> str | None:
    """Why ``peer`` may lack writes of this primary volume (None: it acknowledged every
    record, and no dirty extents wait for it)."""
    acked = known_peers(info).get(peer)
    if acked is None:
        return f"{peer} never acknowledged anything of it"
    _, last = journal_bounds(info.path / "journal")
    if last > acked:
        return f"records {acked + 1}..{last} were never acknowledged by {peer}"
    dirty = read_dirty(info, peer)
    if dirty:
        return (f"{sum(len(d.extents) for d in dirty)} extents wait to be resynced to "
                f"{peer} ({', '.join(sorted({d.reason for d in dirty}))})")
    return None


def changed_extents(info: VolumeInfo, peer: str) -> tuple[int, list[int]] | None:
    """The extents (64 KiB, coarser above 64 GiB) of this primary volume that ``peer``
    may lack: those its unacknowledged records touched, its dirty sets for ``peer``
    (released records, hot extents of an unclean stop, verify) and resync.json.  The
    demoted primary hands them to the new primary, which compares only these and its own
    changes instead of the whole volume.  None when that cannot be told (``peer`` never
    acknowledged anything, records were released uncovered, a full resync is owed)."""
    acked = known_peers(info).get(peer)
    res = read_resync(info)
    if acked is None or res["full"]:
        return None
    shift = dirty_shift(info.size)
    try:
        first, last = journal_bounds(info.path / "journal")
        sets = read_dirty(info, peer)
        if acked + 1 < first and not covers(sets, acked, first):
            return None
        out = retained_extents(info.path / "journal", max(acked + 1, first), last, shift)
    except (FormatError, FileNotFoundError):
        return None
    for d_shift, extents in [(d.extent_shift, d.extents) for d in sets] + [
            (int(res["extent_shift"]), tuple(res["extents"]))]:
        out |= rescale(extents, d_shift, shift, info.size)
    return shift, sorted(out)


def last_write(info: VolumeInfo) -> float | None:
    """When this volume's journal last changed (the newest segment's mtime)."""
    return last_write_time(info.path / "journal")


def record_split_brain(data_dir: Path, *, me: str, my_epoch: int, other: str,
                       other_epoch: int, volumes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rec = {"kind": SPLIT_KIND, "version": SPLIT_VERSION, "detected": time.time(),
           "node": me, "epoch": my_epoch, "other_node": other, "other_epoch": other_epoch,
           "volumes": volumes}
    write_json(data_dir / SPLIT_FILE, rec)
    return rec


def split_brain(data_dir: Path) -> dict[str, Any] | None:
    path = data_dir / SPLIT_FILE
    return read_json(path, SPLIT_KIND, SPLIT_VERSION) if path.exists() else None


def clear_split_brain(data_dir: Path) -> None:
    (data_dir / SPLIT_FILE).unlink(missing_ok=True)


def refused_split_brain(data_dir: Path) -> tuple[str, dict[str, dict[str, Any]]] | None:
    """A split brain peerlink refused on a link of this node (either end): the other
    node and, per volume, {"why": the refusal, "last_write"}, as ``record_split_brain``
    takes them.  None when no link is refused for one.  With several peers (unlikely:
    two other primaries), the one refused first."""
    found: dict[str, tuple[float, dict[str, dict[str, Any]]]] = {}
    for info in list_volumes(data_dir):
        for peer, rec in read_refused(info).items():
            if not rec.get("split_brain"):
                continue
            since, vols = found.get(peer, (float(rec["since"]), {}))
            vols[info.name] = {"why": rec["reason"], "last_write": last_write(info)}
            found[peer] = (min(since, float(rec["since"])), vols)
    if not found:
        return None
    peer = min(found, key=lambda p: found[p][0])
    return peer, found[peer][1]
