"""A volume's role changes (DESIGN.md §5): a replica promoted to primary on a new
generation, a primary renewing its generation (a resolved split brain), a primary demoted
to a replica of the node that took over, keeping what only it had as a diverged
snapshot.  Each opens the volume (the caller has stopped whatever held it), changes its
role durably and closes it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .diverged import lost_writes, record_diverged
from .errors import InvalidArgument
from .generations import Generation, diverged_name, load_history, new_generation, save_history
from .meta import read_json, write_json
from .peers import (
    ADOPT_KEY,
    CHANGED_KEY,
    UPSTREAM_FILE,
    UPSTREAM_KIND,
    UPSTREAM_VERSION,
    known_peers,
    read_dirty,
    upstream_record,
)
from .volume import Volume, VolumeInfo


def promote_volume(data_dir: Path, name: str, epoch: int | None = None) -> Generation:
    """Make replica ``name`` a primary volume that starts a new generation (DESIGN.md §5),
    recorded at failover epoch ``epoch`` (the epoch this node is promoted to).

    The caller has stopped its receiver (the volume lock is free): the last complete
    batch is in the store (redo finishes a committed one on open).  An Inconsistent
    replica (its initial sync, a resync, or a demoted primary's resync from its successor
    never completed) is refused: its store is not any state the primary ever had.
    ``epoch`` None (callers that predate epochs): one above the newest epoch of the
    history, which orders the generation after its own past but not against a fork made
    elsewhere meanwhile (``fork_winner``).  Returns the new generation."""
    vol = Volume.open(data_dir, name)
    try:
        if not vol.replica:
            raise InvalidArgument(f"volume {name} is not a replica: nothing to promote")
        if vol.inconsistent:
            raise InvalidArgument(_inconsistent_why(vol))
        gen = _start_generation(vol, epoch)
        vol.replica = False
        return gen
    finally:
        vol.close()


def _inconsistent_why(vol: Volume) -> str:
    path = vol.info.path / UPSTREAM_FILE
    up = read_json(path, UPSTREAM_KIND, UPSTREAM_VERSION) if path.exists() else {}
    if up.get("demoted"):
        return (f"volume {vol.name} is Inconsistent: it was demoted from primary and its "
                f"resync from {up.get('upstream_node')} has not completed, so it may hold "
                "writes the other copies never had; it cannot be promoted until then")
    return (f"volume {vol.name} is Inconsistent (its sync from the primary never "
            "completed): it can never be promoted")


def _start_generation(vol: Volume, epoch: int | None) -> Generation:
    old = load_history(vol.info.path, vol.info.uuid)
    if epoch is None:
        epoch = max(g.epoch for g in old.generations) + 1
    history = new_generation(old, vol.last_seq + 1, epoch)
    # The history first: a crash before the state flips leaves a replica with one
    # generation too many, which a repeated promotion simply extends.
    save_history(vol.info.path, history)
    # Snapshot ids of the new generation start past any the old primary may have used
    # after the fork (a demoted primary keeps its own, e.g. diverged-<gen>): a replica
    # takes a snapshot MARK only when its id is above every id it has seen.
    snaps = vol._snapshots()
    snaps.skip(snaps.index.next_id + SNAP_ID_GAP - 1)
    return history.current


def renew_generation(data_dir: Path, name: str, epoch: int | None = None) -> Generation:
    """A primary volume starts a new generation where it stands, at failover epoch
    ``epoch`` (None: as in ``promote_volume``): the side of a split brain an operator
    keeps (`nbdgw resolve --discard OTHER`) serves on a history newer than both, so that
    the other side's replicas take its data."""
    vol = Volume.open(data_dir, name)
    try:
        if vol.replica:
            raise InvalidArgument(f"volume {name} is a replica: promote it instead")
        return _start_generation(vol, epoch)
    finally:
        vol.close()


SNAP_ID_GAP = 1 << 16  # snapshot ids reserved for the old primary at each promotion


def demote_volume(data_dir: Path, name: str, new_primary: str, preserve: bool = True,
                  adopt: bool = False,
                  changed: Callable[[VolumeInfo], tuple[int, list[int]] | None] | None = None
                  ) -> str | None:
    """Make primary volume ``name`` a replica of ``new_primary`` (DESIGN.md §5): this node was
    primary, another node now serves a newer generation.  Writes this node took that may not
    have reached ``new_primary`` (records it never acknowledged, dirty sets, hot extents of
    an unclean stop) are preserved as snapshot ``diverged-<generation>`` first, when
    ``preserve``, with how many records (and bytes) of them ``new_primary`` lacks in
    ``diverged.json``; then the replica keeps its generation history and logical uuid, and
    the next sender from the newer generation compares digests and resyncs what differs.  It
    is Inconsistent (never promotable) until that resync completes, except after a
    switchover drain (``preserve`` False: every record was acknowledged, so the store is a
    prefix of the new primary's history).  ``adopt``: an operator resolved a split brain
    against this node, so its replica takes ``new_primary``'s data although the histories
    are unrelated (once: until that resync ends).  ``changed(info)``, called after recovery:
    the extents this node changed that ``new_primary`` may lack (None: unknown), kept with
    the binding for the first resync from ``new_primary`` (PROTOCOL.md, compare resync).
    The caller holds no lock on it (nbdkit is stopped).  Returns the snapshot's name, or
    None when nothing needed preserving."""
    vol = Volume.open(data_dir, name)  # an unclean stop is recovered here (hot extents)
    try:
        if vol.replica:
            return None  # demoted already (a crash after the flip)
        history = load_history(vol.info.path, vol.info.uuid)
        acked = known_peers(vol.info).get(new_primary)
        unshipped = (acked is None or vol.last_seq > acked
                     or bool(read_dirty(vol.info, new_primary)))
        snap_name = None
        if preserve and unshipped:
            through = vol.last_seq
            snap_name = diverged_name(history.current.gen_id)
            if vol.snaps is None or snap_name not in vol.snaps.index.by_name:
                vol.snapshot_create(snap_name)
            # What of it the new primary lacks, for status and metrics (DESIGN.md §5): the
            # records after its ack.  Before the peer files go below.
            record_diverged(vol.info, lost_writes(
                vol.info, snapshot=snap_name, new_primary=new_primary,
                from_seq=None if acked is None else acked + 1, through_seq=through,
                unknown=(f"{new_primary} never acknowledged anything of this volume"
                         if acked is None else None)))
        since = changed(vol.info) if changed is not None else None
        save_history(vol.info.path, history)  # explicit: the logical uuid stays this one
        write_json(vol.info.path / UPSTREAM_FILE, upstream_record(
            history.logical_uuid, new_primary, demoted=True,
            **({ADOPT_KEY: new_primary} if adopt else {}),
            **({CHANGED_KEY: {"peer": new_primary, "generation": history.current.gen_id,
                              "extent_shift": since[0], "extents": since[1]}}
               if since is not None else {})))
        # As a primary it tracked what its peers lacked; none of that means anything now
        # that it follows another node (the sender from there compares digests).
        pdir = vol.info.path / "peers"
        if pdir.is_dir():
            for f in pdir.iterdir():
                f.unlink(missing_ok=True)
        vol.replica = True
        # Inconsistent until the resync from the new primary completes: its store may
        # hold writes no other copy has, so it is no state the new primary ever had and
        # must never be promoted as it is.  After a switchover drain (not ``preserve``)
        # the new primary acknowledged every record: the store is an exact prefix of its
        # history, Consistent.
        vol.inconsistent = preserve
        vol.upstream_seq = 0
        vol.checkpoint()
        return snap_name
    finally:
        vol.close()
