"""Snapshots of a blockstore Volume, in-process: contents against a model image through
512 snapshots, deletes in the middle, rollback, the limit, replicas taking the same
snapshots from the journal, and kill -9 simulated at each step of create, delete,
copy-on-write and rollback (files dropped without a clean close, then reopened)."""

# The workload's randomness is for coverage (seeded), not secrecy.
# ruff: noqa: S311

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import msgpack
import pytest

from blockstore.marks import COMMIT_EVENT, SNAP_EVENT
from blockstore.record import Op
from blockstore.snapshot import MAX_SNAPSHOTS, SnapshotError, SnapshotStore
from blockstore.volume import (
    Volume,
    create_volume,
)

KiB, MiB = 1 << 10, 1 << 20
SIZE = 2 * MiB  # 32 COW extents: small, so 512 snapshots are quick to check


class Crash(BaseException):
    """Raised where kill -9 lands (BaseException: nothing on the way catches it)."""


def crash(vol: Volume) -> None:
    if vol.checkpointer is not None:
        vol.checkpointer.stop()
    vol._close_files()
    vol.lock.release()


def image(vol: Volume, snap: str | None = None) -> bytes:
    buf = bytearray(vol.size)
    if snap is None:
        vol.read_into(buf, 0)
    else:
        vol.snapshot_view(snap).read_into(buf, 0)
    return bytes(buf)


