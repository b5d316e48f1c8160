"""blockstore.store.pwrite_all: whole writes, in pieces aligned to FOLIO_CHUNK."""

from __future__ import annotations

import errno
import itertools
import os

import pytest

from blockstore import store
from blockstore.store import FOLIO_CHUNK, pwrite_all

CASES = [(0, 1), (0, FOLIO_CHUNK), (0, FOLIO_CHUNK + 1), (4096, 1 << 20),
         (FOLIO_CHUNK - 1, 2), (FOLIO_CHUNK + 100, 3 * FOLIO_CHUNK + 7), (12345, 1 << 20)]


@pytest.mark.parametrize(("offset", "length"), CASES)
def test_writes_every_byte_in_aligned_pieces(tmp_path, monkeypatch, offset, length):
    path = tmp_path / "f"
    data = os.urandom(length)
    pieces: list[tuple[int, int]] = []
    real = os.pwrite

    def recording(fd, buf, pos):
        pieces.append((pos, len(buf)))
        return real(fd, buf, pos)

    monkeypatch.setattr(store.os, "pwrite", recording)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        pwrite_all(fd, data, offset)
    finally:
        os.close(fd)
    assert path.read_bytes()[offset:] == data
    # Contiguous, in order, covering the write exactly.
    assert pieces[0][0] == offset
    assert sum(n for _, n in pieces) == length
    for (p0, n0), (p1, _) in itertools.pairwise(pieces):
        assert p0 + n0 == p1
    if length <= FOLIO_CHUNK:
        assert pieces == [(offset, length)]  # small writes stay one syscall
    else:
        # No piece crosses a FOLIO_CHUNK boundary of the file; all but the last end on one.
        for pos, n in pieces:
            assert pos // FOLIO_CHUNK == (pos + n - 1) // FOLIO_CHUNK
        for pos, n in pieces[:-1]:
            assert (pos + n) % FOLIO_CHUNK == 0


def test_short_piece_is_retried_then_reported(tmp_path, monkeypatch):
    """A disk that fills part way: the rest is retried once (the kernel's errno), and a
    second short write is ENOSPC naming where it stopped."""
    calls = []

    def short(fd, buf, pos):
        calls.append((pos, len(buf)))
        return len(buf) // 2 if len(calls) == 2 else (0 if len(calls) > 2 else len(buf))

    monkeypatch.setattr(store.os, "pwrite", short)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError, match=r"short write to store at") as ei:
            pwrite_all(fd, bytes(3 * FOLIO_CHUNK), 0, "write to store")
    finally:
        os.close(fd)
    assert ei.value.errno == errno.ENOSPC
    assert calls == [(0, FOLIO_CHUNK), (FOLIO_CHUNK, FOLIO_CHUNK),
                     (FOLIO_CHUNK + FOLIO_CHUNK // 2, FOLIO_CHUNK // 2)]
