"""Journal.sync_ahead: a write waiting for its sync peers makes the journal durable from
another thread while appends (and rotations) go on; the FLUSH after it then needs no
fdatasync; an error it meets is raised by the next sync().  Real files, no daemons."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from blockstore import journal as journal_mod
from blockstore.journal import Journal
from blockstore.record import REC_HEADER_SIZE, SEG_HEADER_SIZE, Op
from blockstore.volume import Volume, create_volume

JID = bytes(range(16))


def opened(d: Path, seg: int = 4096) -> Journal:
    Journal.create(d, JID)
    j = Journal(d, JID, volume=1, segment_bytes=seg)
    j.open()
    return j


def counting_fdatasync(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(journal_mod.os, "fdatasync", fdatasync)
    return calls


def test_flush_after_sync_ahead_costs_no_fdatasync(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    create_volume(tmp_path, "v1", 1 << 20)
    vol = Volume.open(tmp_path, "v1")
    try:
        calls = counting_fdatasync(monkeypatch)
        seq = vol.write(b"a" * 4096, 0)
        vol.sync_ahead(seq)
        assert vol.journal is not None and vol.journal.synced_seq == seq
        n = len(calls)
        assert n >= 1
        vol.flush()
        assert len(calls) == n  # already durable
        seq = vol.write(b"b" * 4096, 4096)
        vol.flush()  # a record since: fdatasync again
        assert len(calls) > n and vol.journal.synced_seq == seq
        vol.sync_ahead(seq)  # nothing new: nothing to do
        assert len(calls) == n + 1
    finally:
        vol.close()


def test_sync_ahead_while_appends_rotate(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Whenever sync_ahead says records through N are durable, every one of them was in
    a file that an fdatasync covered, however often the appender rotated segments
    meanwhile (each fdatasync recorded as the segment file and its size at the call)."""
    j = opened(tmp_path / "j", seg=4096)
    synced: dict[str, int] = {}  # segment file -> bytes an fdatasync covered
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        path, size = os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size
        real(fd)
        synced[path] = max(synced.get(path, 0), size)

    monkeypatch.setattr(journal_mod.os, "fdatasync", fdatasync)
    stop = threading.Event()
    checks: list[tuple[int, dict[str, int]]] = []

    def ahead() -> None:
        while not stop.is_set():
            j.sync_ahead(j.last_seq)
            if not checks or checks[-1][0] != j.synced_seq:
                checks.append((j.synced_seq, dict(synced)))

    t = threading.Thread(target=ahead)
    t.start()
    try:
        for i in range(400):
            j.append(Op.WRITE, 0, i * 512, 512, bytes([i % 251]) * 512)
    finally:
        stop.set()
        t.join()
    assert j.sync_error is None and len(j.segments) > 40  # it rotated many times
    firsts = [seg.first_seq for seg in j.segments]
    paths = {seg.first_seq: str(seg.path) for seg in j.segments}

    def end_of(seq: int) -> tuple[str, int]:
        first = max(f for f in firsts if f <= seq)
        return paths[first], SEG_HEADER_SIZE + (seq - first + 1) * (REC_HEADER_SIZE + 512)

    assert max(v for v, _ in checks) > 0
    for through, covered in checks:
        for seq in range(1, through + 1):
            path, end = end_of(seq)
            assert covered.get(path, 0) >= end, (through, seq, path)
    j.sync()
    assert j.synced_seq == j.last_seq == 400
    j.close()


def test_an_error_sync_ahead_met_is_raised_by_the_next_sync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    j = opened(tmp_path / "j")
    j.append(Op.WRITE, 0, 0, 512, b"x" * 512)
    real = os.fdatasync

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(journal_mod.os, "fdatasync", failing)
    j.sync_ahead(j.last_seq)  # swallowed here ...
    assert j.synced_seq == 0 and j.sync_error is not None
    monkeypatch.setattr(journal_mod.os, "fdatasync", real)
    with pytest.raises(OSError, match="Input/output error") as ei:  # ... to the next FLUSH
        j.sync()
    assert ei.value.errno == errno.EIO
    j.sync()  # reported once, as the kernel reports a writeback error
    assert j.synced_seq == j.last_seq
    j.close()
