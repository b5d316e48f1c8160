"""Crash recovery on the real data path: `nbdgw serve` + nbdkit + libnbd, kill -9 at random.

Contract 2: after kill -9 the volume reopens without losing anything a write call
returned (the page cache survives kill -9, and redo replays the journal), an unclean
stop is recorded (`volume_recovered`, resync.json with the hot extents), a torn journal
tail is cut, and a corrupt record in the middle of the journal is refused by name until
the operator runs `nbdgw volume repair`.
"""

# The workload's randomness is for coverage and reproducibility (seeds), not secrecy.
# ruff: noqa: S311

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import nbd
import pytest
from crc32c import crc32c

from blockstore.record import (
    REC_HEADER_SIZE,
    SEG_HEADER_SIZE,
    Op,
    decode_header,
    encode_header,
)
from blockstore.volume import AL_AHEAD
from tests.conftest import Served, run_nbdgw

MiB = 1 << 20
VOL_SIZE = 64 * MiB
EXTENT_SHIFT = 22
SEG1 = "seg-0000000000000001.jnl"
CORRUPT_TAIL = ("; refusing to serve this volume (inspect it, then run "
                "'nbdgw volume repair' to cut the journal there)")


# -- helpers -----------------------------------------------------------------------


class Write(NamedTuple):
    """One write of the test's workload; its content is derived from (round, idx)."""

    rnd: int
    idx: int
    offset: int
    length: int

    def data(self) -> bytes:
        unit = struct.pack("<IIQ", self.rnd, self.idx, self.offset)
        return unit * (self.length // len(unit))

    def extents(self) -> set[int]:
        return set(range(self.offset >> EXTENT_SHIFT,
                         ((self.offset + self.length - 1) >> EXTENT_SHIFT) + 1))


def with_ahead(extents: set[int]) -> set[int]:
    """``extents`` and those a sequential stream may have activated ahead of them
    (DESIGN.md §1): hot without a write, resynced all the same."""
    return {a for e in extents for a in range(e, e + AL_AHEAD + 1)
            if a < VOL_SIZE >> EXTENT_SHIFT}


def vol_dir(data_dir: Path, name: str = "v1") -> Path:
    return data_dir / "volumes" / name


def read_state(data_dir: Path, name: str = "v1") -> dict[str, Any]:
    return json.loads((vol_dir(data_dir, name) / "state.json").read_text())


def read_resync(data_dir: Path, name: str = "v1") -> dict[str, Any]:
    return json.loads((vol_dir(data_dir, name) / "resync.json").read_text())


def events(served: Served, event: str) -> list[dict[str, Any]]:
    """The structlog JSON lines of ``event`` that `nbdgw serve` wrote to its stderr."""
    out = []
    for line in served.stderr().splitlines():
        if line.startswith("{"):
            obj = json.loads(line)
            if obj.get("event") == event:
                out.append(obj)
    return out


def read_all(h: Any, size: int = VOL_SIZE) -> bytes:
    chunk = 4 * MiB
    return b"".join(h.pread(chunk, off) for off in range(0, size, chunk))


def first_diff(a: bytes | bytearray, b: bytes | bytearray) -> int:
    """Offset of the first differing byte (-1 if equal); never diff 64 MiB in pytest."""
    if a == b:
        return -1
    step = 64 * 1024
    for off in range(0, max(len(a), len(b)), step):
        if a[off:off + step] != b[off:off + step]:
            return next(off + i for i in range(step)
                        if a[off + i:off + i + 1] != b[off + i:off + i + 1])
    return min(len(a), len(b))


def assert_same(got: bytes, model: bytes | bytearray, what: str) -> None:
    off = first_diff(got, model)
    assert off < 0, f"{what}: first difference at byte {off} (extent {off >> EXTENT_SHIFT})"


def segments(data_dir: Path, name: str = "v1") -> list[Path]:
    return sorted((vol_dir(data_dir, name) / "journal").glob("seg-*.jnl"))


def record_offsets(seg: Path) -> list[tuple[int, int, int]]:
    """(file offset, seq, payload length) of every record in a segment file."""
    buf = seg.read_bytes()
    pos, out = SEG_HEADER_SIZE, []
    while pos < len(buf):
        hdr = decode_header(buf[pos:pos + REC_HEADER_SIZE])
        out.append((pos, hdr.seq, hdr.payload_len))
        pos += REC_HEADER_SIZE + hdr.payload_len
    return out


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def write_config(path: Path, segment_bytes: str, max_bytes: str) -> Path:
    path.write_text(f"version: 1\njournal:\n  segment_bytes: {segment_bytes}\n"
                    f"  max_bytes: {max_bytes}\n")
    return path


@contextmanager
def connected(s: Served, export: str = "v1") -> Iterator[Any]:
    """A libnbd handle that is disconnected on exit, even when the test fails: nbdkit
    waits for connected clients on SIGTERM, so a leaked handle stalls the stop."""
    h = s.connect(export)
    try:
        yield h
    finally:
        with suppress(nbd.Error):  # after kill -9 the connection is already gone
            h.shutdown()


def list_exports(s: Served) -> list[str]:
    """The export names the server offers (NBD_OPT_LIST)."""
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(s.uri())
    names: list[str] = []
    h.opt_list(lambda name, _desc: names.append(name) or 0)
    h.opt_abort()
    return names


def do_writes(h: Any, model: bytearray, writes: list[Write]) -> None:
    for w in writes:
        data = w.data()
        h.pwrite(data, w.offset)
        model[w.offset:w.offset + w.length] = data


# -- the writer that races kill -9 ---------------------------------------------------


@dataclass
class WriterLog:
    """What the writer knows: acknowledged writes, and how many a flush covered."""

    acked: list[Write] = field(default_factory=list)
    flushed: int = 0  # acked[:flushed] were acknowledged before the last completed flush
    inflight: Write | None = None  # the write whose pwrite never returned
    error: str = ""
    start_seq: int = 0  # state.json's last_seq when the round began
    checkpoint_seq: int = 0  # state.json's redo start point when nbdkit died


def writer(h: Any, rnd: int, rng: random.Random, log: WriterLog, stop: threading.Event, *,
           flush_every: int = 8, max_writes: int = 20000) -> None:
    """Random 4 KiB..256 KiB writes, a flush every ``flush_every``, until the server dies."""
    for idx in range(max_writes):
        if stop.is_set():
            return
        length = rng.randrange(1, 65) * 4096
        offset = rng.randrange(0, (VOL_SIZE - length) // 4096 + 1) * 4096
        w = Write(rnd, idx, offset, length)
        try:
            h.pwrite(w.data(), offset)
        except nbd.Error as e:
            log.inflight, log.error = w, str(e)
            return
        log.acked.append(w)
        if len(log.acked) % flush_every == 0:
            covered = len(log.acked)
            try:
                h.flush()
            except nbd.Error as e:
                log.error = str(e)
                return
            log.flushed = covered


# -- tests ----------------------------------------------------------------------------


def crash_round(s: Served, rnd: int, seed: int, pause: float) -> WriterLog:
    """Run the writer against ``s`` and kill -9 nbdkit after ``pause`` seconds."""
    log, stop = WriterLog(start_seq=read_state(s.data_dir)["last_seq"]), threading.Event()
    with connected(s) as h:
        t = threading.Thread(target=writer, args=(h, rnd, random.Random(seed + rnd), log, stop))
        t.start()
        time.sleep(pause)
        s.kill9_nbdkit()
        stop.set()
        t.join(20)
    assert not t.is_alive(), f"seed {seed} round {rnd}: writer stuck after kill -9"
    assert len(log.acked) > 10, f"seed {seed} round {rnd}: only {len(log.acked)} writes"
    st = read_state(s.data_dir)
    assert st["clean"] is False
    log.checkpoint_seq = st["checkpoint_seq"]
    return log


@dataclass
class Model:
    """Expected volume contents and the extents the activity log must have reported."""

    data: bytearray = field(default_factory=lambda: bytearray(VOL_SIZE))
    hot_min: set[int] = field(default_factory=set)  # touched by acknowledged writes
    hot_max: set[int] = field(default_factory=set)  # ... plus the writes in flight, and
    # the extents activated ahead of any of them


def check_recovered(s: Served, data_dir: Path, model: Model, log: WriterLog,
                    what: str) -> None:
    """After a restart following kill -9: logged recovery, data, resync.json."""
    rec = events(s, "volume_recovered")
    assert len(rec) == 1, f"{what}: {rec}"
    assert (rec[0]["volume"], rec[0]["level"]) == ("v1", "warning")
    # Redo replays the journal from the checkpoint: this round's records (every acked
    # write, + the in-flight one if its record was complete when nbdkit died) after it.
    n = log.start_seq + len(log.acked) - log.checkpoint_seq
    assert n <= rec[0]["replayed"] <= n + (log.inflight is not None), (what, rec, n)

    # The model applies acked writes in order; the in-flight one may or may not have landed.
    for w in log.acked:
        model.data[w.offset:w.offset + w.length] = w.data()
        model.hot_min |= w.extents()
    model.hot_max |= model.hot_min
    with connected(s) as h:
        got = read_all(h)
    if log.inflight is not None:
        w = log.inflight
        model.hot_max |= w.extents()
        region = got[w.offset:w.offset + w.length]
        # The store is written before the journal, so kill -9 during the store write
        # leaves part of the request there and no record to redo: each 4 KiB block of
        # an unacknowledged write is old or new (its extents are hot: peers resync them).
        old, new = model.data[w.offset:w.offset + w.length], w.data()
        bad = [i for i in range(0, w.length, 4096)
               if region[i:i + 4096] not in (old[i:i + 4096], new[i:i + 4096])]
        assert not bad, f"{what}: in-flight write {w}: blocks at {bad} are neither old nor new"
        model.data[w.offset:w.offset + w.length] = region
    for w in log.acked[:log.flushed]:
        # Durable by FLUSH (the model holds later overwrites of the same bytes).
        assert got[w.offset:w.offset + w.length] == model.data[w.offset:w.offset + w.length], (
            f"{what}: write {w}, acknowledged before a completed flush, is lost")
    assert_same(got, model.data, f"{what}: an acknowledged write is lost")

    resync = read_resync(data_dir)
    assert (resync["full"], resync["extent_shift"]) == (False, EXTENT_SHIFT)
    assert model.hot_min <= set(resync["extents"]) <= with_ahead(model.hot_max), (
        what, sorted(model.hot_min), resync["extents"], sorted(model.hot_max))


@pytest.mark.timeout(120)
def test_kill9_at_random_loses_no_acknowledged_write(data_dir, volume, serve, tmp_path):
    """5 rounds of random writes killed by kill -9 at a random instant; every write whose
    pwrite returned is present after the restart, the recovery is logged and recorded."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    model = Model()
    # Default 64 MiB segments (rotation = checkpoint happens within a round), but a
    # 128 MiB retention cap so that five rounds of writes stay small on disk.
    cfg = write_config(tmp_path / "nbdgw.yaml", "64M", "128M")
    s = serve(config=cfg)
    for rnd in range(5):
        log = crash_round(s, rnd, seed, rng.uniform(0.3, 1.2))
        s = serve(config=cfg)  # serve recovers the volume before nbdkit starts
        check_recovered(s, data_dir, model, log, f"seed {seed} round {rnd}")
        reasons = [r["reason"] for r in read_resync(data_dir)["reasons"]]
        assert reasons == ["unclean shutdown"] * (rnd + 1)

    # A clean stop after recovery leaves the volume clean; the next open replays nothing.
    assert s.stop() == 0
    st = read_state(data_dir)
    assert st["clean"] is True
    assert st["checkpoint_seq"] == st["last_seq"]
    s = serve(config=cfg)
    assert events(s, "volume_recovered") == []
    with connected(s) as h:
        assert_same(read_all(h), model.data, f"seed {seed}: after a clean restart")
    assert s.stop() == 0
    digest = run_nbdgw("volume", "checksum", "v1", "--data-dir", str(data_dir)).stdout
    assert digest == f"{hashlib.sha256(model.data).hexdigest()}  v1\n"


def _torn_tail(kind: str, next_seq: int, volume_id: int) -> bytes:
    data = bytes(range(256)) * 16  # a 4 KiB write that never finished
    hdr = encode_header(next_seq, Op.WRITE, 0, volume_id, 8 * MiB, len(data), len(data),
                        crc32c(data))
    if kind == "random":
        return random.Random(7).randbytes(3000)
    if kind == "header-20":
        return hdr[:20]
    return hdr + data[:1000]  # "header+partial-payload"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["random", "header-20", "header+partial-payload"])
def test_torn_tail_after_crash_is_cut(data_dir, volume, serve, kind):
    """A crash mid-append leaves a partial record at the end of the journal: the next open
    cuts exactly it, replays the rest, and the volume serves the acknowledged data."""
    model = bytearray(VOL_SIZE)
    s = serve()
    writes = [Write(0, i, i * 3 * MiB + 4096 * i, 4096 * (i + 1)) for i in range(10)]
    with connected(s) as h:
        do_writes(h, model, writes)
        h.flush()
        s.kill9_nbdkit()
    seg = segments(data_dir)[-1]
    assert seg.name == SEG1
    before = seg.read_bytes()
    assert [r[1] for r in record_offsets(seg)] == list(range(1, 11))
    volume_id = json.loads((vol_dir(data_dir) / "volume.json").read_text())["volume_id"]
    tail = _torn_tail(kind, 11, volume_id)
    with open(seg, "ab") as f:
        f.write(tail)

    s = serve()
    rec = events(s, "volume_recovered")
    assert [(r["torn_bytes"], r["replayed"]) for r in rec] == [(len(tail), 10)]
    after = seg.read_bytes()
    # The torn bytes are gone; what follows the last good record is recovery's MARK.
    assert after[:len(before)] == before
    mark = decode_header(after[len(before):len(before) + REC_HEADER_SIZE])
    assert (mark.seq, mark.op) == (11, Op.MARK)
    assert len(after) == len(before) + REC_HEADER_SIZE + mark.payload_len
    with connected(s) as h:
        assert_same(read_all(h), model, f"after cutting a {kind} torn tail")
    written = set().union(*(w.extents() for w in writes))  # extents 0-6, in order
    assert written <= set(read_resync(data_dir)["extents"]) <= with_ahead(written)


@pytest.mark.timeout(90)
def test_corrupt_record_in_the_middle_is_refused_until_repair(data_dir, volume, serve):
    """A bad record with good records after it is corruption, not a torn tail: serve
    refuses the volume naming segment and offset; repair cuts there and serving resumes."""
    model = bytearray(VOL_SIZE)
    s = serve()
    writes = [Write(0, i, i * MiB, 4096 * (1 + i % 5)) for i in range(20)]
    with connected(s) as h:
        do_writes(h, model, writes)
    assert s.stop() == 0
    seg = vol_dir(data_dir) / "journal" / SEG1
    # Record k (seq k) starts at 48 + sum over earlier records of (44 + payload).
    rec5 = SEG_HEADER_SIZE + sum(REC_HEADER_SIZE + w.length for w in writes[:4])
    assert record_offsets(seg)[4] == (rec5, 5, writes[4].length)
    original = seg.read_bytes()
    flip_byte(seg, rec5 + REC_HEADER_SIZE + 100)
    corrupt_msg = (f"journal corrupt in segment {SEG1} at offset {rec5}: "
                   f"record data checksum mismatch{CORRUPT_TAIL}")

    # Only volume: serve refuses it and has nothing to serve.
    p = run_nbdgw("serve", "--data-dir", str(data_dir), "--listen",
                  f"unix:{data_dir / 'refused.sock'}", check=False, timeout=30)
    assert p.returncode == 1
    assert p.stderr.splitlines() == [f"nbdgw: error: volume v1 not served: {corrupt_msg}",
                                     "nbdgw: error: no volume to serve"]
    assert p.stdout == ""

    # With a healthy volume beside it, the healthy one is served and v1 is absent.
    run_nbdgw("volume", "create", "v2", "--size", "8M", "--data-dir", str(data_dir))
    s = serve()
    assert f"nbdgw: error: volume v1 not served: {corrupt_msg}" in s.stderr().splitlines()
    assert list_exports(s) == ["v2"]
    with pytest.raises(nbd.Error, match="v1"), connected(s, "v1"):
        pass
    assert s.stop() == 0

    # The operator's repair cuts the journal before record 5 and quarantines the rest.
    p = run_nbdgw("volume", "repair", "v1", "--yes", "--data-dir", str(data_dir))
    qdirs = sorted((vol_dir(data_dir) / "journal").glob("quarantine-*"))
    assert len(qdirs) == 1
    assert p.stdout == (f"journal of v1 cut after seq 4; moved to {qdirs[0]}: {SEG1} from "
                        f"offset {rec5}; volume marked for a full resync to its peers\n")
    assert seg.read_bytes() == original[:rec5]
    moved = qdirs[0] / f"{SEG1}.from-{rec5}"
    assert [x.name for x in qdirs[0].iterdir()] == [moved.name]
    assert len(moved.read_bytes()) == len(original) - rec5
    resync = read_resync(data_dir)
    assert resync["full"] is True
    assert [r["reason"] for r in resync["reasons"]] == ["journal repaired at seq 4"]

    s = serve()
    assert [(r["volume"], r["replayed"]) for r in events(s, "volume_recovered")] == [("v1", 0)]
    with connected(s) as h:
        # The store was durable at the clean stop and repair does not touch it.
        assert_same(read_all(h), model, "after repair")
        do_writes(h, model, [Write(1, 0, 40 * MiB, 64 * 1024)])
        h.flush()
        assert_same(read_all(h), model, "a write after repair")
    assert s.stop() == 0
    assert read_state(data_dir)["clean"] is True


@pytest.mark.timeout(90)
def test_corrupt_record_in_sealed_segment_found_by_redo(data_dir, volume, serve, tmp_path):
    """With 1 MiB segments, a bad record in a sealed segment is refused when redo reads it.

    Rotation checkpoints the store, so redo normally starts in the active segment; the
    test moves state.json's checkpoint back to 0 (a checkpoint that predates the
    rotation) so that redo must read the sealed segment."""
    cfg = write_config(tmp_path / "nbdgw.yaml", "1M", "8M")
    model = bytearray(VOL_SIZE)
    s = serve(config=cfg)
    writes = [Write(0, i, i * MiB, 256 * 1024) for i in range(8)]
    with connected(s) as h:
        do_writes(h, model, writes)
        h.flush()
        segs = segments(data_dir)
        assert len(segs) >= 2, (
            f"journal.segment_bytes 1M: 2 MiB of writes should fill more than one segment, "
            f"found {[p.name for p in segs]} ({[p.stat().st_size for p in segs]} bytes)")
        s.kill9_nbdkit()
    sealed = segs[0]
    assert sealed.name == SEG1
    recs = record_offsets(sealed)
    assert [r[1] for r in recs] == list(range(1, len(recs) + 1))
    bad_pos = recs[1][0]
    flip_byte(sealed, bad_pos + REC_HEADER_SIZE + 5000)
    state_path = vol_dir(data_dir) / "state.json"
    st = json.loads(state_path.read_text())
    assert st["clean"] is False
    st["checkpoint_seq"] = 0
    state_path.write_text(json.dumps(st))

    p = run_nbdgw("-c", str(cfg), "serve", "--data-dir", str(data_dir), "--listen",
                  f"unix:{data_dir / 'refused.sock'}", check=False, timeout=30)
    assert p.returncode == 1
    assert p.stderr.splitlines() == [
        f"nbdgw: error: volume v1 not served: journal corrupt in segment {SEG1} at offset "
        f"{bad_pos}: record data checksum mismatch{CORRUPT_TAIL}",
        "nbdgw: error: no volume to serve"]

    p = run_nbdgw("volume", "repair", "v1", "--yes", "--data-dir", str(data_dir))
    assert p.stdout.startswith("journal of v1 cut after seq 1; moved to ")
    qdir = next((vol_dir(data_dir) / "journal").glob("quarantine-*"))
    assert sorted(x.name for x in qdir.iterdir()) == sorted(
        [f"{SEG1}.from-{bad_pos}"] + [x.name for x in segs[1:]])
    s = serve(config=cfg)
    with connected(s) as h:
        # kill -9 kept the page cache: the store still holds every write.
        assert_same(read_all(h), model, "after repairing a sealed segment")
    assert read_resync(data_dir)["full"] is True


@pytest.mark.timeout(90)
def journal_bytes(jdir: Path) -> int:
    """Bytes in segment files, tolerating files the server releases meanwhile."""
    total = 0
    for p in jdir.glob("seg-*.jnl"):
        with contextlib.suppress(FileNotFoundError):
            total += p.stat().st_size
    return total


def test_journal_retention_cap(data_dir, volume, serve, tmp_path):
    """segment_bytes 1M, max_bytes 4M: 20 MiB of writes keep about 4 MiB of segments (the
    release runs on the volume's background thread; past cap + 2 segments the request
    path checkpoints itself), and every byte reads back.  Spare segments (recycled, at most
    SPARE_POOL) are reserved space, not retained journal, and are not counted."""
    cfg = write_config(tmp_path / "nbdgw.yaml", "1M", "4M")
    model = bytearray(VOL_SIZE)
    s = serve(config=cfg)
    jdir = vol_dir(data_dir) / "journal"
    peak = 0
    with connected(s) as h:
        for i in range(80):  # 80 x 256 KiB = 20 MiB
            do_writes(h, model, [Write(0, i, i * 256 * 1024, 256 * 1024)])
            peak = max(peak, journal_bytes(jdir))
        h.flush()
        segs = segments(data_dir)
        assert int(segs[0].name[4:20], 16) > 1, f"nothing released: {[p.name for p in segs]}"
        # The hard bound: the request path checkpoints itself past cap + 2 segments.
        assert peak <= 4 * MiB + 3 * MiB + 8192, f"journal peaked at {peak} bytes"
        spares = list(jdir.glob("spare-*.tmp"))
        assert len(spares) <= 4, f"more spares than the pool holds: {spares}"
        assert_same(read_all(h), model, "after 20 MiB through a 4 MiB journal")
    assert s.stop() == 0
    digest = run_nbdgw("volume", "checksum", "v1", "--data-dir", str(data_dir)).stdout
    assert digest == f"{hashlib.sha256(model).hexdigest()}  v1\n"
