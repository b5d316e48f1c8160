"""Batch building with coalescing, and the pure checks a receiver makes (no I/O).

``BatchBuilder`` takes journal records in sequence order, as
``blockstore.journal.Journal.records()`` yields them, and builds one ``Batch`` covering
every seq it took.  Inside a batch, a WRITE/TRIM/ZERO that a later one overwrites is
dropped, or trimmed to the head and tail the later one leaves (splitting it when the
later one lands in its middle).  The batch, applied as a unit, therefore leaves exactly
the bytes that applying every record in order would; reordering across batches never
happens (DESIGN.md §3).  MARK records are kept as they are and act as barriers: nothing
is coalesced across one, so the replica passes through the same state at each MARK
(snapshots, recovery markers) as the primary did.

Invariant of the open segment (the records since the last MARK): its pieces are
pairwise disjoint and kept sorted by offset, so a new record finds what it overlaps by
bisection, and the order in which the pieces are applied does not matter.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Final

from blockstore.marks import grow_size
from blockstore.record import Op, RecordHeader
from blockstore.volume import MAX_SIZE as MAX_VOLUME_SIZE

from .errors import PeerProtocolError, SequenceGap
from .messages import Batch, Record

# Upper bounds of the msgpack bytes around the payloads, so that ``max_bytes`` bounds the
# encoded Batch body (tested): a record is [op, flags, offset, length, bin header]
# (at most 23 bytes), the envelope is [type, volume, first, last, array header].
RECORD_OVERHEAD: Final = 32
BATCH_OVERHEAD: Final = 32


@dataclass(slots=True)
class _Piece:
    """What is left of one data record in the open segment: [offset, end)."""

    seq: int
    op: Op
    flags: int
    offset: int
    end: int
    data: bytes | memoryview  # WRITE only: exactly end - offset bytes

    def cut(self, offset: int, end: int) -> _Piece:
        """The part of this piece within [offset, end) (inside its own range)."""
        data = self.data
        if self.op is Op.WRITE:
            data = memoryview(data)[offset - self.offset:end - self.offset]
        return _Piece(self.seq, self.op, self.flags, offset, end, data)

    @property
    def cost(self) -> int:
        return RECORD_OVERHEAD + (self.end - self.offset if self.op is Op.WRITE else 0)

    def record(self) -> Record:
        data = self.data if isinstance(self.data, bytes) else bytes(self.data)
        return Record(self.op, self.flags, self.offset, self.end - self.offset, data)


class BatchBuilder:
    """Accumulate contiguous journal records into one coalesced Batch.

    ``max_bytes`` bounds the encoded Batch body and ``max_records`` the records it holds,
    both counted after coalescing.  A builder that holds nothing takes any one record,
    however large, so the stream never stalls on a record above the budget.  The time
    bound of a batch is the caller's: it calls ``build()`` when its timer fires.

    ``build()`` resets the builder and keeps the expected next seq, so one builder per
    peer and volume serves the whole stream; a record that skips or repeats a seq
    raises ``SequenceGap``.
    """

    def __init__(self, max_bytes: int, max_records: int, *, volume: str,
                 next_seq: int | None = None) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        self.max_bytes = max_bytes
        self.max_records = max_records
        self.volume = volume
        self.next_seq = next_seq  # None: the first record fed sets it
        self._envelope = BATCH_OVERHEAD + len(volume.encode())
        self._reset()

    def _reset(self) -> None:
        self.first_seq: int | None = None
        self._done: list[Record] = []  # closed by a MARK, in order
        self._starts: list[int] = []  # offsets of _open, for bisection
        self._open: list[_Piece] = []  # the open segment, sorted by offset, disjoint
        self._bytes = self._envelope
        self._count = 0

    @property
    def size(self) -> int:
        """Upper bound of the encoded body of the batch built now."""
        return self._bytes

    def __len__(self) -> int:
        """Records in the batch built now (after coalescing)."""
        return self._count

    @property
    def empty(self) -> bool:
        """No record taken since the last build()."""
        return self.first_seq is None

    def _fits(self, nbytes: int, count: int) -> bool:
        return self.empty or (nbytes <= self.max_bytes and count <= self.max_records)

    def add(self, hdr: RecordHeader, payload: bytes | memoryview) -> bool:
        """Take the next journal record; return False (taking nothing) when it would
        push the batch past a bound: build() then, and add it to the next batch."""
        if self.next_seq is not None and hdr.seq != self.next_seq:
            raise SequenceGap(
                f"record seq {hdr.seq} where {self.next_seq} was expected (a batch covers "
                "contiguous sequence numbers)")
        if hdr.op is Op.MARK:
            taken = self._add_mark(payload)
        elif hdr.length == 0:
            taken = True  # changes nothing; its seq is still covered
        else:
            if hdr.op is Op.WRITE and len(payload) != hdr.length:
                raise ValueError(
                    f"record seq {hdr.seq}: WRITE of length {hdr.length} with "
                    f"{len(payload)} payload bytes")
            taken = self._add_data(hdr, payload)
        if taken:
            if self.first_seq is None:
                self.first_seq = hdr.seq
            self.next_seq = hdr.seq + 1
        return taken

    def _add_mark(self, payload: bytes | memoryview) -> bool:
        cost = RECORD_OVERHEAD + len(payload)
        if not self._fits(self._bytes + cost, self._count + 1):
            return False
        self._close_segment()
        self._done.append(Record(Op.MARK, 0, 0, 0, bytes(payload)))
        self._bytes += cost
        self._count += 1
        return True

    def _add_data(self, hdr: RecordHeader, payload: bytes | memoryview) -> bool:
        a, b = hdr.offset, hdr.offset + hdr.length
        new = _Piece(hdr.seq, hdr.op, int(hdr.flags), a, b,
                     payload if hdr.op is Op.WRITE else b"")
        # Pieces [i, j) overlap [a, b): the ones starting before b whose end passes a.
        i = bisect.bisect_right(self._starts, a) - 1
        if i < 0 or self._open[i].end <= a:
            i += 1
        j = bisect.bisect_left(self._starts, b, lo=i)
        keep: list[_Piece] = []
        if i < j and self._open[i].offset < a:
            keep.append(self._open[i].cut(self._open[i].offset, a))  # head of the first
        keep.append(new)
        if i < j and self._open[j - 1].end > b:
            last = self._open[j - 1]
            keep.append(last.cut(b, last.end))  # tail of the last
        nbytes = (self._bytes - sum(p.cost for p in self._open[i:j])
                  + sum(p.cost for p in keep))
        count = self._count - (j - i) + len(keep)
        if not self._fits(nbytes, count):
            return False
        self._open[i:j] = keep
        self._starts[i:j] = [p.offset for p in keep]
        self._bytes, self._count = nbytes, count
        return True

    def _close_segment(self) -> None:
        """Move the open segment's pieces to the done list (a MARK follows, or build)."""
        self._open.sort(key=lambda p: p.seq)  # stable: a split record stays in offset order
        self._done.extend(p.record() for p in self._open)
        self._open.clear()
        self._starts.clear()

    def build(self, epoch: int | None = None) -> Batch:
        """Return the batch of every record taken since the last build (carrying the
        sender's ``epoch``), and reset."""
        if self.first_seq is None or self.next_seq is None:
            raise ValueError("build() of an empty batch")
        self._close_segment()
        batch = Batch(self.volume, self.first_seq, self.next_seq - 1, tuple(self._done),
                      epoch)
        self._reset()
        return batch


