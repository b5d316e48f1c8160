"""blockstore.volume without nbdkit: lifecycle, names and sizes, the data path, and crash
recovery simulated in-process (file descriptors dropped, nothing written on the way out).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest

import blockstore.volume as volume_mod
from blockstore.activity_log import ActivityLog
from blockstore.errors import (
    FormatError,
    InvalidArgument,
    VolumeExists,
    VolumeInUse,
    VolumeNotFound,
)
from blockstore.journal import Journal
from blockstore.record import Flag, Op
from blockstore.volume import (
    RecoveryReport,
    Volume,
    checksum_path,
    create_volume,
    delete_volume,
    find_volume,
    list_volumes,
    parse_size,
    validate_name,
)

MiB = 1 << 20
SIZE = 16 * MiB  # four 4 MiB extents
EXT = 4 * MiB


@pytest.fixture
def dd(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def v1(dd: Path) -> Path:
    """A 16 MiB volume named v1; returns its directory."""
    return create_volume(dd, "v1", SIZE).path


def crash(vol: Volume) -> None:
    """What kill -9 leaves: no state written, no activity log cleared, fds and lock gone.

    A background checkpoint in flight is let finish first (a kill may land before or
    after it; after is the state this makes deterministic)."""
    cp = getattr(vol, "checkpointer", None)
    if cp is not None:
        cp.stop()
    vol._close_files()
    vol.lock.release()


def state(vdir: Path) -> dict[str, object]:
    return json.loads((vdir / "state.json").read_text())


def read(vol: Volume, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    vol.read_into(buf, offset)
    return bytes(buf)


def pattern(seed: int, n: int) -> bytes:
    return hashlib.shake_256(seed.to_bytes(8, "little")).digest(n)


# -- names and sizes -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["a", "v1", "db.data-01_x", "A" * 63, "0"])
def test_validate_name_accepts(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", [
    "", "-a", ".a", "_a", "a/b", "a b", "A" * 64, "a..b", "é", "../x", "a\n", "\na",
])
def test_validate_name_refuses(name: str) -> None:
    with pytest.raises(InvalidArgument) as ei:
        validate_name(name)
    assert str(ei.value) == (
        f"invalid volume name {name!r}: use 1-63 letters, digits, '.', '_' or '-', "
        "starting with a letter or digit")


@pytest.mark.parametrize(("text", "size"), [
    ("4096", 4096), ("10G", 10 << 30), ("512MiB", 512 << 20), ("1t", 1 << 40),
    ("64k", 64 << 10), ("2gb", 2 << 30), (" 8M ", 8 << 20), ("1P", 1 << 50), (8192, 8192),
])
def test_parse_size_accepts(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(("text", "why"), [
    ("0", "must be greater than zero"),
    (0, "must be greater than zero"),
    ("0G", "must be greater than zero"),
    ("1000", "must be a multiple of 4096 bytes"),
    (4095, "must be a multiple of 4096 bytes"),
    ("12X", "expected a number with an optional unit K, M, G, T or P"),
    ("-1", "expected a number with an optional unit K, M, G, T or P"),
    ("", "expected a number with an optional unit K, M, G, T or P"),
    ("1.5G", "expected a number with an optional unit K, M, G, T or P"),
    ("G", "expected a number with an optional unit K, M, G, T or P"),
    (-4096, "must be greater than zero"),
    ("2P", "larger than 1 PiB"),
    ("1025T", "larger than 1 PiB"),
    ("4096" + "0" * 30, "larger than 1 PiB"),
])
def test_parse_size_refuses(text: str | int, why: str) -> None:
    with pytest.raises(InvalidArgument) as ei:
        parse_size(text)
    assert str(ei.value) == f"invalid size {text!r}: {why}"


# -- create, list, find, delete ------------------------------------------------------

def test_create_lays_out_the_volume(dd: Path) -> None:
    info = create_volume(dd, "v1", SIZE)
    vdir = dd / "volumes" / "v1"
    assert info.path == vdir
    assert (info.name, info.size, info.extent_shift) == ("v1", SIZE, 22)
    uid = uuid.UUID(info.uuid)
    assert info.volume_id == int.from_bytes(uid.bytes[:4], "little")
    assert sorted(p.name for p in vdir.iterdir()) == [
        "journal", "lock", "state.json", "store", "volume.json"]
    st = (vdir / "store").stat()
    assert st.st_size == SIZE
    assert st.st_blocks == 0, "the store starts sparse"
    assert os.listdir(vdir / "journal") == ["seg-0000000000000001.jnl"]
    assert state(vdir) == {"kind": "state", "version": 1, "clean": True,
                           "checkpoint_seq": 0, "last_seq": 0, "replica": False,
                           "inconsistent": False, "upstream_seq": 0}
    meta = json.loads((vdir / "volume.json").read_text())
    assert (meta["kind"], meta["version"], meta["uuid"]) == ("volume", 1, info.uuid)
    assert [p.name for p in (dd / "volumes").iterdir()] == ["v1"], "no leftover temp dir"


def test_list_find_delete(dd: Path) -> None:
    assert list_volumes(dd) == []
    b = create_volume(dd, "b", 4096)
    a = create_volume(dd, "a", 8192)
    (dd / "volumes" / ".creating-c-1").mkdir()  # an interrupted create is not a volume
    assert [v.name for v in list_volumes(dd)] == ["a", "b"]
    assert find_volume(dd, "a") == a
    assert find_volume(dd, "b") == b
    delete_volume(dd, "a")
    assert [v.name for v in list_volumes(dd)] == ["b"]
    assert not (dd / "volumes" / "a").exists()
    assert not any(p.name.startswith(".deleting") for p in (dd / "volumes").iterdir())


def test_create_duplicate(dd: Path) -> None:
    create_volume(dd, "v1", SIZE)
    with pytest.raises(VolumeExists) as ei:
        create_volume(dd, "v1", SIZE)
    assert str(ei.value) == f"volume v1 already exists in {dd}"


def test_create_invalid_name_creates_nothing(dd: Path) -> None:
    with pytest.raises(InvalidArgument):
        create_volume(dd, "../evil", SIZE)
    assert not (dd / "evil").exists()
    assert list_volumes(dd) == []


@pytest.mark.parametrize("op", [find_volume, delete_volume])
def test_missing_volume(dd: Path, op: object) -> None:
    with pytest.raises(VolumeNotFound) as ei:
        op(dd, "nope")  # type: ignore[operator]
    assert str(ei.value) == f"no volume named nope in {dd}"


def test_delete_refused_while_open(dd: Path, v1: Path) -> None:
    vol = Volume.open(dd, "v1")
    with pytest.raises(VolumeInUse) as ei:
        delete_volume(dd, "v1")
    assert str(ei.value) == f"volume v1 is in use (held by pid {os.getpid()})"
    assert v1.exists()
    vol.close()
    delete_volume(dd, "v1")
    assert not v1.exists()


# -- the data path -------------------------------------------------------------------

def test_fresh_open_reports_clean(dd: Path, v1: Path) -> None:
    vol = Volume.open(dd, "v1")
    assert vol.recovery == RecoveryReport(False, 0, 0, 0, 0)
    assert state(v1)["clean"] is False, "open marks the volume dirty until a clean close"
    assert (v1 / "lock").read_text() == f"{os.getpid()}\n"
    assert read(vol, 0, 8192) == bytes(8192)
    vol.close()


def test_write_read_trim_zero(dd: Path) -> None:
    create_volume(dd, "v1", SIZE)
    vol = Volume.open(dd, "v1")
    a = pattern(1, 256 * 1024)
    assert vol.write(a, 64 * 1024) == 1
    assert read(vol, 64 * 1024, len(a)) == a
    assert read(vol, 0, 64 * 1024) == bytes(64 * 1024)
    # Overwrite across the 4 MiB extent boundary.
    b = pattern(2, 8192)
    assert vol.write(b, EXT - 4096) == 2
    assert read(vol, EXT - 4096, 8192) == b
    assert vol.al is not None
    # Extent 1 is reached from extent 0, the last one written: a sequential stream, so
    # the extents after it up to the volume's end are activated ahead (AL_AHEAD).
    assert vol.al.extents() == [0, 1, 2, 3]
    # TRIM punches a hole: zeros, and no longer allocated.
    assert vol.trim(64 * 1024, 128 * 1024) == 3
    assert read(vol, 64 * 1024, 128 * 1024) == bytes(128 * 1024)
    assert read(vol, 192 * 1024, 128 * 1024) == a[128 * 1024:]
    assert vol.extents(0, 320 * 1024) == [(0, 192 * 1024, False), (192 * 1024, 128 * 1024, True)]
    # ZERO with and without may_trim.
    assert vol.zero(192 * 1024, 64 * 1024) == 4
    assert vol.zero(256 * 1024, 64 * 1024, may_trim=True, fua=True) == 5
    assert read(vol, 64 * 1024, 256 * 1024) == bytes(256 * 1024)
    vol.flush()
    assert vol.last_seq == 5
    assert vol.journal is not None
    got = [(h.op, h.flags, h.offset, h.length, len(p)) for h, p in vol.journal.records(1)]
    assert got == [
        (Op.WRITE, 0, 64 * 1024, len(a), len(a)),
        (Op.WRITE, 0, EXT - 4096, 8192, 8192),
        (Op.TRIM, 0, 64 * 1024, 128 * 1024, 0),
        (Op.ZERO, 0, 192 * 1024, 64 * 1024, 0),
        (Op.ZERO, Flag.FUA | Flag.MAY_TRIM, 256 * 1024, 64 * 1024, 0),
    ]
    vol.close()


def test_flush_and_fua_sync_the_journal(dd: Path, v1: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    vol = Volume.open(dd, "v1")
    assert vol.journal is not None
    synced: list[int] = []
    real = os.fdatasync

    def spy(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", spy)
    jfd = vol.journal.fd
    assert vol.al is not None
    vol.al.activate([0])  # extent 0 hot: the writes below cause no activity-log sync
    synced.clear()
    vol.write(b"x" * 4096, 0)
    assert jfd not in synced, "a plain write does not wait for the disk"
    vol.flush()
    assert synced.count(jfd) == 1
    synced.clear()
    vol.write(b"y" * 4096, 4096, fua=True)
    assert synced.count(jfd) == 1
    synced.clear()
    vol.trim(0, 4096, fua=True)
    assert synced.count(jfd) == 1
    monkeypatch.undo()
    vol.close()


def test_close_is_clean_and_reopen_sees_the_data(dd: Path, v1: Path) -> None:
    vol = Volume.open(dd, "v1")
    data = pattern(3, 64 * 1024)
    vol.write(data, 3 * EXT)
    vol.write(data, 0)
    vol.close()
    vol.close()  # a second close is harmless
    assert state(v1) == {"kind": "state", "version": 1, "clean": True,
                         "checkpoint_seq": 2, "last_seq": 2, "replica": False,
                         "inconsistent": False, "upstream_seq": 0}
    assert (v1 / "lock").read_text() == ""
    al = ActivityLog(str(v1 / "al"), 8, lambda: None)
    assert al.extents() == [], "a clean close empties the activity log"
    al.close()
    assert not (v1 / "resync.json").exists()
    vol2 = Volume.open(dd, "v1")
    assert vol2.recovery == RecoveryReport(False, 0, 0, 0, 2)
    assert read(vol2, 3 * EXT, len(data)) == data
    assert read(vol2, 0, len(data)) == data
    assert vol2.write(b"z" * 4096, 0) == 3
    vol2.close()


def test_opened_twice(dd: Path, v1: Path) -> None:
    vol = Volume.open(dd, "v1")
    for _ in range(2):  # a refused open must not release the holder's lock
        with pytest.raises(VolumeInUse) as ei:
            Volume.open(dd, "v1")
        assert str(ei.value) == f"volume v1 is in use (held by pid {os.getpid()})"
    vol.write(b"a" * 4096, 0)
    vol.close()
    Volume.open(dd, "v1").close()


def test_readonly_refuses_writes(dd: Path, v1: Path) -> None:
    vol = Volume.open(dd, "v1")
    vol.write(b"q" * 4096, 0)
    vol.close()
    before = (v1 / "state.json").read_bytes()
    ro = Volume.open(dd, "v1", readonly=True)
    assert ro.recovery == RecoveryReport(False, 0, 0, 0, 1)
    for call in (lambda: ro.write(b"x" * 4096, 0), lambda: ro.trim(0, 4096),
                 lambda: ro.zero(0, 4096)):
        with pytest.raises(OSError, match="open read-only") as ei:
            call()
        assert ei.value.errno == errno.EROFS
        assert ei.value.strerror == "volume v1 is open read-only"
    assert read(ro, 0, 4096) == b"q" * 4096
    ro.flush()
    ro.close()
    assert (v1 / "state.json").read_bytes() == before, "a read-only open changes nothing"
    assert read_journal_last(v1) == 1


def read_journal_last(vdir: Path) -> int:
    info = find_volume(vdir.parent.parent, vdir.name)
    j = Journal(vdir / "journal", uuid.UUID(info.uuid).bytes)
    last = j.open().last_seq
    j.close()
    return last


@pytest.mark.parametrize(("offset", "length", "err"), [
    (SIZE, 4096, errno.EINVAL),
    (SIZE + 4096, 4096, errno.EINVAL),
    (SIZE - 4096, 8192, errno.ENOSPC),
    (0, SIZE + 4096, errno.ENOSPC),
])
def test_out_of_range(dd: Path, v1: Path, offset: int, length: int, err: int) -> None:
    vol = Volume.open(dd, "v1")
    msg = f"request [{offset}, +{length}) outside volume of {SIZE} bytes"
    calls = [lambda: vol.write(bytes(length), offset), lambda: vol.trim(offset, length),
             lambda: vol.zero(offset, length), lambda: read(vol, offset, length)]
    for call in calls:
        with pytest.raises(OSError, match="outside volume") as ei:
            call()
        assert (ei.value.errno, ei.value.strerror) == (err, msg)
    assert vol.last_seq == 0, "a refused request journals nothing"
    vol.close()


def test_failed_store_write_journals_nothing(dd: Path, v1: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    vol = Volume.open(dd, "v1")
    vol.write(b"1" * 4096, 0)
    assert vol.store is not None

    def eio(data: bytes, offset: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(vol.store, "pwrite", eio)
    with pytest.raises(OSError, match="Input/output error"):
        vol.write(b"2" * 4096, 4096)
    monkeypatch.undo()
    assert vol.last_seq == 1
    assert vol.write(b"3" * 4096, 4096) == 2
    crash(vol)
    vol2 = Volume.open(dd, "v1")
    assert read(vol2, 0, 8192) == b"1" * 4096 + b"3" * 4096
    vol2.close()


def test_failed_journal_append_marks_the_extents_for_resync(
        dd: Path, v1: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store took the data but the journal could not record it: the client gets the
    error and the peers must be sent those extents again (resync.json)."""
    vol = Volume.open(dd, "v1")
    vol.write(b"1" * 4096, 0)
    assert vol.journal is not None

    def enospc(*args: object, alongside: Callable[[], None] | None = None) -> int:
        if alongside is not None:
            alongside()  # the store takes the change, then the record fails
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(vol.journal, "append", enospc)
    with pytest.raises(OSError, match="No space left on device") as ei:
        vol.write(b"2" * 4096, 2 * EXT - 4096 + 2048)  # spans extents 1 and 2
    assert ei.value.errno == errno.ENOSPC
    with pytest.raises(OSError, match="No space left on device"):
        vol.trim(3 * EXT, 4096)
    monkeypatch.undo()
    assert vol.last_seq == 1
    resync = json.loads((v1 / "resync.json").read_text())
    assert resync["extents"] == [1, 2, 3]
    assert [x["reason"] for x in resync["reasons"]] == [
        "journal append failed: No space left on device"] * 2
    assert vol.write(b"3" * 4096, 4096) == 2
    vol.close()
    assert state(v1)["clean"] is True
    assert json.loads((v1 / "resync.json").read_text())["extents"] == [1, 2, 3]


