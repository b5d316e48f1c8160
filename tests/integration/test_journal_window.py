"""kill -9 inside the parallel append's window (DESIGN.md §2): the journal's writer thread
has written a large write's payload, its header is not written yet, the store write
runs on the request thread.  A real process (a Volume in a child python) dies by SIGKILL
at that instant; the reopened volume keeps every write that returned, cuts the torn
tail, and lists the in-flight write's extents as hot (resync.json), so the peers get them
again whichever way its blocks landed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from blockstore.journal import PARALLEL_MIN
from blockstore.volume import Volume, create_volume

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64 << 20
WSIZE = 1 << 20
ACKED = 40  # writes that return before the crash (they rotate 1 MiB segments)
CRASH_AT = 5 * WSIZE + 8192  # the in-flight write: spans extents 1 and 2 (4 MiB each)

CHILD = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from blockstore import journal as journal_mod
from blockstore.volume import Volume

vol = Volume.open(sys.argv[2], "v1", segment_bytes=4 << 20)
for i in range({acked}):
    vol.write(bytes([1 + i % 250]) * {wsize}, (i % 40) * {wsize})
print("acked", vol.last_seq, flush=True)

real = journal_mod._pwrite_all

def die_after_payload(fd, buf, pos):
    real(fd, buf, pos)
    if len(buf) == {wsize}:  # the payload is in the page cache; the header is not
        os.kill(os.getpid(), signal.SIGKILL)

journal_mod._pwrite_all = die_after_payload
vol.write(b"\\xee" * {wsize}, {crash_at})
print("survived", flush=True)
"""


def expected(acked: int) -> bytearray:
    model = bytearray(SIZE)
    for i in range(acked):
        off = (i % 40) * WSIZE
        model[off:off + WSIZE] = bytes([1 + i % 250]) * WSIZE
    return model


@pytest.mark.timeout(60)
def test_kill9_between_payload_and_header(tmp_path: Path) -> None:
    assert WSIZE >= PARALLEL_MIN  # the writes take the parallel path
    data_dir = tmp_path / "data"
    create_volume(data_dir, "v1", SIZE)
    child = CHILD.format(acked=ACKED, wsize=WSIZE, crash_at=CRASH_AT)
    p = subprocess.run([sys.executable, "-c", child, str(ROOT), str(data_dir)],
                       capture_output=True, text=True, timeout=50, check=False)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stdout, p.stderr)
    assert p.stdout.splitlines() == [f"acked {ACKED}"], p.stdout

    vol = Volume.open(data_dir, "v1", segment_bytes=4 << 20)
    try:
        r = vol.recovery
        assert r.unclean is True
        assert r.torn_bytes > 0  # the payload without its header was cut
        # The recovery MARK follows the last acknowledged record: nothing was lost,
        # and the half-written record did not take a seq.
        assert r.last_seq == ACKED + 1
        got = bytearray(SIZE)
        vol.read_into(memoryview(got), 0)
    finally:
        vol.close()
    model = expected(ACKED)
    w0, w1 = CRASH_AT, CRASH_AT + WSIZE
    for blk in range(w0, w1, 4096):  # each block of the in-flight write: old or new
        assert got[blk:blk + 4096] in (model[blk:blk + 4096], b"\xee" * 4096), blk
    got[w0:w1] = model[w0:w1]
    assert got == model, "an acknowledged write is lost"
    resync = json.loads((data_dir / "volumes" / "v1" / "resync.json").read_text())
    assert {1, 2} <= set(resync["extents"])  # the in-flight write's extents are hot
