"""Per-peer release bookkeeping of a primary volume (DESIGN.md §4): who acked what, and
the extents each lagging peer must be resynced.

Two writers, never of the same file: a peer's sender writes ``peers/<peer>.json`` (its
acked seq); the volume (the nbdkit process) writes immutable ``peers/<peer>.dirty-*.json``
files, each created once, atomically, under a fresh name, before the journal records
they stand for are released.  The sender only reads and deletes dirty files, and deletes
one only after the replica acknowledged a resync that covered it.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import FormatError
from .generations import is_stale_copy
from .meta import read_json, write_json
from .modes import make_dir

if TYPE_CHECKING:
    from .volume import VolumeInfo

PEER_KIND = "peer"  # peers/<peer>.json: written by that peer's sender only
PEER_VERSION = 1
DIRTY_KIND = "peer-dirty"  # peers/<peer>.dirty-*.json: written by the volume only
DIRTY_VERSION = 1
DIRTY_RELEASED = "released"  # records released before the peer acked them
DIRTY_HOT = "unclean restart"  # hot extents found by recovery
DIRTY_VERIFY = "verify"  # extents online verify found differing
DIRTY_UPSTREAM = "upstream resync"  # a replica's extents rewritten by its own resync
DIRTY_FULL = "operator: full resync"  # `nbdgw resync VOLUME --peer P --full` (no extents)
# volumes/<V>/peerlink-upstream.json on a replica: the upstream it is bound to (written
# by its receiver, and by demote_volume when a former primary becomes a replica).
UPSTREAM_FILE = "peerlink-upstream.json"
UPSTREAM_KIND = "peerlink-upstream"
UPSTREAM_VERSION = 1
ADOPT_KEY = "adopt_from"  # take this node's data once, whatever the histories say
CHANGED_KEY = "changed_since_fork"  # a demoted primary's changes its successor may lack
_DIRTY_RE = re.compile(r"^(.+)\.dirty-[0-9a-f]{16}-[0-9a-f]+\.json$")


def dirty_shift(size: int) -> int:
    """Granularity of released-record dirty sets: 64 KiB, coarser for volumes over
    64 GiB so that a set never has more than 2^20 extents (one ResyncExtents frame)."""
    return max(16, (size - 1).bit_length() - 20)


def extent_range(offset: int, length: int, shift: int) -> range:
    """The extents of 2^shift bytes that [offset, offset + length) touches."""
    return range(offset >> shift, ((offset + length - 1) >> shift) + 1)


def rescale(extents: tuple[int, ...] | list[int], shift: int, to_shift: int,
            size: int) -> set[int]:
    """Extents of 2^shift bytes as the extents of 2^to_shift bytes they overlap (within a
    volume of ``size`` bytes: extents past its end are dropped)."""
    out: set[int] = set()
    for e in extents:
        start = e << shift
        if start < size:
            out.update(extent_range(start, min(1 << shift, size - start), to_shift))
    return out


@dataclass(frozen=True)
class DirtySet:
    """Extents one peer must be resynced.  ``reason`` DIRTY_RELEASED: the journal records
    ``from_seq..through_seq`` were released before the peer acked them and these are the
    extents they touched; DIRTY_HOT: recovery's hot extents (the store may hold bytes no
    record carries), needed whatever the peer holds."""

    path: Path
    reason: str
    from_seq: int
    through_seq: int
    extent_shift: int
    extents: tuple[int, ...]


def known_peers(info: VolumeInfo) -> dict[str, int]:
    """Every peer that has acked something of this volume (this incarnation): name ->
    acked seq.  A peer that never connected has no file: it needs a full sync anyway.  A
    file that cannot be read holds nothing back (its own sender refuses to start on it)."""
    pdir = info.path / "peers"
    out: dict[str, int] = {}
    if not pdir.is_dir():
        return out
    for name in os.listdir(pdir):
        if not name.endswith(".json") or _DIRTY_RE.match(name):
            continue
        try:
            meta = read_json(pdir / name, PEER_KIND, PEER_VERSION)
        except (FormatError, FileNotFoundError):
            continue
        if meta.get("volume_uuid") == info.uuid:
            out[str(meta["peer"])] = int(meta["acked_seq"])
    return out


def write_dirty(info: VolumeInfo, peer: str, *, reason: str, from_seq: int, through_seq: int,
                shift: int, extents: list[int]) -> Path:
    """Create one immutable dirty set for ``peer`` (a fresh name: never overwritten)."""
    pdir = info.path / "peers"
    make_dir(pdir, exist_ok=True)
    path = pdir / f"{peer}.dirty-{through_seq:016x}-{time.time_ns():x}.json"
    write_json(path, {"kind": DIRTY_KIND, "version": DIRTY_VERSION, "peer": peer,
                      "volume_uuid": info.uuid, "reason": reason, "from_seq": from_seq,
                      "through_seq": through_seq, "extent_shift": shift,
                      "extents": sorted(extents), "created": time.time()})
    return path


def read_dirty(info: VolumeInfo, peer: str) -> list[DirtySet]:
    """The dirty sets waiting for ``peer``, ordered by the records they stand for."""
    pdir = info.path / "peers"
    out: list[DirtySet] = []
    if not pdir.is_dir():
        return out
    for name in os.listdir(pdir):
        m = _DIRTY_RE.match(name)
        if not m or m.group(1) != peer:
            continue
        try:
            d = read_json(pdir / name, DIRTY_KIND, DIRTY_VERSION)
        except FileNotFoundError:
            continue  # deleted meanwhile by another sender session
        if d.get("volume_uuid") != info.uuid:
            continue  # a leftover of another incarnation of this volume name
        out.append(DirtySet(pdir / name, str(d["reason"]), int(d["from_seq"]),
                            int(d["through_seq"]), int(d["extent_shift"]),
                            tuple(int(e) for e in d["extents"])))
    out.sort(key=lambda d: (d.from_seq, d.through_seq, d.path.name))
    return out


def covers(sets: list[DirtySet], applied: int, first_retained: int) -> bool:
    """Do the released-record sets account for every record the peer misses between its
    ``applied`` seq and the journal's ``first_retained``?"""
    reach = applied
    for d in sets:
        if d.reason == DIRTY_RELEASED and d.from_seq <= reach + 1:
            reach = max(reach, d.through_seq)
    return reach >= first_retained - 1


