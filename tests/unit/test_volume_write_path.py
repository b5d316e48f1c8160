"""How the bytes of a write reach the store and the journal (the request path of issue 18):
writes at odd offsets and of odd lengths, across folio pieces (FOLIO_CHUNK), extents,
journal segments and both append paths (inline, and the writer thread for payloads of
PARALLEL_MIN and more), checked three ways: read back, record by record in the journal,
and replayed in full into an emptied store after a simulated crash.  A wrong offset,
length or CRC anywhere on the path fails one of them."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from blockstore.journal import PARALLEL_MIN
from blockstore.record import Op
from blockstore.store import FOLIO_CHUNK, Store
from blockstore.volume import Volume, create_volume

MiB = 1 << 20
SIZE = 16 * MiB
EXT = 4 * MiB  # the activity log's extents
SEGMENT = 2 * MiB + 4096  # a rotation every few large writes, at no aligned offset
LENGTHS = (1, 511, 4095, 4097, PARALLEL_MIN - 1, PARALLEL_MIN, PARALLEL_MIN + 3,
           FOLIO_CHUNK + 1, 3 * FOLIO_CHUNK + 5, MiB + 17)
# Offsets just before a folio piece, an extent and the end of the volume: every write
# crosses one of the boundaries where the store and journal writes are cut in pieces.
ANCHORS = (FOLIO_CHUNK, 3 * FOLIO_CHUNK, EXT, 2 * EXT + FOLIO_CHUNK, SIZE)


def plan(seed: int, n: int) -> list[tuple[int, bytes]]:
    rnd = random.Random(seed)  # noqa: S311 - replayable by seed
    out = []
    for i in range(n):
        length = LENGTHS[i % len(LENGTHS)]
        anchor = ANCHORS[rnd.randrange(len(ANCHORS))]
        offset = max(0, min(anchor - rnd.randrange(1, 4096) * 2 + 1, SIZE - length))
        out.append((offset, rnd.randbytes(length)))
    return out


def read_all(vol: Volume) -> bytes:
    buf = bytearray(SIZE)
    vol.read_into(buf, 0)
    return bytes(buf)


def crash(vol: Volume) -> None:
    """kill -9: nothing written on the way out (as test_volume.crash)."""
    assert vol.checkpointer is not None
    vol.checkpointer.stop()
    vol._close_files()
    vol.lock.release()


@pytest.mark.parametrize("seed", [1, 2])
def test_odd_writes_read_back_journal_and_replay_exactly(tmp_path: Path, seed: int) -> None:
    vdir = create_volume(tmp_path, "v", SIZE).path
    vol = Volume.open(tmp_path, "v", segment_bytes=SEGMENT)
    model = bytearray(SIZE)
    writes = plan(seed, 40)
    first = vol.last_seq + 1
    for offset, data in writes:
        vol.write(memoryview(data), offset)  # as nbdkit passes it: a view, no copy
        model[offset:offset + len(data)] = data
    assert read_all(vol) == model
    assert len(vol.journal.segments) > 3  # type: ignore[union-attr]  (spans rotations)

    # The journal holds each write as one record: its range and its bytes (CRC checked).
    assert vol.journal is not None
    recs = [(h, p) for h, p in vol.journal.records(first) if h.op is Op.WRITE]
    assert [(h.offset, h.length, p) for h, p in recs] == [
        (o, len(d), d) for o, d in writes]
    last = vol.last_seq
    crash(vol)

    # Redo from the very first record into an emptied store rebuilds the same bytes.
    state = json.loads((vdir / "state.json").read_text())
    state["checkpoint_seq"] = first - 1
    (vdir / "state.json").write_text(json.dumps(state))
    os.truncate(vdir / "store", 0)
    os.truncate(vdir / "store", SIZE)
    vol2 = Volume.open(tmp_path, "v", segment_bytes=SEGMENT)
    assert vol2.recovery.replayed == last - first + 1
    assert read_all(vol2) == model
    vol2.close()


def test_each_rotation_starts_the_store_writeback(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint thread starts the store's writeback at each journal rotation, so
    the checkpoint's fdatasync has one segment's worth of dirty pages to wait for."""
    started: list[int] = []
    monkeypatch.setattr(Store, "start_writeback", lambda self: started.append(self.fd))
    create_volume(tmp_path, "v", SIZE)
    vol = Volume.open(tmp_path, "v", segment_bytes=SEGMENT)
    for i in range(3 * SEGMENT // MiB):
        vol.write(bytes([i]) * MiB, i * MiB % SIZE)
    assert vol.journal is not None and len(vol.journal.segments) >= 3
    store_fd = vol.store.fd if vol.store is not None else -1
    vol.close()  # joins the checkpoint thread
    assert started and set(started) == {store_fd}
