"""What MARK records of the journal say (their msgpack bodies carry an ``event``): a
replicated batch's commit, snapshots created, deleted and rolled back to, a grow.  Each
is redone in order on recovery and on every replica (blockstore/volume.py)."""

from __future__ import annotations

from typing import Any

import msgpack

COMMIT_EVENT = "peerlink-commit"  # closes a replicated batch on a replica
SNAP_EVENT = "snapshot"  # snapshots (see snapshot.py)
SNAP_DELETE_EVENT = "snapshot-delete"
GROW_EVENT = "grow"  # the volume grows to {"size"} from this record on
SNAP_ROLLBACK_EVENT = "snapshot-rollback"
TIME_EVENT = "time"  # CDP: the time index ({"t": unix ns, "flush": a consistency point})

# A batch from upstream as a replica applies it: (first_seq, last_seq, records as (op,
# flags, offset, length, data), metadata for its commit MARK).
UpstreamBatch = tuple[int, int, list[tuple[int, int, int, int, bytes]], dict[str, Any] | None]


def grow_size(payload: bytes | memoryview) -> int | None:
    """The size a grow MARK's body sets (None: another kind of MARK)."""
    try:
        body = msgpack.unpackb(payload)
    except (ValueError, msgpack.ExtraData):
        return None
    if isinstance(body, dict) and body.get("event") == GROW_EVENT:
        return int(body["size"])
    return None