def upstream_record(upstream_uuid: str, node: str, **extra: Any) -> dict[str, Any]:
    """The content of a replica's peerlink-upstream.json: bound to ``node``'s volume."""
    return {"kind": UPSTREAM_KIND, "version": UPSTREAM_VERSION,
            "upstream_uuid": upstream_uuid, "upstream_node": node, "bound_at": time.time(),
            **extra}


def set_adopt(info: VolumeInfo, node: str) -> None:
    """Replica: take ``node``'s data at its next resync although the generation histories
    are unrelated (an operator resolved a split brain for ``node``'s side).  The receiver
    must not be running (it keeps the file's content in memory)."""
    path = info.path / UPSTREAM_FILE
    rec = read_json(path, UPSTREAM_KIND, UPSTREAM_VERSION) if path.exists() else None
    if rec is None:
        return  # never bound: a fresh replica takes any sender's data anyway
    write_json(path, {**rec, ADOPT_KEY: node})


# -- refusals a link end could not get past (DESIGN.md §5), for status -------------------------
# peers/<peer>.refused.json, written by the end (sender or receiver) that refused or was
# refused at the handshake for a reason a retry cannot cure (a stale copy, a split
# brain), deleted by the next handshake with that peer that succeeds; a stale copy's
# also once moot (``clear_stale_refusals``).
REFUSED_KIND = "peer-refused"
REFUSED_VERSION = 1
MAX_REFUSED = 16  # files per volume: a receiver records what unauthenticated peers say
_SAFE_PEER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_REFUSED_RE = re.compile(r"^(.+)\.refused\.json$")