def digest(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class Model:
    """Random writes, trims and zeros applied to a volume and to a bytearray alike."""

    def __init__(self, vol: Volume, seed: int) -> None:
        self.vol = vol
        self.rng = random.Random(seed)
        self.img = bytearray(vol.size)

    def step(self) -> None:
        rng = self.rng
        n = rng.choice([4 * KiB, 4 * KiB, 16 * KiB, 64 * KiB, 200 * KiB])
        off = rng.randrange(0, (self.vol.size - n) // 4096 + 1) * 4096
        kind = rng.random()
        if kind < 0.1:
            self.vol.trim(off, n)
            self.img[off:off + n] = bytes(n)
        elif kind < 0.2:
            self.vol.zero(off, n, may_trim=rng.random() < 0.5)
            self.img[off:off + n] = bytes(n)
        else:
            data = rng.randbytes(n)
            self.vol.write(data, off)
            self.img[off:off + n] = data


@pytest.fixture
def dd(tmp_path: Path) -> Path:
    create_volume(tmp_path, "v1", SIZE)
    return tmp_path


def test_512_snapshots_delete_in_the_middle_and_rollback(dd: Path) -> None:
    vol = Volume.open(dd, "v1")
    m = Model(vol, seed=512)
    want: dict[str, str] = {}
    for i in range(MAX_SNAPSHOTS):
        for _ in range(m.rng.randint(0, 3)):
            m.step()
        name = f"s{i}"
        vol.snapshot_create(name)
        want[name] = digest(bytes(m.img))
    for _ in range(20):
        m.step()
    live = digest(bytes(m.img))
    assert {n: digest(image(vol, n)) for n in want} == want
    assert digest(image(vol)) == live

    with pytest.raises(SnapshotError) as e:
        vol.snapshot_create("one-too-many")
    assert str(e.value) == "volume v1 has 512 snapshots (the maximum): delete one first"

    doomed = m.rng.sample(sorted(want)[1:-1], 170)
    for name in doomed:
        vol.snapshot_delete(name)
        del want[name]
    assert {n: digest(image(vol, n)) for n in want} == want
    vol.close()

    vol = Volume.open(dd, "v1")  # the index replays to the same state
    assert [r["name"] for r in vol.snapshot_list()] == sorted(want, key=lambda n: int(n[1:]))
    assert {n: digest(image(vol, n)) for n in want} == want
    target = m.rng.choice(sorted(want))
    written = vol.snapshot_rollback(target)
    assert written > 0
    assert digest(image(vol)) == want[target]
    assert {n: digest(image(vol, n)) for n in want} == want  # all kept, newer ones too
    vol.close()


def test_write_cost_beyond_the_first_overwrite_does_not_grow(dd: Path) -> None:
    vol = Volume.open(dd, "v1")
    for i in range(64):
        vol.snapshot_create(f"s{i}")
    assert vol.snaps is not None
    records = vol.snaps.records
    vol.write(b"\x01" * 4096, 0)  # first overwrite of extent 0 since s63: one COW record
    assert vol.snaps.records == records + 1
    for i in range(50):
        vol.write(bytes([i]) * 4096, 4096 * (i % 16))  # same extent: nothing more to do
    assert vol.snaps.records == records + 1
    assert vol.snapshot_list()[-1]["extents"] == 1
    assert vol.snapshot_list()[-1]["held_bytes"] == 0  # the pre-image was all zeros
    vol.close()


def test_held_bytes_count_stored_preimages(dd: Path) -> None:
    vol = Volume.open(dd, "v1")
    vol.write(b"\x07" * (256 * KiB), 0)
    vol.snapshot_create("a")
    vol.write(b"\x08" * (128 * KiB), 0)
    rows = vol.snapshot_list()
    assert (rows[0]["name"], rows[0]["held_bytes"], rows[0]["extents"]) == ("a", 128 * KiB, 2)
    vol.close()


def test_refusals(dd: Path, tmp_path: Path) -> None:
    vol = Volume.open(dd, "v1")
    vol.snapshot_create("a")
    with pytest.raises(SnapshotError, match="volume v1 has a snapshot named 'a'"):
        vol.snapshot_create("a")
    with pytest.raises(SnapshotError, match="no snapshot named 'b'"):
        vol.snapshot_delete("b")
    vol.close()
    create_volume(tmp_path, "r1", SIZE, replica=True)
    rep = Volume.open(tmp_path, "r1")
    with pytest.raises(SnapshotError) as e:
        rep.snapshot_create("x")
    assert str(e.value) == ("volume r1 is a replica: it takes the snapshots of its primary "
                            "(they arrive in the journal)")
    rep.close()


# -- replicas ------------------------------------------------------------------------------

def ship(primary: Volume, replica: Volume, from_seq: int, per_batch: int = 7) -> int:
    """Apply the primary's journal records from ``from_seq`` as batches; return next seq."""
    assert primary.journal is not None
    recs = [(h.seq, (h.op, int(h.flags), h.offset, h.length, p))
            for h, p in primary.journal.records(from_seq)]
    for i in range(0, len(recs), per_batch):
        chunk = recs[i:i + per_batch]
        replica.apply_batch(chunk[0][0], chunk[-1][0], [r for _, r in chunk])
    return recs[-1][0] + 1 if recs else from_seq


def test_replica_takes_and_deletes_the_same_snapshots(dd: Path, tmp_path: Path) -> None:
    create_volume(tmp_path / "r", "v1", SIZE, replica=True)
    p = Volume.open(dd, "v1")
    r = Volume.open(tmp_path / "r", "v1")
    r.set_consistent(True)
    m = Model(p, seed=7)
    nxt = 1
    for i in range(30):
        for _ in range(m.rng.randint(1, 4)):
            m.step()
        p.snapshot_create(f"s{i}")
        if i % 5 == 4:
            nxt = ship(p, r, nxt)
    p.snapshot_delete("s3")
    p.snapshot_delete("s17")
    m.step()
    ship(p, r, nxt)
    names = [x["name"] for x in p.snapshot_list()]
    assert [x["name"] for x in r.snapshot_list()] == names
    assert {n: digest(image(r, n)) for n in names} == {n: digest(image(p, n)) for n in names}
    assert digest(image(r)) == digest(image(p))
    p.close()
    r.close()


def test_inconsistent_replica_refuses_and_redo_does_not_take_it_later(tmp_path: Path
                                                                      ) -> None:
    create_volume(tmp_path, "r1", SIZE, replica=True)
    r = Volume.open(tmp_path, "r1")  # Inconsistent: mid initial sync
    body = msgpack.packb({"event": SNAP_EVENT, "id": 1, "name": "a", "time": 1.0})
    r.apply_batch(1, 2, [(Op.MARK, 0, 0, 0, body), (Op.WRITE, 0, 0, 4096, b"\x01" * 4096)])
    assert r.snapshot_list() == []
    r.set_consistent(True)
    crash(r)  # redo replays the batch with the replica now Consistent
    r = Volume.open(tmp_path, "r1")
    assert r.snapshot_list() == []
    assert r.snaps is not None and r.snaps.index.next_id == 2
    r.close()


def test_replica_batch_cut_between_commit_and_store_is_redone_with_cow(tmp_path: Path
                                                                       ) -> None:
    create_volume(tmp_path, "r1", SIZE, replica=True)
    r = Volume.open(tmp_path, "r1")
    r.set_consistent(True)
    old = b"\x05" * (64 * KiB)
    r.apply_batch(1, 1, [(Op.WRITE, 0, 0, 64 * KiB, old)])
    assert r.journal is not None
    # The next batch is committed (journaled, commit MARK, fdatasync) and then the
    # process dies before any of it reaches the store or the snapshot index.
    body = msgpack.packb({"event": SNAP_EVENT, "id": 1, "name": "a", "time": 1.0})
    r.journal.append(Op.MARK, 0, 0, 0, body)
    r.journal.append(Op.WRITE, 0, 4096, 4096, b"\x09" * 4096)
    r.mark({"event": COMMIT_EVENT, "first_seq": 2, "last_seq": 3})
    r.journal.sync()
    crash(r)
    r = Volume.open(tmp_path, "r1")
    assert r.upstream_seq == 3
    assert image(r, "a")[:64 * KiB] == old  # preserved by redo before the write replayed
    assert image(r)[4096:8192] == b"\x09" * 4096
    r.close()


# -- kill -9 at each step ------------------------------------------------------------------

def test_crash_after_the_mark_before_the_index_takes_it_on_redo(dd: Path) -> None:
    vol = Volume.open(dd, "v1")
    vol.write(b"\x01" * 8192, 0)
    before = image(vol)

    def die(self: SnapshotStore, snap: object) -> None:
        raise Crash

    orig = SnapshotStore.add
    SnapshotStore.add = die  # type: ignore[method-assign]
    try:
        with pytest.raises(Crash):
            vol.snapshot_create("a")
    finally:
        SnapshotStore.add = orig  # type: ignore[method-assign]
    crash(vol)
    vol = Volume.open(dd, "v1")
    assert [r["name"] for r in vol.snapshot_list()] == ["a"]
    assert image(vol, "a") == before
    vol.write(b"\x02" * 4096, 0)
    assert image(vol, "a") == before
    vol.close()


@pytest.mark.parametrize("where", ["data", "index"])
def test_crash_during_copy_on_write(dd: Path, where: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    vol = Volume.open(dd, "v1")
    vol.write(b"\x03" * (128 * KiB), 0)
    vol.snapshot_create("a")
    snap_img = image(vol)
    vol.flush()
    assert vol.snaps is not None
    if where == "data":
        monkeypatch.setattr("blockstore.snapshot.os.fdatasync",
                            lambda fd: (_ for _ in ()).throw(Crash()))
    else:
        monkeypatch.setattr(SnapshotStore, "_append", lambda self, rec: (_ for _ in ()).throw(
            Crash()))
    with pytest.raises(Crash):
        vol.write(b"\x04" * 4096, 4096)
    monkeypatch.undo()
    crash(vol)
    vol = Volume.open(dd, "v1")
    assert image(vol, "a") == snap_img
    assert image(vol) == snap_img  # the write never reached the store or the journal
    vol.write(b"\x04" * 4096, 4096)
    assert image(vol, "a") == snap_img
    vol.close()


def test_crash_after_the_delete_mark_redoes_the_delete(dd: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    vol = Volume.open(dd, "v1")
    m = Model(vol, 3)
    want = {}
    for name in ("a", "b", "c"):
        for _ in range(5):
            m.step()
        vol.snapshot_create(name)
        want[name] = digest(bytes(m.img))
    m.step()
    monkeypatch.setattr(SnapshotStore, "delete", lambda self, sid: (_ for _ in ()).throw(
        Crash()))
    with pytest.raises(Crash):
        vol.snapshot_delete("b")
    monkeypatch.undo()
    crash(vol)
    vol = Volume.open(dd, "v1")
    assert [r["name"] for r in vol.snapshot_list()] == ["a", "c"]
    assert {n: digest(image(vol, n)) for n in ("a", "c")} == {n: want[n] for n in ("a", "c")}
    vol.close()


def test_crash_in_the_middle_of_a_rollback_is_finished_on_open(
        dd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vol = Volume.open(dd, "v1")
    m = Model(vol, 11)
    for _ in range(10):
        m.step()
    vol.snapshot_create("a")
    want = digest(bytes(m.img))
    for _ in range(40):
        m.step()
    calls = []
    real_write = Volume.write

    def write_then_die(self: Volume, buf: bytes, offset: int, fua: bool = False) -> int:
        calls.append(offset)
        if len(calls) == 3:
            raise Crash
        return real_write(self, buf, offset, fua)

    monkeypatch.setattr(Volume, "write", write_then_die)
    with pytest.raises(Crash):
        vol.snapshot_rollback("a")
    monkeypatch.undo()
    crash(vol)
    vol = Volume.open(dd, "v1")  # finishes the rollback
    assert digest(image(vol)) == want
    assert digest(image(vol, "a")) == want
    assert vol.snaps is not None and not (vol.snaps.dir / "rollback.json").exists()
    vol.close()


def test_compaction_keeps_every_snapshot_and_the_used_ids(dd: Path) -> None:
    vol = Volume.open(dd, "v1")
    m = Model(vol, 21)
    want = {}
    for i in range(40):
        for _ in range(3):
            m.step()
        vol.snapshot_create(f"s{i}")
        want[f"s{i}"] = digest(bytes(m.img))
    for i in range(0, 40, 3):
        vol.snapshot_delete(f"s{i}")
        del want[f"s{i}"]
    assert vol.snaps is not None
    before = vol.snaps.records
    vol.snaps.compact()
    assert vol.snaps.records < before
    vol.close()
    vol = Volume.open(dd, "v1")
    assert vol.snaps is not None and vol.snaps.index.next_id == 41
    assert {n: digest(image(vol, n)) for n in want} == want
    assert vol.snapshot_create().name == "snap-41"
    vol.close()
