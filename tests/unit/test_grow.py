"""Growing a volume: a grow MARK in the journal, durable before the store and volume.json
change, redone after a crash at any point, applied by replicas at the same point of the
write sequence (records after it may use the new space in the same batch)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgpack
import pytest

from blockstore.errors import InvalidArgument
from blockstore.marks import GROW_EVENT, grow_size
from blockstore.record import Op
from blockstore.volume import Volume, create_volume, find_volume
from peerlink.batch import check_batch
from peerlink.errors import PeerProtocolError
from peerlink.messages import Batch, Record
from tests.unit.test_replica import crash, read

MiB = 1 << 20


def size_on_disk(d: Path, name: str) -> tuple[int, int]:
    vdir = d / "volumes" / name
    return (json.loads((vdir / "volume.json").read_text())["size"],
            os.stat(vdir / "store").st_size)


def test_grow_a_primary_and_write_into_the_new_space(tmp_path: Path) -> None:
    create_volume(tmp_path, "v1", 16 * MiB)
    vol = Volume.open(tmp_path, "v1")
    data = os.urandom(4096)
    vol.write(data, 16 * MiB - 4096)
    with pytest.raises(OSError, match="outside volume of 16777216 bytes"):
        vol.write(data, 16 * MiB)
    seq = vol.grow(32 * MiB)
    vol.write(data, 30 * MiB)
    assert read(vol, 30 * MiB, 4096) == data and read(vol, 16 * MiB, 4096) == bytes(4096)
    assert vol.journal is not None
    marks = [p for h, p in vol.journal.records(seq) if h.op is Op.MARK]
    assert grow_size(marks[0]) == 32 * MiB
    vol.close()
    assert size_on_disk(tmp_path, "v1") == (32 * MiB, 32 * MiB)
    assert find_volume(tmp_path, "v1").size == 32 * MiB


@pytest.mark.parametrize(("size", "msg"), [
    (8 * MiB, "a volume can only grow"), (16 * MiB, "a volume can only grow"),
    (16 * MiB + 512, "not a multiple of 4096")])
def test_a_grow_that_is_no_grow_is_refused(tmp_path: Path, size: int, msg: str) -> None:
    create_volume(tmp_path, "v1", 16 * MiB)
    vol = Volume.open(tmp_path, "v1")
    with pytest.raises(InvalidArgument, match=msg):
        vol.grow(size)
    vol.close()


def test_a_replica_is_grown_only_by_its_source(tmp_path: Path) -> None:
    create_volume(tmp_path, "r1", 16 * MiB, replica=True)
    vol = Volume.open(tmp_path, "r1")
    with pytest.raises(InvalidArgument, match="grow it on its primary"):
        vol.grow(32 * MiB)
    vol.close()


def test_a_crash_after_the_mark_is_redone(tmp_path: Path) -> None:
    """The MARK is durable, then power is lost before the store and volume.json change:
    recovery replays the MARK (the grow was acknowledged to the operator only after)."""
    create_volume(tmp_path, "v1", 16 * MiB)
    vol = Volume.open(tmp_path, "v1")
    vol.mark({"event": GROW_EVENT, "size": 24 * MiB, "from": 16 * MiB})
    assert vol.journal is not None
    vol.journal.sync()
    crash(vol)
    assert size_on_disk(tmp_path, "v1") == (16 * MiB, 16 * MiB)
    vol = Volume.open(tmp_path, "v1")
    assert vol.recovery.unclean and vol.size == 24 * MiB
    vol.close()
    assert size_on_disk(tmp_path, "v1") == (24 * MiB, 24 * MiB)


def test_a_crash_between_the_store_and_volume_json_is_finished(tmp_path: Path) -> None:
    create_volume(tmp_path, "v1", 16 * MiB)
    os.truncate(tmp_path / "volumes" / "v1" / "store", 20 * MiB)  # as the grow left it
    vol = Volume.open(tmp_path, "v1")
    assert vol.size == 20 * MiB
    vol.close()
    assert size_on_disk(tmp_path, "v1") == (20 * MiB, 20 * MiB)


def test_a_replica_grows_at_the_mark_inside_a_batch(tmp_path: Path) -> None:
    create_volume(tmp_path, "r1", 16 * MiB, replica=True)
    vol = Volume.open(tmp_path, "r1")
    vol.set_consistent(True)
    data = os.urandom(8192)
    grow = msgpack.packb({"event": GROW_EVENT, "size": 32 * MiB, "from": 16 * MiB})
    with pytest.raises(OSError, match="outside volume of 16777216 bytes"):  # not before it
        vol.apply_batch(1, 2, [(Op.WRITE, 0, 20 * MiB, 8192, data),
                               (Op.MARK, 0, 0, 0, grow)])
    assert vol.apply_batch(1, 3, [(Op.WRITE, 0, 0, 8192, data), (Op.MARK, 0, 0, 0, grow),
                                  (Op.WRITE, 0, 20 * MiB, 8192, data)]) == 3
    assert vol.size == 32 * MiB and read(vol, 20 * MiB, 8192) == data
    vol.close()
    assert size_on_disk(tmp_path, "r1") == (32 * MiB, 32 * MiB)


def test_the_receiver_checks_each_record_against_the_size_at_it() -> None:
    grow = msgpack.packb({"event": GROW_EVENT, "size": 32 * MiB, "from": 16 * MiB})
    ok = Batch("v1", 5, 7, (Record(Op.WRITE, 0, 0, 4096, bytes(4096)),
                            Record(Op.MARK, 0, 0, 0, grow),
                            Record(Op.WRITE, 0, 20 * MiB, 4096, bytes(4096))))
    assert check_batch(ok, volume="v1", volume_size=16 * MiB, expect_first_seq=5) == 32 * MiB
    early = Batch("v1", 5, 6, (Record(Op.WRITE, 0, 20 * MiB, 4096, bytes(4096)),
                               Record(Op.MARK, 0, 0, 0, grow)))
    with pytest.raises(PeerProtocolError, match="passes the volume end"):
        check_batch(early, volume="v1", volume_size=16 * MiB, expect_first_seq=5)
    bad = Batch("v1", 5, 5, (Record(Op.MARK, 0, 0, 0, msgpack.packb(
        {"event": GROW_EVENT, "size": 1 << 60, "from": 0})),))
    with pytest.raises(PeerProtocolError, match="a grow to 1152921504606846976 bytes"):
        check_batch(bad, volume="v1", volume_size=16 * MiB, expect_first_seq=5)
