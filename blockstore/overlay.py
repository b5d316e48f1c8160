"""The overlay of a point view: which byte ranges of the volume the journal's records
after the base rewrote, and where their newest content is (DESIGN.md §7a); and its saved
form, the map file written per sealed journal segment so that opening a point does not
replay the whole history (``encode_map``/``decode_map``: pure, bytes in and out).

A source is (first seq of the journal segment holding the bytes, position of the range's
first byte in that segment file), or None for zeros (TRIM, ZERO).
"""

from __future__ import annotations

import bisect
import struct
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

from crc32c import crc32c

from .errors import FormatError

MAP_MAGIC = b"NBDGWOVM"
MAP_VERSION = 1
# magic, version, bucket shift, base id, base seq, segment first seq, segment last seq,
# position and header CRC of the segment's last record, view size, buckets, segments,
# ranges
_MAP_HEAD = struct.Struct("<8sIIQQQQQIQQQQ")
_CRC = struct.Struct("<I")
_ZERO = -1  # the segment of a range that reads as zeros

class Overlay:
    """Non-overlapping byte ranges -> where their newest content is: (first seq of the
    journal segment, position of the byte at the range's start) or None for zeros.  Kept per
    bucket of 2^shift bytes of the volume (a range crossing buckets is cut), so that an
    insert shifts the entries of one bucket only: one sorted list for the whole volume
    made opening an instant quadratic (1 GiB of 4 KiB records: 12.6 s, against 0.86 s
    for 256 MiB; bench/cdp).  1 MiB buckets: 1.4 s for that GiB (64 MiB ones: 1.8 s)."""

    def __init__(self, shift: int = 20) -> None:
        self.shift = shift
        self.buckets: dict[int, _Runs] = {}
        # Buckets of a decoded map not unpacked yet (bucket -> first range, count in
        # ``_saved``): opening a point unpacks only those its reads and replay touch.
        self._packed: dict[int, tuple[int, int]] = {}
        self._saved: _Columns | None = None

    def __len__(self) -> int:
        return (sum(len(b) for b in self.buckets.values())
                + sum(c for _i, c in self._packed.values()))

    def keys(self) -> list[int]:
        """The buckets holding ranges, in order."""
        return sorted({*self.buckets, *self._packed})

    def bucket(self, k: int) -> _Runs | None:
        runs = self.buckets.get(k)
        if runs is None and k in self._packed:
            assert self._saved is not None
            i, c = self._packed.pop(k)
            runs = self.buckets[k] = self._saved.runs(i, c)
        return runs

    def put(self, start: int, end: int, src: tuple[int, int] | None) -> None:
        """[start, end) now reads from ``src`` (later puts win)."""
        shift = self.shift
        pos = start
        while pos < end:
            k = pos >> shift
            stop = min(end, (k + 1) << shift)
            runs = self.bucket(k)
            if runs is None:
                runs = self.buckets[k] = _Runs()
            runs.put(pos, stop, _advance(src, pos - start))
            pos = stop

    def covering(self, start: int, end: int) -> Iterator[tuple[int, int, tuple[int, int] | None]]:
        """The ranges (clipped) that overlap [start, end), in order."""
        if end <= start:
            return
        first, last = start >> self.shift, (end - 1) >> self.shift
        held = len(self.buckets) + len(self._packed)
        keys = (range(first, last + 1) if last - first < 4 * held + 4
                else [k for k in self.keys() if first <= k <= last])
        for k in keys:
            runs = self.bucket(k)
            if runs is not None:
                yield from runs.covering(start, end)


