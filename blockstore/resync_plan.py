"""What a resync of one peer must send, decided at the handshake from what this node's
files say: the peer's dirty sets (blockstore.peers) and the extents its retained journal
records touched (blockstore.journal).  Read only, apart from deleting the dirty sets of
released records the replica holds already.  The sender (peerlink/sender.py) carries the
plan out; its module docstring says when each kind is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import FormatError
from .journal import retained_extents
from .peers import (
    DIRTY_FULL,
    DIRTY_HOT,
    DIRTY_RELEASED,
    DirtySet,
    covers,
    dirty_shift,
    read_dirty,
    rescale,
)

if TYPE_CHECKING:
    from .volume import VolumeInfo


@dataclass(frozen=True)
class ResyncPlan:
    """What a resync sends (extents of 2^shift bytes) and the dirty sets it settles."""

    kind: str  # "full" or "dirty"
    shift: int
    extents: list[int]
    settles: list[Path]
    why: str
    raced: bool = False  # the journal was released while planning: plan again


def plan_resync(info: VolumeInfo, peer: str, applied: int, first: int, last: int
                ) -> ResyncPlan | None:
    """Decide at the handshake whether peer ``peer``, which has applied through
    ``applied``, needs a resync before streaming from ``last + 1``, and of what
    (peerlink/sender.py's module docstring).  None: stream from ``applied + 1``.  Deletes
    released-record sets the replica no longer needs (it holds their records)."""
    live: list[DirtySet] = []
    for d in read_dirty(info, peer):
        if d.reason == DIRTY_RELEASED and d.through_seq <= applied:
            d.path.unlink(missing_ok=True)
        else:
            live.append(d)
    hot = [d.through_seq for d in live if d.reason == DIRTY_HOT]
    if hot and applied > min(hot):
        # The peer applied records past where this journal ended when it recovered from
        # an unclean stop: records shipped before they were durable here, and lost (a
        # power cut).  Its seqs past that point name other writes now: plan as if it
        # stood there, so the records since are resynced as extents, not skipped.
        applied = min(hot)
    gap = applied + 1 < first
    if not gap and not live:
        return None
    settles = [d.path for d in live]
    full = ResyncPlan("full", info.extent_shift,
                      list(range(((info.size - 1) >> info.extent_shift) + 1)), settles, "")
    if any(d.reason == DIRTY_FULL for d in live):
        return ResyncPlan(full.kind, full.shift, full.extents, settles,
                          "an operator asked for a full resync")
    if gap and not covers(live, applied, first):
        why = (f"records {applied + 1}..{first - 1} were released and no dirty set of "
               f"peer {peer!r} accounts for all of them")
        return ResyncPlan(full.kind, full.shift, full.extents, settles, why)
    shift = min([dirty_shift(info.size)] + [d.extent_shift for d in live])
    extents: set[int] = set()
    for d in live:
        extents |= rescale(d.extents, d.extent_shift, shift, info.size)
    try:
        extents |= retained_extents(info.path / "journal", max(applied + 1, first), last,
                                    shift)
    except (FormatError, FileNotFoundError) as e:
        return ResyncPlan(full.kind, full.shift, full.extents, settles,
                          f"the retained records could not be read ({e})", raced=True)
    reasons = sorted({d.reason for d in live})
    return ResyncPlan("dirty", shift, sorted(extents), settles,
                      f"{len(live)} dirty set(s) ({', '.join(reasons)})"
                      + (f", records {applied + 1}..{first - 1} released" if gap else ""))
