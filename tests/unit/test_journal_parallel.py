"""The journal's parallel append (a large payload written by the writer thread while the
caller's ``alongside`` writes the store; the header last): same bytes on disk as an
inline append, nothing appended when either side fails, and a crash between payload and
header is a torn tail.  Real files, no daemons."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from blockstore import journal as journal_mod
from blockstore.journal import PARALLEL_MIN, Journal
from blockstore.record import REC_HEADER_SIZE, SEG_HEADER_SIZE, Op

JID = bytes(range(16))
BIG = PARALLEL_MIN  # the smallest payload that takes the parallel path
SEG = 1 << 20


def data(i: int) -> bytes:
    return bytes([i % 251]) * (BIG - 4096) + os.urandom(4096)


@pytest.fixture
def jdir(tmp_path: Path) -> Path:
    d = tmp_path / "journal"
    Journal.create(d, JID)
    return d


def opened(d: Path) -> Journal:
    j = Journal(d, JID, volume=3, segment_bytes=SEG)
    j.open()
    return j


def test_parallel_and_inline_appends_write_the_same_records(tmp_path: Path) -> None:
    """The same records through both paths give byte-identical segment files, and the
    store write (alongside) ran exactly once per record, on the caller's thread."""
    payloads = [data(i) for i in range(12)]  # rotates: 7 records of 128 KiB per MiB
    files = {}
    for mode in ("inline", "parallel"):
        d = tmp_path / mode
        Journal.create(d, JID)
        j = opened(d)
        ran: list[tuple[int, str]] = []
        for i, p in enumerate(payloads):
            if mode == "inline":
                j.append(Op.WRITE, 0, i * BIG, BIG, p)
                continue
            seq = j.append(Op.WRITE, 0, i * BIG, BIG, p,
                           alongside=lambda i=i, ran=ran: ran.append(
                               (i, threading.current_thread().name)))
            assert seq == i + 1
        if mode == "parallel":
            assert ran == [(i, "MainThread") for i in range(12)]
            assert j._writer._thread is not None  # the parallel path was taken
        got = [(h.seq, h.offset, bytes(p)) for h, p in j.records(1)]
        assert got == [(i + 1, i * BIG, payloads[i]) for i in range(12)]
        j.seal_for_close()
        j.close()
        assert j._writer._thread is None
        files[mode] = {f.name: f.read_bytes()[SEG_HEADER_SIZE:]
                       for f in sorted(d.iterdir()) if f.name.endswith(".jnl")}
    assert files["inline"] == files["parallel"]


def test_failed_store_write_appends_nothing(jdir: Path) -> None:
    """alongside raises: its error propagates, the payload already written is cut, and
    the next append takes the same seq at the same position."""
    j = opened(jdir)
    j.append(Op.WRITE, 0, 0, BIG, data(1), alongside=lambda: None)
    pos = j.pos

    def enospc() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left on device"):
        j.append(Op.WRITE, 0, BIG, BIG, data(2), alongside=enospc)
    assert (j.pos, j.last_seq) == (pos, 1)
    assert os.fstat(j.fd).st_size == pos  # the payload past the last record is cut
    assert j.append(Op.WRITE, 0, 2 * BIG, BIG, data(3), alongside=lambda: None) == 2
    j.close()
    j = opened(jdir)
    assert [(h.seq, h.offset) for h, _ in j.records(1)] == [(1, 0), (2, 2 * BIG)]
    j.close()


def test_failed_payload_write_is_an_error_after_the_store_took_it(
        jdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal's copy fails (disk full): the store write still ran (the caller marks
    the extents for resync), the error reaches the caller, nothing is appended."""
    j = opened(jdir)
    real = journal_mod._pwrite_all

    def full(fd: int, buf: bytes | memoryview, pos: int) -> None:
        if len(buf) > REC_HEADER_SIZE:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, buf, pos)

    monkeypatch.setattr(journal_mod, "_pwrite_all", full)
    ran = []
    with pytest.raises(OSError, match="No space left on device"):
        j.append(Op.WRITE, 0, 0, BIG, data(1), alongside=lambda: ran.append(1))
    assert ran == [1]
    assert (j.pos, j.last_seq) == (SEG_HEADER_SIZE, 0)
    monkeypatch.undo()
    assert j.append(Op.WRITE, 0, 0, BIG, data(2), alongside=lambda: None) == 1
    j.close()


def test_payload_without_header_is_a_torn_tail(jdir: Path) -> None:
    """A crash after the payload reached the file but before its header: the next open
    cuts it as a torn tail and keeps every earlier record."""
    j = opened(jdir)
    j.append(Op.WRITE, 0, 0, BIG, data(1), alongside=lambda: None)
    end = j.pos
    # What the writer thread leaves when the process dies before the header is written.
    os.pwrite(j.fd, data(2), end + REC_HEADER_SIZE)
    os.close(j.fd)
    j.fd = -1
    j.close()
    j = Journal(jdir, JID, volume=3, segment_bytes=SEG)
    scan = j.open()
    assert (scan.last_seq, scan.torn_bytes) == (1, REC_HEADER_SIZE + BIG)
    assert j.pos == end
    j.close()