class _Runs:
    """One bucket of an Overlay: sorted, non-overlapping ranges."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.srcs: list[tuple[int, int] | None] = []

    def __len__(self) -> int:
        return len(self.starts)

    def put(self, start: int, end: int, src: tuple[int, int] | None) -> None:
        """[start, end) now reads from ``src`` (later puts win)."""
        if end <= start:
            return
        starts, ends, srcs = self.starts, self.ends, self.srcs
        i = bisect.bisect_right(starts, start) - 1
        new_s: list[int] = []
        new_e: list[int] = []
        new_src: list[tuple[int, int] | None] = []
        if i >= 0 and ends[i] > start:
            # A range that begins at or before ``start`` and reaches into it: keep its head.
            s0, e0, src0 = starts[i], ends[i], srcs[i]
            if s0 < start:
                new_s.append(s0)
                new_e.append(start)
                new_src.append(src0)
            lo = i
            if e0 > end:
                new_s.append(start)
                new_e.append(end)
                new_src.append(src)
                new_s.append(end)
                new_e.append(e0)
                new_src.append(_advance(src0, end - s0))
                starts[lo:lo + 1] = new_s
                ends[lo:lo + 1] = new_e
                srcs[lo:lo + 1] = new_src
                return
        else:
            lo = i + 1
        hi = bisect.bisect_left(starts, end, lo)
        # Ranges beginning inside [start, end): gone, except the tail of the last.
        if hi > lo and ends[hi - 1] > end and starts[hi - 1] >= start:
            s1, e1, src1 = starts[hi - 1], ends[hi - 1], srcs[hi - 1]
            tail = (end, e1, _advance(src1, end - s1))
        else:
            tail = None
        new_s.append(start)
        new_e.append(end)
        new_src.append(src)
        if tail is not None:
            new_s.append(tail[0])
            new_e.append(tail[1])
            new_src.append(tail[2])
        starts[lo:hi] = new_s
        ends[lo:hi] = new_e
        srcs[lo:hi] = new_src

    def covering(self, start: int, end: int) -> Iterator[tuple[int, int, tuple[int, int] | None]]:
        """The ranges (clipped) that overlap [start, end), in order."""
        i = max(0, bisect.bisect_right(self.starts, start) - 1)
        while i < len(self.starts) and self.starts[i] < end:
            s, e = max(self.starts[i], start), min(self.ends[i], end)
            if s < e:
                yield s, e, _advance(self.srcs[i], s - self.starts[i])
            i += 1


def _advance(src: tuple[int, int] | None, n: int) -> tuple[int, int] | None:
    return None if src is None else (src[0], src[1] + n)


@dataclass(frozen=True)
class MapKey:
    """What a saved map is the overlay of: the records after base ``base_seq`` through
    ``last``, the last record of the segment beginning at ``first``, which sits at
    ``last_pos`` in that segment with header CRC ``last_hcrc`` (checked against the
    journal before the map is used: a map is a cache, never trusted blindly)."""

    base_id: int
    base_seq: int
    first: int
    last: int
    last_pos: int
    last_hcrc: int
    size: int  # the view's size as of ``last`` (a grow MARK widens it)


def _le(values: list[int], code: str = "q") -> bytes:
    arr = array(code, values)
    if sys.byteorder != "little":
        arr.byteswap()
    return arr.tobytes()


def encode_map(key: MapKey, ov: Overlay) -> bytes:
    """The map file: a header, the buckets' keys and range counts, the segments the
    ranges read, the ranges as four columns (start, end, segment index or -1 for zeros,
    position: 24 bytes a range), a CRC32C of all of it."""
    keys = ov.keys()
    counts, starts, ends, segs, poss = [], [], [], [], []
    index: dict[int, int] = {}
    for k in keys:
        runs = ov.bucket(k)
        assert runs is not None
        counts.append(len(runs))
        starts += runs.starts
        ends += runs.ends
        for src in runs.srcs:
            if src is None:
                segs.append(_ZERO)
                poss.append(0)
            else:
                segs.append(index.setdefault(src[0], len(index)))
                poss.append(src[1])
    head = _MAP_HEAD.pack(MAP_MAGIC, MAP_VERSION, ov.shift, key.base_id, key.base_seq,
                          key.first, key.last, key.last_pos, key.last_hcrc, key.size,
                          len(keys), len(index), len(starts))
    body = b"".join([head, _le(keys), _le(counts), _le(list(index)), _le(starts),
                     _le(ends), _le(segs, "i"), _le(poss, "I")])
    return body + _CRC.pack(crc32c(body))


def decode_map(data: bytes) -> tuple[MapKey, Overlay]:
    """A map file's key and overlay; FormatError for anything but a whole, intact map
    of this version (torn, empty, flipped, another format)."""
    if len(data) < _MAP_HEAD.size + _CRC.size:
        raise FormatError(f"overlay map: {len(data)} bytes, shorter than its header")
    body = memoryview(data)[:-_CRC.size]
    if crc32c(body) != _CRC.unpack_from(data, len(data) - _CRC.size)[0]:
        raise FormatError("overlay map: bad CRC (torn or damaged)")
    (magic, version, shift, base_id, base_seq, first, last, last_pos, last_hcrc, size,
     nkeys, nsegs, n) = _MAP_HEAD.unpack_from(data)
    if magic != MAP_MAGIC or version != MAP_VERSION:
        raise FormatError(f"overlay map: magic {magic!r} version {version}")
    if len(body) != _MAP_HEAD.size + 8 * (2 * nkeys + nsegs + 2 * n) + 8 * n:
        raise FormatError("overlay map: its length does not match its counts")
    at = _MAP_HEAD.size

    def column(count: int, code: str = "q") -> array[int]:
        nonlocal at
        arr = array(code)
        arr.frombytes(body[at:at + arr.itemsize * count])
        if sys.byteorder != "little":
            arr.byteswap()
        at += arr.itemsize * count
        return arr

    keys, counts, table = column(nkeys), column(nkeys), column(nsegs).tolist()
    cols = _Columns(column(n), column(n), column(n, "i"), column(n, "I"), table)
    ov = Overlay(shift)
    i = 0
    for k, c in zip(keys, counts, strict=True):
        ov._packed[k] = (i, c)
        i += c
    if i != n or (n and max(cols.segs) >= len(table)):
        raise FormatError("overlay map: its counts do not add up")
    ov._saved = cols
    return MapKey(base_id, base_seq, first, last, last_pos, last_hcrc, size), ov


@dataclass(frozen=True)
class _Columns:
    """The ranges of a decoded map, as stored: unpacked one bucket at a time."""

    starts: array[int]
    ends: array[int]
    segs: array[int]  # index into ``table``, or -1: zeros
    poss: array[int]
    table: list[int]  # segment first seqs

    def runs(self, i: int, c: int) -> _Runs:
        table = self.table
        runs = _Runs()
        runs.starts = self.starts[i:i + c].tolist()
        runs.ends = self.ends[i:i + c].tolist()
        runs.srcs = [None if s == _ZERO else (table[s], p)
                     for s, p in zip(self.segs[i:i + c], self.poss[i:i + c], strict=True)]
        return runs
