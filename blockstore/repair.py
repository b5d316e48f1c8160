"""Operator-chosen journal repair: cut the journal at its first bad record.

Nothing is deleted: the bad record and everything after it (the rest of its segment and
every later segment) are moved to ``journal/quarantine-<time>/``.  Records after the cut
may already be in the store, so the volume is marked for a full resync to its peers, and
the state is set so that the next open replays the surviving journal from the checkpoint.
"""

from __future__ import annotations

import os
import time
import uuid

from .errors import FormatError, JournalCorrupt
from .journal import Journal
from .meta import fsync_dir, read_json, write_json
from .modes import make_dir, write_file
from .record import REC_HEADER_SIZE, SEG_HEADER_SIZE
from .volume import STATE_VERSION, VolumeInfo, VolumeLock, add_resync


def _first_bad(journal: Journal) -> tuple[int, int, int]:
    """(segment index, byte offset, last good seq) of the first bad record, or -1 index."""
    segs = journal._list()
    journal.segments = segs
    last = segs[0].first_seq - 1
    for i, seg in enumerate(segs):
        try:
            journal._check_segment_header(seg)
        except JournalCorrupt:
            return i, 0, last
        fd = os.open(seg.path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            pos = SEG_HEADER_SIZE
            while pos < size:
                try:
                    hdr, _ = journal._read_record(fd, pos, last + 1)
                except FormatError:
                    return i, pos, last
                last = hdr.seq
                pos += REC_HEADER_SIZE + hdr.payload_len
        finally:
            os.close(fd)
        if i + 1 < len(segs) and segs[i + 1].first_seq != last + 1:
            return i + 1, 0, last
    return -1, 0, last


def repair_journal(info: VolumeInfo) -> str:
    lock = VolumeLock(info)
    try:
        jdir = info.path / "journal"
        journal = Journal(jdir, uuid.UUID(info.uuid).bytes, info.volume_id)
        idx, offset, last_good = _first_bad(journal)
        if idx < 0:
            return f"journal of {info.name} has no bad record (last seq {last_good}); nothing to do"
        qdir = jdir / f"quarantine-{time.strftime('%Y%m%dT%H%M%S')}"
        make_dir(qdir)
        segs = journal.segments
        bad = segs[idx]
        moved = []
        if offset > 0:
            with open(bad.path, "r+b") as f:
                f.seek(offset)
                rest = f.read()
                write_file(qdir / f"{bad.path.name}.from-{offset}", rest, data=True)
                f.truncate(offset)
                os.fsync(f.fileno())
            moved.append(f"{bad.path.name} from offset {offset}")
            later = segs[idx + 1:]
        else:
            later = segs[idx:]
        for seg in later:
            os.rename(seg.path, qdir / seg.path.name)
            moved.append(seg.path.name)
        if not (offset > 0 or idx > 0):
            # The very first segment was unreadable: start an empty one after last_good.
            Journal(jdir, uuid.UUID(info.uuid).bytes)._new_segment(last_good + 1)
        fsync_dir(jdir)
        state_path = info.path / "state.json"
        state = read_json(state_path, "state", STATE_VERSION)
        state["clean"] = False
        state["checkpoint_seq"] = min(int(state["checkpoint_seq"]), last_good)
        state["last_seq"] = last_good
        write_json(state_path, state)
        add_resync(info, [], f"journal repaired at seq {last_good}", full=True)
        return (f"journal of {info.name} cut after seq {last_good}; moved to {qdir}: "
                + ", ".join(moved) + "; volume marked for a full resync to its peers")
    finally:
        lock.release()


__all__ = ["repair_journal"]