def _refused_path(info: VolumeInfo, peer: str) -> Path | None:
    """Where ``peer``'s refusal is kept; None for a name unfit for a file name."""
    if not _SAFE_PEER_RE.match(peer) or ".." in peer:
        return None
    return info.path / "peers" / f"{peer}.refused.json"


def write_refused(info: VolumeInfo, peer: str, *, side: str, by: str, reason: str,
                  split_brain: bool, settle: list[dict[str, str]] | None) -> bool:
    """Record that the link with ``peer`` is refused for ``reason`` (``side``: "sender" or
    "receiver", this node's end; ``by``: "this node" or "peer", who refused).  Keeps the
    first time it happened and counts the attempts; returns False when not recorded (a name
    unfit for a file, or already MAX_REFUSED other peers recorded: bounded whatever a peer
    claims to be)."""
    path = _refused_path(info, peer)
    if path is None:
        return False
    make_dir(path.parent, exist_ok=True)
    old = read_refused(info).get(peer)
    if old is None and len(read_refused(info)) >= MAX_REFUSED:
        return False
    same = old is not None and old["reason"] == reason
    now = time.time()
    write_json(path, {"kind": REFUSED_KIND, "version": REFUSED_VERSION, "peer": peer,
                      "volume_uuid": info.uuid, "side": side, "by": by, "reason": reason,
                      "split_brain": split_brain, "settle": settle,
                      "since": old["since"] if same and old else now, "last": now,
                      "attempts": (int(old["attempts"]) + 1) if same and old else 1})
    return True


def read_refused(info: VolumeInfo) -> dict[str, dict[str, Any]]:
    """Every recorded refusal of this volume's links: peer -> record."""
    pdir = info.path / "peers"
    out: dict[str, dict[str, Any]] = {}
    if not pdir.is_dir():
        return out
    for name in os.listdir(pdir):
        if not _REFUSED_RE.match(name):
            continue
        try:
            rec = read_json(pdir / name, REFUSED_KIND, REFUSED_VERSION)
        except (FormatError, FileNotFoundError):
            continue
        if rec.get("volume_uuid") == info.uuid:
            out[str(rec["peer"])] = rec
    return out


def clear_refused(info: VolumeInfo, peer: str) -> None:
    """A handshake with ``peer`` succeeded: its refusal is history."""
    path = _refused_path(info, peer)
    if path is not None:
        path.unlink(missing_ok=True)


def clear_stale_refusals(info: VolumeInfo, *, primary: str | None = None,
                         quiet_s: float = 0.0, now: float | None = None) -> list[str]:
    """Drop the refusals of stale copies kept for this volume (either end's) that are
    moot; returns the peers whose records went.  A stale copy is a sender on an older
    generation than this replica's, so no primary any more; a refusal this node got as
    a sender came from a generation it has left.  Nobody clears them otherwise: a
    demoted primary does not ship to that peer again.  Kept: split brains, refusals for
    other reasons, the record of ``primary`` (the primary this node follows: a stale
    refusal of it is a real problem), and one whose node tried less than ``quiet_s`` ago
    (while it tries, status says it is refused; one that tries later is recorded again).
    Called by a receiver that took a sender on its generation or a newer one (no
    ``primary``, no quiet time) and by the daemon of a node that follows a primary."""
    t = time.time() if now is None else now
    gone = []
    for peer, rec in read_refused(info).items():
        if rec.get("split_brain") or peer == primary \
                or not is_stale_copy(str(rec.get("reason", ""))) \
                or t - float(rec.get("last", 0.0)) < quiet_s:
            continue
        clear_refused(info, peer)
        gone.append(peer)
    return sorted(gone)
