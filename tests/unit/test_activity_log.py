"""The activity log: the persistent, bounded LRU set of hot extents behind crash recovery.

Recovery trusts it to name every extent that may differ from the peers, so what it
persists, what it evicts (and when), and how it survives a torn slot write all matter.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from blockstore.activity_log import AL_MAGIC, ActivityLog
from blockstore.errors import FormatError

HDR = 24  # magic 8, txn 8, count 4, crc 4


def noop() -> None:
    """A before_evict that has nothing to make durable."""


def slot_bytes(slots: int) -> int:
    return HDR + 8 * slots


def test_fresh_log_is_empty(tmp_path: Path) -> None:
    al = ActivityLog(str(tmp_path / "al"), 4, noop)
    assert al.extents() == []
    al.close()
    al2 = ActivityLog(str(tmp_path / "al"), 4, noop)
    assert al2.extents() == []
    al2.close()


def test_needs_a_slot(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^activity log needs at least one slot$"):
        ActivityLog(str(tmp_path / "al"), 0, noop)


def test_activate_persists_across_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "al")
    al = ActivityLog(path, 8, noop)
    t0 = al.txn
    al.activate([5, 1])
    al.activate([9])
    al.activate([1, 5])  # already hot: nothing to persist
    assert al.txn == t0 + 2
    assert al.extents() == [1, 5, 9]
    assert os.path.getsize(path) == 2 * slot_bytes(8)
    al.close()  # no clean-up step: what activate wrote is what survives a crash
    al2 = ActivityLog(path, 8, noop)
    assert al2.extents() == [1, 5, 9]
    assert list(al2.hot) == [5, 1, 9], "LRU order survives the reopen"
    assert al2.txn == t0 + 2
    al2.close()


def test_activate_is_durable_before_it_returns(tmp_path: Path) -> None:
    """Another reader sees the extent as soon as activate returns (no close needed)."""
    path = str(tmp_path / "al")
    al = ActivityLog(path, 4, noop)
    al.activate([3])
    other = ActivityLog(path, 4, noop)
    assert other.extents() == [3]
    other.close()
    al.close()


def test_lru_eviction_calls_before_evict_first(tmp_path: Path) -> None:
    path = str(tmp_path / "al")
    calls: list[list[int]] = []
    al: ActivityLog

    def before_evict() -> None:
        # The victim must still be hot (in memory and on disk) while the caller makes
        # its data durable: dropping it first would open a window with no record of it.
        calls.append(al.extents())
        on_disk = ActivityLog(path, 3, noop)
        calls.append(on_disk.extents())
        on_disk.close()

    al = ActivityLog(path, 3, before_evict)
    for e in (10, 20, 30):
        al.activate([e])
    assert calls == []
    al.activate([40])
    assert calls == [[10, 20, 30], [10, 20, 30]]
    assert list(al.hot) == [20, 30, 40]  # the least recently activated went
    al.activate([50, 60])  # two more: the two oldest go, with one before_evict call
    assert calls[2:] == [[20, 30, 40], [20, 30, 40]]
    assert list(al.hot) == [40, 50, 60]
    al.close()
    al2 = ActivityLog(path, 3, noop)
    assert list(al2.hot) == [40, 50, 60]
    al2.close()


def test_before_evict_failure_evicts_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "al")

    def fail() -> None:
        raise OSError(5, "Input/output error")

    al = ActivityLog(path, 2, fail)
    al.activate([1, 2])
    with pytest.raises(OSError, match=r"Input/output error"):
        al.activate([3])
    assert list(al.hot) == [1, 2]
    al.close()
    al2 = ActivityLog(path, 2, noop)
    assert list(al2.hot) == [1, 2]
    al2.close()


def test_ahead_extents_share_the_sync_and_take_only_free_slots(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """activate(extents, ahead): the ahead extents are persisted by the same slot write
    (one fdatasync), only into room the log has (never an eviction of their own), and
    already-hot ones are skipped."""
    path = str(tmp_path / "al")
    evictions: list[list[int]] = []
    al: ActivityLog

    def before_evict() -> None:
        evictions.append(al.extents())

    al = ActivityLog(path, 16, before_evict)
    syncs: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real(fd))[1])
    al.activate([0], ahead=[1, 2, 3])
    assert (list(al.hot), len(syncs)) == ([0, 1, 2, 3], 1)
    al.activate([3], ahead=[4])  # hot already: nothing, not even the ahead extents
    assert (list(al.hot), len(syncs)) == ([0, 1, 2, 3], 1)
    al.activate([4], ahead=[2, 5, 6])
    assert list(al.hot) == [0, 1, 2, 3, 4, 5, 6]
    al.activate(range(10, 18), ahead=[18, 19, 20])  # 15 hot: room for one
    assert list(al.hot)[-2:] == [17, 18] and len(al.hot) == 16
    assert (len(syncs), evictions) == (3, [])
    al.activate([30], ahead=range(31, 40))  # full: evicts 16 // 8 = 2 for its one
    assert len(evictions) == 1
    assert list(al.hot) == [2, 3, 4, 5, 6, 10, 11, 12, 13, 14, 15, 16, 17, 18, 30, 31]
    monkeypatch.undo()
    al.close()
    al2 = ActivityLog(path, 16, noop)
    assert al2.extents() == [2, 3, 4, 5, 6, 10, 11, 12, 13, 14, 15, 16, 17, 18, 30, 31]
    al2.close()


def test_failed_persist_leaves_nothing_hot_in_memory(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An activation whose slot write fails must not leave its extents (nor the ahead
    ones) hot in memory: a later write would take them for durable and skip the log."""
    path = str(tmp_path / "al")
    al = ActivityLog(path, 8, noop)
    al.activate([1])

    def fail(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", fail)
    with pytest.raises(OSError, match=r"Input/output error"):
        al.activate([2], ahead=[3, 4])
    monkeypatch.undo()
    assert list(al.hot) == [1]
    al.activate([2])
    assert list(al.hot) == [1, 2]
    al.close()


def test_bounded_size(tmp_path: Path) -> None:
    """Never more than ``slots`` hot; the survivors are always the most recent ones."""
    path = str(tmp_path / "al")
    evictions = 0

    def count() -> None:
        nonlocal evictions
        evictions += 1

    al = ActivityLog(path, 16, count)
    for e in range(200):
        al.activate([e])
        n = len(al.hot)
        assert 1 <= n <= 16
        assert list(al.hot) == list(range(e + 1 - n, e + 1)), "LRU: the newest survive"
    # One barrier per eviction round; a round may free more than one slot.
    assert 1 <= evictions <= 200 - 16
    assert os.path.getsize(path) == 2 * slot_bytes(16)
    # One request spanning more extents than the log holds: every one of them must be
    # hot before the write, so the slots grow rather than drop any.
    al.activate(range(1000, 1100))
    assert al.extents() == list(range(1000, 1100))
    assert os.path.getsize(path) == 2 * slot_bytes(100)
    al.close()
    al2 = ActivityLog(path, 16, noop)
    assert al2.extents() == list(range(1000, 1100)), "a reopen keeps every hot extent"
    al2.activate([5000])  # the next activation evicts down to the configured size
    assert len(al2.hot) <= 16
    assert 5000 in al2.hot
    al2.close()


def test_clear_persists_an_empty_set(tmp_path: Path) -> None:
    path = str(tmp_path / "al")
    al = ActivityLog(path, 4, noop)
    al.activate([1, 2])
    al.clear()
    al.close()
    al2 = ActivityLog(path, 4, noop)
    assert al2.extents() == []
    assert al2.txn == al.txn
    al2.close()


def test_slots_alternate(tmp_path: Path) -> None:
    """Transaction t lives in slot t % 2, so the newest write never overwrites the
    previous state."""
    path = tmp_path / "al"
    al = ActivityLog(str(path), 2, noop)
    sb = slot_bytes(2)
    al.activate([7])
    al.activate([8])
    t = al.txn
    al.close()
    raw = path.read_bytes()
    assert len(raw) == 2 * sb
    newer = struct.unpack_from("<8sQI", raw, (t % 2) * sb)
    older = struct.unpack_from("<8sQI", raw, ((t - 1) % 2) * sb)
    assert newer == (AL_MAGIC, t, 2)
    assert older == (AL_MAGIC, t - 1, 1)


@pytest.mark.parametrize("where", [0, 9, 17, 21, HDR, HDR + 8])
def test_torn_newer_slot_falls_back_to_older(tmp_path: Path, where: int) -> None:
    path = tmp_path / "al"
    al = ActivityLog(str(path), 2, noop)
    al.activate([7])  # txn t - 1: {7}
    al.activate([8])  # txn t: {7, 8}
    t = al.txn
    al.close()
    newer = (t % 2) * slot_bytes(2)
    with open(path, "r+b") as f:
        f.seek(newer + where)  # magic, txn, count, crc or body of the newer slot
        b = f.read(1)
        f.seek(newer + where)
        f.write(bytes([b[0] ^ 0x5A]))
    al2 = ActivityLog(str(path), 2, noop)
    assert (al2.extents(), al2.txn) == ([7], t - 1)
    # The next transaction (t again) rewrites the damaged slot.
    al2.activate([9])
    al2.close()
    al3 = ActivityLog(str(path), 2, noop)
    assert (list(al3.hot), al3.txn) == ([7, 9], t)
    al3.close()


def test_torn_slot_zeroed_falls_back(tmp_path: Path) -> None:
    """A slot write that never reached the disk reads as zeros (or the old bytes)."""
    path = tmp_path / "al"
    al = ActivityLog(str(path), 4, noop)
    for e in (1, 2, 3):
        al.activate([e])
    t = al.txn
    al.close()
    sb = slot_bytes(4)
    with open(path, "r+b") as f:
        f.seek((t % 2) * sb)
        f.write(bytes(sb))
    al2 = ActivityLog(str(path), 4, noop)
    assert (al2.extents(), al2.txn) == ([1, 2], t - 1)
    al2.close()


def test_both_slots_bad(tmp_path: Path) -> None:
    path = tmp_path / "al"
    al = ActivityLog(str(path), 2, noop)
    al.activate([1])
    al.activate([2])
    al.close()
    sb = slot_bytes(2)
    raw = bytearray(path.read_bytes())
    raw[HDR] ^= 1
    raw[sb + HDR] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError) as ei:
        ActivityLog(str(path), 2, noop)
    assert str(ei.value) == f"activity log {path}: no valid slot"


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "al"
    path.write_bytes(b"this is not an activity log at all" * 3)
    with pytest.raises(FormatError) as ei:
        ActivityLog(str(path), 4, noop)
    assert str(ei.value) == f"activity log {path}: no valid slot"




@pytest.mark.parametrize(("before", "after"), [(4, 8), (1024, 2048), (8, 4), (2048, 1024)])
def test_slot_count_change_keeps_log_readable(tmp_path: Path, before: int, after: int) -> None:
    """activity_log.extents is an operator setting: a restart with another value must
    neither lose the hot set nor make the log unreadable; a smaller log keeps every
    loaded extent until the next activation evicts down to the new size."""
    path = str(tmp_path / "al")
    al = ActivityLog(path, before, noop)
    for e in range(min(before, 6)):
        al.activate([e])
    al.close()
    model = list(range(min(before, 6)))
    for round_ in range(3):
        al2 = ActivityLog(path, after, noop)
        assert list(al2.hot) == model, f"round {round_}: reopen returns the persisted set"
        al2.activate([100 + round_])
        model.append(100 + round_)
        if len(model) > after:  # eviction: the oldest go, an eighth of the log at least
            del model[: max(len(model) - after, after // 8)]
        assert list(al2.hot) == model
        al2.close()
    al3 = ActivityLog(path, after, noop)
    assert list(al3.hot) == model
    assert len(al3.hot) <= after
    al3.close()