def payload_bytes(records: tuple[Record, ...] | list[Record]) -> int:
    """Data bytes a batch carries (WRITE payloads and MARK bodies)."""
    return sum(len(r.data) for r in records)


def check_batch(batch: Batch, *, volume: str, volume_size: int, expect_first_seq: int) -> int:
    """Receiver side: raise PeerProtocolError unless ``batch`` continues the stream
    exactly where the replica stands and stays inside the volume (as grown by any grow
    MARK before each record).  Nothing of a batch that fails here may be applied.
    Returns the volume size after the batch."""
    if batch.volume != volume:
        raise PeerProtocolError(
            f"batch for volume {batch.volume!r} on the stream of volume {volume!r}")
    if batch.first_seq != expect_first_seq:
        what = "a gap" if batch.first_seq > expect_first_seq else "a replay"
        raise PeerProtocolError(
            f"batch starts at seq {batch.first_seq} where {expect_first_seq} was expected "
            f"({what})")
    for i, r in enumerate(batch.records):
        if r.op is Op.MARK:
            grown = grow_size(r.data)
            if grown is not None:
                if grown % 4096 or grown > MAX_VOLUME_SIZE:
                    raise PeerProtocolError(
                        f"batch {batch.first_seq}-{batch.last_seq} record {i}: a grow to "
                        f"{grown} bytes (expected a multiple of 4096 up to {MAX_VOLUME_SIZE})")
                volume_size = max(volume_size, grown)
            continue
        if r.offset + r.length > volume_size:
            raise PeerProtocolError(
                f"batch {batch.first_seq}-{batch.last_seq} record {i}: {r.op.name} of "
                f"{r.length} bytes at {r.offset} passes the volume end ({volume_size})")
    return volume_size
