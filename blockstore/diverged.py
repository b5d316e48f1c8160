"""What a copy had that the rest of the cluster lacks: ``volumes/<V>/diverged.json``.

When a former primary is demoted (its unshipped writes kept as snapshot
``diverged-<gen>``), or a replica on the losing side of a fork takes the winner's data
(what only it had kept the same way), the writes the new primary lacks are counted from
the journal: the data records (WRITE, TRIM, ZERO) after the new primary's acknowledged
seq, or since this copy's own generation after the fork began, and the bytes they
covered.  When that cannot be told (the peer never acknowledged anything, the records
were released, the generation was started on another node) the count is None and
``unknown`` says why.  ``nbdgw status`` and the metrics show each entry next to the
snapshot that keeps the data.

File: ``kind: diverged``, ``version: 1``, ``entries``: a list of {snapshot, records,
bytes, unknown, from_seq, through_seq, new_primary, basis, at}, one per snapshot (a
repeated demotion or handshake rewrites its snapshot's entry, never duplicates it).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .errors import FormatError
from .journal import count_writes
from .meta import read_json, write_json

if TYPE_CHECKING:
    from .volume import VolumeInfo

DIVERGED_FILE = "diverged.json"
DIVERGED_KIND = "diverged"
DIVERGED_VERSION = 1


def lost_writes(info: VolumeInfo, *, snapshot: str, new_primary: str, from_seq: int | None,
                through_seq: int, unknown: str | None = None, basis: str = "") -> dict[str, Any]:
    """The entry for ``snapshot``: this copy's writes ``from_seq..through_seq`` that
    ``new_primary`` lacks, counted (or ``unknown`` and why)."""
    records: int | None = None
    nbytes: int | None = None
    if unknown is None and from_seq is not None:
        try:
            records, nbytes = count_writes(info.path / "journal", from_seq, through_seq)
        except FileNotFoundError as e:
            unknown = str(e)
        except FormatError as e:
            unknown = f"the journal could not be read ({e})"
    return {"snapshot": snapshot, "records": records, "bytes": nbytes,
            "unknown": unknown if records is None else None, "from_seq": from_seq,
            "through_seq": through_seq, "new_primary": new_primary,
            "basis": basis or (f"records after the last one {new_primary} acknowledged"
                               if from_seq is not None else ""),
            "at": time.time()}


def read_diverged(info: VolumeInfo) -> list[dict[str, Any]]:
    path = info.path / DIVERGED_FILE
    if not path.exists():
        return []
    return list(read_json(path, DIVERGED_KIND, DIVERGED_VERSION)["entries"])


def record_diverged(info: VolumeInfo, entry: dict[str, Any], keep_known: bool = False
                    ) -> dict[str, Any]:
    """Write ``entry`` in place of its snapshot's earlier one (if any) and return the
    entry kept.  ``keep_known``: an earlier entry with a count stays when this one has
    none (a repeated demotion after the peer files went, or a fork resolved on a copy
    whose demotion counted already)."""
    entries = read_diverged(info)
    old = next((e for e in entries if e["snapshot"] == entry["snapshot"]), None)
    if old is not None and (keep_known or entry["records"] is None) and \
            old["records"] is not None:
        return old
    kept = [e for e in entries if e["snapshot"] != entry["snapshot"]] + [entry]
    write_json(info.path / DIVERGED_FILE, {"kind": DIVERGED_KIND,
                                           "version": DIVERGED_VERSION, "entries": kept})
    return entry
