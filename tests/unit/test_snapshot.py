"""blockstore.snapshot, pure parts: the index model (ownership, delete moves, redo
targets) and the index file codec (header, records, torn tail, corruption)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from blockstore.errors import FormatError
from blockstore.snapshot import (
    HEADER_SIZE,
    T_COW,
    ZERO_SLOT,
    Snapshot,
    SnapshotError,
    SnapshotIndex,
    SnapshotStore,
    decode_header,
    encode_cow,
    encode_create,
    encode_header,
    encode_record,
    read_index,
    scan_records,
    validate_snapshot_name,
)

UUID = bytes(range(16))


def index_with(*ids: int) -> SnapshotIndex:
    idx = SnapshotIndex()
    for i in ids:
        idx.add(Snapshot(i, f"s{i}", 10 * i, float(i)))
    return idx


def test_reads_go_to_the_oldest_owner_at_or_after_the_snapshot() -> None:
    idx = index_with(1, 2, 3)
    idx.cow(2, [(7, 0, 0)])
    idx.cow(3, [(7, 1, 0), (8, ZERO_SLOT, 0)])
    assert idx.owner_slot(1, 7) == 0  # S1 reads e7 through S2 (unchanged S1..S2)
    assert idx.owner_slot(2, 7) == 0
    assert idx.owner_slot(3, 7) == 1
    assert idx.owner_slot(1, 8) == ZERO_SLOT
    assert idx.owner_slot(1, 9) is None  # never written: the live volume
    assert idx.changed_since(2) == {7, 8}


def test_delete_moves_preimages_the_previous_snapshot_reads_through() -> None:
    idx = index_with(1, 2, 3)
    idx.cow(1, [(5, 0, 11)])
    idx.cow(2, [(5, 1, 22), (6, 2, 33)])
    before = {(s, e): idx.owner_slot(s, e) for s in (1, 3) for e in (5, 6, 7)}
    freed = idx.delete(2)
    assert freed == [1]  # S1 has its own e5: S2's is nobody's now
    assert idx.snaps[1].owned == {5: 0, 6: 2}  # e6 moved: S1 read it through S2
    assert {(s, e): idx.owner_slot(s, e) for s in (1, 3) for e in (5, 6, 7)} == before
    assert idx.slot_crc == {0: 11, 2: 33}


def test_delete_of_the_oldest_frees_everything_it_owns() -> None:
    idx = index_with(1, 2)
    idx.cow(1, [(5, 0, 0), (6, ZERO_SLOT, 0)])
    assert idx.delete(1) == [0]
    assert idx.newest is idx.snaps[2]
    assert idx.next_id == 3  # ids are never reused


def test_redo_target_is_the_newest_snapshot_before_the_record() -> None:
    idx = index_with(1, 2, 3)  # taken at seqs 10, 20, 30
    assert idx.target_before(5) is None
    assert idx.target_before(10) is None
    assert idx.target_before(11) is idx.snaps[1]
    assert idx.target_before(25) is idx.snaps[2]
    assert idx.target_before(31) is idx.snaps[3]


def test_ids_must_rise_and_names_be_unique() -> None:
    idx = index_with(1, 2)
    with pytest.raises(FormatError, match="snapshot id 2 is not above 2"):
        idx.add(Snapshot(2, "x", 0, 0.0))
    with pytest.raises(FormatError, match="snapshot name 's1' twice in the index"):
        idx.add(Snapshot(3, "s1", 0, 0.0))
    with pytest.raises(SnapshotError, match="no snapshot named 'nope'"):
        idx.get("nope")


@pytest.mark.parametrize("name", ["a", "daily-20261122T0000Z", "x" * 64, "v1.2:3+4_5"])
def test_snapshot_names_accepted(name: str) -> None:
    assert validate_snapshot_name(name) == name


@pytest.mark.parametrize("name", ["", "-a", "a@b", "a/b", "x" * 65, "a b"])
def test_snapshot_names_refused(name: str) -> None:
    with pytest.raises(SnapshotError) as e:
        validate_snapshot_name(name)
    assert str(e.value) == (
        f"invalid snapshot name {name!r}: use 1-64 letters, digits, '.', '_', ':', '+' "
        "or '-', starting with a letter or digit")


# -- codec -------------------------------------------------------------------------------

def log(*records: bytes) -> bytes:
    return encode_header(16, UUID, 1) + b"".join(records)


def test_header_round_trip_and_errors() -> None:
    h = encode_header(16, UUID, 123)
    assert len(h) == HEADER_SIZE
    assert decode_header(h) == (16, UUID)
    with pytest.raises(FormatError, match="bad snapshot index magic"):
        decode_header(b"X" + h[1:])
    bad_version = h[:8] + struct.pack("<H", 9) + h[10:]
    with pytest.raises(FormatError, match="unsupported snapshot index version 9 "):
        decode_header(bad_version)
    with pytest.raises(FormatError, match="snapshot index header checksum mismatch"):
        decode_header(h[:-1] + bytes([h[-1] ^ 1]))


def test_records_replay_into_the_same_index() -> None:
    recs = [encode_create(Snapshot(1, "a", 5, 1.5, "g")), encode_cow(1, [(3, 0, 99)]),
            encode_create(Snapshot(2, "b", 9, 2.5))]
    records, _end, torn = scan_records(log(*recs))
    assert (len(records), torn) == (3, 0)
    idx = SnapshotIndex()
    for t, body in records:
        idx.apply(t, body)
    assert idx.snaps[1].owned == {3: 0} and idx.snaps[1].group == "g"
    assert idx.order == [1, 2] and idx.slot_crc == {0: 99}


def test_torn_tail_is_cut_but_corruption_in_the_middle_is_an_error() -> None:
    a = encode_create(Snapshot(1, "a", 5, 1.5))
    b = encode_create(Snapshot(2, "b", 6, 1.5))
    whole = log(a, b)
    records, end, torn = scan_records(whole[:-3])
    assert (len(records), end, torn) == (1, HEADER_SIZE + len(a), len(b) - 3)
    broken = bytearray(log(a, b))
    broken[HEADER_SIZE + 20] ^= 0xFF  # inside a's body, b is whole after it
    with pytest.raises(FormatError, match=f"snapshot index corrupt at offset {HEADER_SIZE}: "
                                          "record checksum mismatch"):
        scan_records(bytes(broken))


def test_cow_record_with_a_wrong_length_is_refused() -> None:
    idx = index_with(1)
    body = struct.pack("<II", 1, 2) + b"\x00" * 20
    with pytest.raises(FormatError, match="COW record of 2 entries has 28 bytes"):
        idx.apply(T_COW, body)


def test_store_cuts_a_torn_tail_on_open_and_keeps_the_rest(tmp_path: Path) -> None:
    d = tmp_path / "snapshots"
    SnapshotStore.create(d, UUID)
    st = SnapshotStore(d, 1 << 20)
    st.add(Snapshot(1, "a", 3, 1.0))
    st.close()
    with open(d / "index", "ab") as f:
        f.write(encode_record(T_COW, b"\x01\x02")[:-1])  # an append cut short
    st = SnapshotStore(d, 1 << 20)
    assert st.torn > 0 and st.index.order == [1]
    st.close()
    shift, idx = read_index(d / "index")
    assert shift == 16 and idx.order == [1]
    assert (d / "index").stat().st_size == st.pos