def test_unpersisted_divergence_keeps_the_volume_unclean(
        dd: Path, v1: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If even resync.json cannot be written, close must not call the volume clean: the
    next open recovers and lists the (still hot) extents.  Close itself succeeds (a full
    disk must not leave the volume unclosable): the journal and store are durable, the
    resync can wait for the recovery."""
    vol = Volume.open(dd, "v1")
    assert vol.journal is not None
    real_write_json = volume_mod.write_json

    def no_resync(path: Path, obj: dict[str, object]) -> None:
        if path.name == "resync.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_json(path, obj)

    def enospc(*args: object, alongside: Callable[[], None] | None = None) -> int:
        if alongside is not None:
            alongside()  # the store takes the change, then the record fails
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(volume_mod, "write_json", no_resync)
    monkeypatch.setattr(vol.journal, "append", enospc)
    with pytest.raises(OSError, match="No space left on device"):
        vol.write(b"d" * 4096, EXT)
    monkeypatch.setattr(vol.journal, "append", Journal.append.__get__(vol.journal))
    vol.close()
    assert vol.lock.fd < 0
    monkeypatch.undo()
    assert state(v1)["clean"] is False
    vol2 = Volume.open(dd, "v1")
    assert vol2.recovery.unclean is True
    assert json.loads((v1 / "resync.json").read_text())["extents"] == [1]
    assert read(vol2, EXT, 4096) == b"d" * 4096
    vol2.close()


def test_checksum_is_sha256_of_the_content(dd: Path, v1: Path) -> None:
    vol = Volume.open(dd, "v1")
    assert vol.checksum() == hashlib.sha256(bytes(SIZE)).hexdigest()
    vol.write(pattern(4, 3 * MiB + 4096), EXT - MiB)
    vol.write(pattern(5, 4096), SIZE - 4096)
    vol.trim(EXT, 64 * 1024)
    whole = read(vol, 0, SIZE)
    assert vol.checksum() == hashlib.sha256(whole).hexdigest()
    vol.close()
    assert checksum_path(v1 / "store", SIZE) == hashlib.sha256(whole).hexdigest()


# -- activation ahead of a sequential stream (issue 18) -------------------------------

def count_al_syncs(vol: Volume, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one at each fdatasync of vol's activity log."""
    assert vol.al is not None
    al, calls, real = vol.al, [], os.fdatasync

    def spy(fd: int) -> None:
        if fd == al.fd:
            calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", spy)
    return calls


@pytest.mark.parametrize("start", [0, 512 * 1024], ids=["aligned", "straddling"])
def test_sequential_stream_syncs_the_activity_log_once_per_four_extents(
        dd: Path, monkeypatch: pytest.MonkeyPatch, start: int) -> None:
    """A stream over n cold extents pays about n / (1 + AL_AHEAD) activity-log syncs,
    not n: each activation takes the next AL_AHEAD extents along.  1 MiB writes, either
    inside extents or each fourth one straddling two."""
    n = 24
    create_volume(dd, "big", n * EXT)
    vol = Volume.open(dd, "big")
    syncs = count_al_syncs(vol, monkeypatch)
    for off in range(start, n * EXT - MiB + 1, MiB):
        vol.write(b"s" * MiB, off)
    assert vol.al is not None
    assert vol.al.extents() == list(range(n))
    # The first write finds no stream (extent 0 alone), then one sync per 1 + AL_AHEAD.
    assert len(syncs) == 1 + -(-(n - 1) // 4) == 7, f"{len(syncs)} syncs for {n} extents"
    assert volume_mod.AL_AHEAD == 3
    monkeypatch.undo()
    vol.close()


def test_interleaved_streams_are_each_activated_ahead(
        dd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two sequential streams in different places, their writes alternating (two
    connections, or nbdcopy's workers): each is recognised among the log's recent
    entries, so each pays one sync per 1 + AL_AHEAD extents."""
    n = 12
    create_volume(dd, "big", 64 * EXT)
    vol = Volume.open(dd, "big")
    syncs = count_al_syncs(vol, monkeypatch)
    for off in range(0, n * EXT, MiB):
        vol.write(b"a" * MiB, off)
        vol.write(b"b" * MiB, 32 * EXT + off)
    assert len(syncs) == 2 * (1 + -(-(n - 1) // 4)) == 8, f"{len(syncs)} syncs"
    monkeypatch.undo()
    assert vol.al is not None
    # Extents 0-11 and 32-43 written; 12 and 44 activated ahead with 9-11 and 41-43.
    assert vol.al.extents() == list(range(n + 1)) + list(range(32, 32 + n + 1))
    vol.close()


def test_random_cold_extents_are_not_activated_ahead(dd: Path) -> None:
    create_volume(dd, "big", 32 * EXT)
    vol = Volume.open(dd, "big")
    for e in (7, 3, 20, 12, 30):
        vol.write(b"r" * 4096, e * EXT + 8192)
    assert vol.al is not None
    assert vol.al.extents() == [3, 7, 12, 20, 30]
    vol.close()


def test_activation_ahead_stops_at_the_volume_end(dd: Path) -> None:
    """The end inside the window: extents up to the last (partial) one, none past it."""
    create_volume(dd, "v", 4 * EXT + 8192)  # extents 0-3 and 8 KiB of extent 4
    vol = Volume.open(dd, "v")
    vol.write(b"a" * 4096, EXT)
    vol.write(b"b" * 4096, 2 * EXT)  # extent 1, then 2: ahead 3 and 4, not 5
    assert vol.al is not None
    assert vol.al.extents() == [1, 2, 3, 4]
    vol.write(b"c" * 8192, 4 * EXT)  # the last extent, hot already: no activation
    assert vol.al.extents() == [1, 2, 3, 4]
    vol.close()


def test_activation_ahead_never_evicts(dd: Path) -> None:
    """A full activity log takes ahead extents only into the slots an eviction the
    request needs anyway frees: each eviction still runs before_evict first."""
    create_volume(dd, "big", 64 * EXT)
    vol = Volume.open(dd, "big", al_slots=16)
    assert vol.al is not None
    durable: list[list[int]] = []
    al, real = vol.al, vol.al.before_evict

    def before_evict() -> None:
        durable.append(al.extents())
        real()

    al.before_evict = before_evict
    for e in range(40):
        vol.write(b"e" * 4096, e * EXT)
        assert e in al.hot and len(al.hot) <= 16
    # Evictions free 16 // 8 = 2 slots; the stream fills the log at extent 15 and
    # then evicts once per two extents, never more at once.
    assert len(durable) == 12
    assert al.extents() == list(range(24, 40))
    vol.close()


def test_crash_after_activation_ahead_recovers(dd: Path) -> None:
    """Crash after a stream activated extents ahead (and evicted, al_slots=8): redo
    gives back every write, and every extent still hot, written or only activated
    ahead, is resynced."""
    create_volume(dd, "big", 32 * EXT)
    vol = Volume.open(dd, "big", al_slots=16)
    want = bytearray(32 * EXT)
    for i, off in enumerate(range(0, 19 * EXT, 3 * MiB)):  # extents 0-18
        data = pattern(900 + i, 512 * 1024)
        vol.write(data, off)
        want[off:off + len(data)] = data
    assert vol.al is not None
    hot = vol.al.extents()
    # 16 slots: 0-3 evicted (made durable first), 19 hot but never written (ahead).
    assert hot == list(range(4, 20)), hot
    crash(vol)
    vol2 = Volume.open(dd, "big", al_slots=16)
    assert vol2.recovery.unclean is True
    assert vol2.recovery.hot_extents == len(hot)
    assert read(vol2, 0, len(want)) == want
    resync = json.loads((vol2.info.path / "resync.json").read_text())
    assert resync["extents"] == hot
    vol2.close()


# -- crash recovery ------------------------------------------------------------------

def test_crash_recovers_and_lists_hot_extents(dd: Path, v1: Path) -> None:
    vol = Volume.open(dd, "v1")
    a, b = pattern(6, 64 * 1024), pattern(7, 4096)
    vol.write(a, 0)
    vol.write(b, 2 * EXT + 4096)
    crash(vol)
    assert state(v1)["clean"] is False
    vol2 = Volume.open(dd, "v1")
    r = vol2.recovery
    assert (r.unclean, r.torn_bytes, r.replayed, r.hot_extents) == (True, 0, 2, 2)
    assert r.last_seq == 3, "recovery appends a MARK record"
    assert read(vol2, 0, len(a)) == a
    assert read(vol2, 2 * EXT + 4096, 4096) == b
    resync = json.loads((v1 / "resync.json").read_text())
    assert (resync["kind"], resync["version"], resync["extent_shift"]) == ("resync", 1, 22)
    assert (resync["extents"], resync["full"]) == ([0, 2], False)
    assert [x["reason"] for x in resync["reasons"]] == ["unclean shutdown"]
    assert vol2.journal is not None
    (h, body), = list(vol2.journal.records(3))
    assert h.op is Op.MARK
    mark = msgpack.unpackb(body)
    assert {k: mark[k] for k in ("event", "hot_extents", "torn_bytes", "replayed")} == {
        "event": "recovered", "hot_extents": [0, 2], "torn_bytes": 0, "replayed": 2}
    assert state(v1)["checkpoint_seq"] == 3, "recovery checkpoints after the redo"
    vol2.close()


def test_second_crash_replays_nothing_and_keeps_resync(dd: Path, v1: Path) -> None:
    vol = Volume.open(dd, "v1")
    vol.write(b"w" * 4096, EXT)
    crash(vol)
    crash(Volume.open(dd, "v1"))
    vol3 = Volume.open(dd, "v1")
    assert (vol3.recovery.unclean, vol3.recovery.replayed) == (True, 0)
    resync = json.loads((v1 / "resync.json").read_text())
    assert resync["extents"] == [1]
    assert [x["reason"] for x in resync["reasons"]] == ["unclean shutdown"] * 2
    assert read(vol3, EXT, 4096) == b"w" * 4096
    vol3.close()


def test_redo_restores_a_lost_store_write(dd: Path, v1: Path) -> None:
    """The store write is lost (power loss before the store reached the disk) while the
    journal kept the record: recovery must redo it from the journal."""
    vol = Volume.open(dd, "v1")
    good = pattern(8, 128 * 1024)
    vol.write(good, EXT + 8192)
    vol.write(pattern(9, 4096), 0)
    vol.trim(2 * EXT, 64 * 1024)
    vol.zero(3 * EXT, 64 * 1024)
    crash(vol)
    fd = os.open(v1 / "store", os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xee" * len(good), EXT + 8192)  # stale bytes where the write went
        os.pwrite(fd, b"\xee" * 64 * 1024, 2 * EXT)  # trimmed range not punched
        os.pwrite(fd, b"\xee" * 64 * 1024, 3 * EXT)  # zeroed range not zeroed
    finally:
        os.close(fd)
    vol2 = Volume.open(dd, "v1")
    assert vol2.recovery.replayed == 4
    assert read(vol2, EXT + 8192, len(good)) == good
    assert read(vol2, 0, 4096) == pattern(9, 4096)
    assert read(vol2, 2 * EXT, 64 * 1024) == bytes(64 * 1024)
    assert read(vol2, 3 * EXT, 64 * 1024) == bytes(64 * 1024)
    vol2.close()


def test_redo_replays_in_order(dd: Path, v1: Path) -> None:
    vol = Volume.open(dd, "v1")
    for i in range(5):
        vol.write(pattern(100 + i, 8192), 4096)
    crash(vol)
    os.truncate(v1 / "store", 0)  # everything in the store lost (sparse again)
    os.truncate(v1 / "store", SIZE)
    vol2 = Volume.open(dd, "v1")
    assert vol2.recovery.replayed == 5
    assert read(vol2, 4096, 8192) == pattern(104, 8192)
    vol2.close()


def test_crash_with_rotations_replays_only_after_the_checkpoint(dd: Path, v1: Path) -> None:
    vol = Volume.open(dd, "v1", segment_bytes=64 * 1024)
    data = {}
    for i in range(20):  # 16 KiB writes: a rotation every 3 records
        off = (i * 7 % 64) * 64 * 1024 + 4096 * (i % 3)
        data[off] = pattern(200 + i, 16 * 1024)
        vol.write(data[off], off)
    last = vol.last_seq
    crash(vol)
    cp = state(v1)["checkpoint_seq"]
    assert isinstance(cp, int)
    assert 0 < cp < last
    vol2 = Volume.open(dd, "v1", segment_bytes=64 * 1024)
    assert vol2.recovery.replayed == last - cp
    for off, d in data.items():
        assert read(vol2, off, len(d)) == d
    vol2.close()


def test_torn_journal_tail_on_crash(dd: Path, v1: Path) -> None:
    vol = Volume.open(dd, "v1")
    vol.write(b"k" * 4096, 0)
    crash(vol)
    seg = v1 / "journal" / "seg-0000000000000001.jnl"
    with open(seg, "ab") as f:
        f.write(b"\x00" * 30)  # an append that never completed
    vol2 = Volume.open(dd, "v1")
    assert (vol2.recovery.torn_bytes, vol2.recovery.replayed) == (30, 1)
    assert read(vol2, 0, 4096) == b"k" * 4096
    vol2.close()


def test_clean_state_but_journal_moved_on(dd: Path, v1: Path) -> None:
    vol = Volume.open(dd, "v1")
    vol.write(b"a" * 4096, 0)
    vol.write(b"b" * 4096, 4096)
    vol.close()
    info = find_volume(dd, "v1")
    j = Journal(v1 / "journal", uuid.UUID(info.uuid).bytes, info.volume_id)
    j.open()
    j.append(Op.WRITE, 0, 0, 4096, b"c" * 4096)
    j.close()
    with pytest.raises(FormatError) as ei:
        Volume.open(dd, "v1")
    assert str(ei.value) == "volume v1: closed cleanly at seq 2 but the journal ends at seq 3"
    # The failed open released everything: the refusal is stable, not "in use".
    with pytest.raises(FormatError):
        Volume.open(dd, "v1")


def test_clean_state_but_journal_shorter(dd: Path, v1: Path) -> None:
    vol = Volume.open(dd, "v1")
    vol.write(b"a" * 4096, 0)
    vol.close()
    st = state(v1)
    st["last_seq"] = 7
    (v1 / "state.json").write_text(json.dumps(st))
    with pytest.raises(FormatError) as ei:
        Volume.open(dd, "v1")
    assert str(ei.value) == "volume v1: closed cleanly at seq 7 but the journal ends at seq 1"


def test_clean_state_with_torn_journal_bytes(dd: Path, v1: Path) -> None:
    vol = Volume.open(dd, "v1")
    vol.write(b"a" * 4096, 0)
    vol.close()
    with open(v1 / "journal" / "seg-0000000000000001.jnl", "ab") as f:
        f.write(b"\x01" * 10)
    with pytest.raises(FormatError) as ei:
        Volume.open(dd, "v1")
    assert str(ei.value) == (
        "volume v1: closed cleanly at seq 1 but the journal ends at seq 1 after cutting 10 "
        "torn bytes")


def test_readonly_open_of_a_crashed_volume_changes_nothing(dd: Path, v1: Path) -> None:
    vol = Volume.open(dd, "v1")
    vol.write(b"r" * 4096, 0)
    crash(vol)
    before = {p: (v1 / p).read_bytes() for p in ("state.json", "al")}
    ro = Volume.open(dd, "v1", readonly=True)
    assert ro.recovery == RecoveryReport(True, 0, 0, 0, 1)
    ro.close()
    assert {p: (v1 / p).read_bytes() for p in before} == before
    assert not (v1 / "resync.json").exists()
    rw = Volume.open(dd, "v1")
    assert (rw.recovery.unclean, rw.recovery.replayed) == (True, 1)
    rw.close()


def test_crash_then_smaller_activity_log_still_resyncs_every_hot_extent(
        dd: Path, v1: Path) -> None:
    vol = Volume.open(dd, "v1", al_slots=8)
    for e in range(4):
        vol.write(b"h" * 4096, e * EXT)
    crash(vol)
    vol2 = Volume.open(dd, "v1", al_slots=2)  # activity_log.extents lowered in the config
    resync = json.loads((v1 / "resync.json").read_text())
    vol2.close()
    assert resync["extents"] == [0, 1, 2, 3]


def test_journal_stays_bounded_and_redo_still_works(dd: Path, v1: Path) -> None:
    """journal_max_bytes bounds the retained segments (DESIGN.md §4), yet never releases a
    record that redo after a crash still needs."""
    seg = 64 * 1024
    vol = Volume.open(dd, "v1", segment_bytes=seg, journal_max_bytes=2 * seg)
    expect = {}
    for i in range(60):  # ~1 MiB of records through 64 KiB segments
        off = (i % 16) * 64 * 1024
        expect[off] = pattern(300 + i, 16 * 1024)
        vol.write(expect[off], off)
    crash(vol)
    jfiles = [p for p in (v1 / "journal").iterdir() if p.name.endswith(".jnl")]
    # The bound may be passed by the active segment and one awaiting its checkpoint.
    assert sum(p.stat().st_size for p in jfiles) <= 4 * seg
    vol2 = Volume.open(dd, "v1", segment_bytes=seg, journal_max_bytes=2 * seg)
    assert vol2.recovery.unclean is True
    for off, d in expect.items():
        assert read(vol2, off, len(d)) == d
    vol2.close()


def test_redo_refuses_when_the_journal_no_longer_reaches_the_checkpoint(
        dd: Path, v1: Path) -> None:
    seg = 64 * 1024
    vol = Volume.open(dd, "v1", segment_bytes=seg)
    for i in range(8):  # 16 KiB records: segments of 3
        vol.write(pattern(400 + i, 16 * 1024), i * 16 * 1024)
    crash(vol)
    segs = sorted(p for p in (v1 / "journal").iterdir() if p.name.endswith(".jnl"))
    assert len(segs) >= 2
    # The redo point says "from seq 1", but the oldest segment (seqs 1-3) is gone.
    st = state(v1)
    st["checkpoint_seq"] = 0
    (v1 / "state.json").write_text(json.dumps(st))
    segs[0].unlink()
    with pytest.raises(FormatError, match=r"seq 1\b"):
        Volume.open(dd, "v1", segment_bytes=seg)
