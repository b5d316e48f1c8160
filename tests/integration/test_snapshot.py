"""Snapshots end to end: real `nbdgw serve` + nbdkit, libnbd clients, the `nbdgw
snapshot` CLI and the control socket; 512 snapshots checked by hash through their
`VOLUME@SNAP` exports; a consistency group taken under a running writer; kill -9 of
nbdkit during creates, deletes, rollbacks and copy-on-writes."""

# The workload's randomness is for coverage (seeded), not secrecy.
# ruff: noqa: S311

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import struct
import threading
import time
from pathlib import Path
from typing import Any

import nbd
import pytest

from blockstore.volume import Volume
from nbdgw_common.control_socket import ControlError, request
from tests.conftest import Served, run_nbdgw

KiB, MiB = 1 << 10, 1 << 20


def connect(s: Served, export: str) -> Any:
    h = nbd.NBD()
    h.connect_uri(s.uri(export))
    return h


def export_digest(s: Served, export: str) -> str:
    h = connect(s, export)
    try:
        size = h.get_size()
        sha = hashlib.sha256()
        for off in range(0, size, 4 * MiB):
            sha.update(h.pread(min(4 * MiB, size - off), off))
        return sha.hexdigest()
    finally:
        h.shutdown()


def ctl(data_dir: Path, via: str, **req: Any) -> dict[str, Any]:
    """A control request to the process serving volume ``via``."""
    return request(data_dir / "volumes" / via, req)


def test_cli_on_a_served_volume(data_dir: Path, volume: str, serve: Any) -> None:
    s: Served = serve()
    dd = str(data_dir)
    h = connect(s, "v1")
    h.pwrite(b"A" * (256 * KiB), 0)
    h.flush()
    out = run_nbdgw("snapshot", "create", "v1", "--name", "before", "--data-dir", dd)
    assert out.stdout.startswith("created snapshot before of volume v1 (id 1, journal seq ")
    h.pwrite(b"B" * (128 * KiB), 64 * KiB)
    h.flush()

    rows = json.loads(run_nbdgw("snapshot", "list", "v1", "--json", "--data-dir", dd).stdout)
    assert [(r["name"], r["held_bytes"]) for r in rows] == [("before", 128 * KiB)]
    listing = run_nbdgw("snapshot", "list", "v1", "--data-dir", dd).stdout.splitlines()
    assert listing[0].split() == ["TIME", "(UTC)", "NAME", "HELD", "SEQ", "GROUP"]
    assert listing[1].split()[2:4] == ["before", "128.0K"]

    assert _list_exports(s) == [("v1", f"nbdgw volume v1 ({64 * MiB} bytes)"),
                                ("v1@before", "nbdgw snapshot before of volume v1, read-only")]
    snap = connect(s, "v1@before")
    assert snap.is_read_only()
    assert snap.pread(256 * KiB, 0) == b"A" * (256 * KiB)
    with pytest.raises(nbd.Error):
        snap.pwrite(b"x" * 4096, 0)

    p = run_nbdgw("snapshot", "delete", "v1", "before", "--data-dir", dd, check=False)
    assert p.returncode == 1
    assert p.stderr.strip() == ("nbdgw: error: snapshot before of volume v1 is exported to 1 "
                                "client (v1@before): disconnect them first")
    snap.shutdown()

    p = run_nbdgw("snapshot", "rollback", "v1", "before", "--data-dir", dd, input_="n\n",
                  check=False)
    assert p.returncode == 1 and "nbdgw: error: not confirmed" in p.stderr
    out = run_nbdgw("snapshot", "rollback", "v1", "before", "--yes", "--data-dir", dd)
    assert out.stdout.strip() == ("rolled volume v1 back to snapshot before (128.0K "
                                  "written)")
    assert h.pread(256 * KiB, 0) == b"A" * (256 * KiB)  # the client sees the old data

    p = run_nbdgw("snapshot", "create", "v1", "--name", "before", "--data-dir", dd,
                  check=False)
    assert p.stderr.strip() == "nbdgw: error: volume v1 has a snapshot named 'before'"
    p = run_nbdgw("snapshot", "create", "v1", "--name", "a@b", "--data-dir", dd, check=False)
    assert p.stderr.strip() == (
        "nbdgw: error: invalid snapshot name 'a@b': use 1-64 letters, digits, '.', '_', ':', "
        "'+' or '-', starting with a letter or digit")
    p = run_nbdgw("snapshot", "rollback", "v1", "nope", "--yes", "--data-dir", dd, check=False)
    assert p.stderr.strip() == "nbdgw: error: volume v1 has no snapshot named 'nope'"
    h.shutdown()
    run_nbdgw("snapshot", "delete", "v1", "before", "--data-dir", dd)
    assert s.stop() == 0
    assert not (data_dir / "volumes/v1/control.sock").exists()

    # Idle: the CLI opens the volume itself.
    run_nbdgw("snapshot", "create", "v1", "--name", "idle", "--data-dir", dd)
    assert [r["name"] for r in json.loads(run_nbdgw(
        "snapshot", "list", "v1", "--json", "--data-dir", dd).stdout)] == ["idle"]


def _list_exports(s: Served) -> list[tuple[str, str]]:
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(s.uri())
    out: list[tuple[str, str]] = []
    h.opt_list(lambda name, desc: out.append((name, desc)) or 0)
    h.opt_abort()
    return out


def test_512_snapshots_by_hash_delete_in_the_middle_and_rollback(
        data_dir: Path, serve: Any) -> None:
    size = 4 * MiB  # 64 COW extents; 512 snapshots checked in seconds
    run_nbdgw("volume", "create", "v1", "--size", str(size), "--data-dir", str(data_dir))
    s: Served = serve()
    h = connect(s, "v1")
    rng = random.Random(512)
    img = bytearray(size)
    want: dict[str, str] = {}
    for i in range(512):
        for _ in range(rng.randint(0, 3)):
            n = rng.choice([4 * KiB, 16 * KiB, 96 * KiB])
            off = rng.randrange(0, (size - n) // 4096 + 1) * 4096
            if rng.random() < 0.1:
                h.zero(n, off)
                img[off:off + n] = bytes(n)
            else:
                data = rng.randbytes(n)
                h.pwrite(data, off)
                img[off:off + n] = data
        ctl(data_dir, "v1", op="create", volumes=["v1"], name=f"s{i}")
        want[f"s{i}"] = hashlib.sha256(img).hexdigest()
    with pytest.raises(ControlError, match=r"^volume v1 has 512 snapshots"):
        ctl(data_dir, "v1", op="create", volumes=["v1"], name="s512")
    assert {n: export_digest(s, f"v1@{n}") for n in want} == want

    for name in rng.sample(sorted(want)[1:-1], 128):
        ctl(data_dir, "v1", op="delete", volume="v1", name=name)
        del want[name]
    assert {n: export_digest(s, f"v1@{n}") for n in want} == want
    target = rng.choice(sorted(want))
    ctl(data_dir, "v1", op="rollback", volume="v1", name=target)
    assert export_digest(s, "v1") == want[target]
    h.shutdown()
    assert s.stop() == 0
    vol = Volume.open(data_dir, "v1")  # clean close, reopen: the same snapshots
    try:
        assert [r["name"] for r in vol.snapshot_list()] == sorted(
            want, key=lambda n: int(n[1:]))
        assert vol.checksum() == want[target]
    finally:
        vol.close()


def test_consistency_group_is_one_instant(data_dir: Path, serve: Any) -> None:
    """A writer stamps counter i into volume a, then into b; a snapshot of both at one
    instant shows a's counter equal to b's or one ahead, never anything else."""
    for name in ("a", "b"):
        run_nbdgw("volume", "create", name, "--size", "4M", "--data-dir", str(data_dir))
    s: Served = serve()
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            ha, hb = connect(s, "a"), connect(s, "b")
            i = 0
            while not stop.is_set():
                i += 1
                stamp = struct.pack("<Q", i) * 512
                ha.pwrite(stamp, 0)
                hb.pwrite(stamp, 0)
            ha.shutdown()
            hb.shutdown()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    pairs = []
    try:
        for i in range(8):
            time.sleep(0.05)
            out = run_nbdgw("snapshot", "create", "a", "b", "--name", f"g{i}", "--json",
                            "--data-dir", str(data_dir))
            rows = json.loads(out.stdout)
            assert [r["volume"] for r in rows] == ["a", "b"]
            assert rows[0]["group"] == rows[1]["group"] != ""
            got = []
            for vol in ("a", "b"):
                hs = connect(s, f"{vol}@g{i}")
                got.append(struct.unpack("<Q", hs.pread(8, 0))[0])
                hs.shutdown()
            pairs.append(tuple(got))
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors
    assert all(a in (b, b + 1) for a, b in pairs), pairs
    assert pairs[-1][0] > 0


def test_group_across_processes_is_refused(data_dir: Path, serve: Any) -> None:
    for name in ("a", "b"):
        run_nbdgw("volume", "create", name, "--size", "4M", "--data-dir", str(data_dir))
    serve("--volume", "a")
    p = run_nbdgw("snapshot", "create", "a", "b", "--data-dir", str(data_dir), check=False)
    assert p.stderr.strip() == ("nbdgw: error: volumes a are in use and b are not: a "
                                "consistency group must be served by one nbdgw serve, or idle")


# -- kill -9 -------------------------------------------------------------------------------

class Driver:
    """Random writes, creates, deletes and rollbacks on a served volume, one at a time,
    against a model; an operation in flight when nbdkit dies is remembered as such."""

    def __init__(self, data_dir: Path, size: int, seed: int) -> None:
        self.data_dir = data_dir
        self.size = size
        self.rng = random.Random(seed)
        self.img = bytearray(size)
        self.snaps: dict[str, str] = {}  # acknowledged snapshots -> digest
        self.n = 0
        self.in_flight: tuple[str, Any] | None = None
        self.error: BaseException | None = None
        self.cut: list[str] = []  # the operation each kill cut short

    def run(self, s: Served) -> None:
        try:
            h = connect(s, "v1")
            while True:
                self._one(h)
        except (nbd.Error, ControlError, OSError):
            return  # nbdkit died: self.in_flight is the operation cut short
        except BaseException as e:  # noqa: BLE001 - the test reports it
            self.error = e

    def _one(self, h: Any) -> None:
        rng = self.rng
        k = rng.random()
        if not self.snaps and k >= 0.6:
            k = 0.7  # nothing to delete or roll back to: take one
        if k < 0.6:
            n = rng.choice([4 * KiB, 64 * KiB, 200 * KiB])
            off = rng.randrange(0, (self.size - n) // 4096 + 1) * 4096
            data = rng.randbytes(n)
            self.in_flight = ("write", (off, data))
            h.pwrite(data, off)
            self.img[off:off + n] = data
        elif k < 0.8:
            name = f"k{self.n}"
            self.n += 1
            self.in_flight = ("create", (name, hashlib.sha256(self.img).hexdigest()))
            ctl(self.data_dir, "v1", op="create", volumes=["v1"], name=name)
            self.snaps[name] = self.in_flight[1][1]
        elif k < 0.95:
            name = rng.choice(sorted(self.snaps))
            self.in_flight = ("delete", name)
            ctl(self.data_dir, "v1", op="delete", volume="v1", name=name)
            del self.snaps[name]
        else:
            name = rng.choice(sorted(self.snaps))
            self.in_flight = ("rollback", name)
            ctl(self.data_dir, "v1", op="rollback", volume="v1", name=name)
            live = h.pread(self.size, 0)
            assert hashlib.sha256(live).hexdigest() == self.snaps[name]
            self.img = bytearray(live)
        self.in_flight = None

    def check(self) -> None:
        """After recovery: every acknowledged snapshot exact; the one in flight exact
        if it exists; the live volume the model (or the model plus the cut operation)."""
        vol = Volume.open(self.data_dir, "v1")
        try:
            rows = {r["name"] for r in vol.snapshot_list()}
            got = {}
            for name in rows:
                buf = bytearray(self.size)
                vol.snapshot_view(name).read_into(buf, 0)
                got[name] = hashlib.sha256(buf).hexdigest()
            live = bytearray(self.size)
            vol.read_into(live, 0)
        finally:
            vol.close()
        kind, arg = self.in_flight or ("", None)
        self.cut.append(kind)
        for name, digest in self.snaps.items():
            if kind == "delete" and name == arg and name not in got:
                continue
            assert got.get(name) == digest, f"snapshot {name} changed ({kind} {arg} cut)"
        if kind == "create" and arg[0] in got:
            assert got[arg[0]] == arg[1]
            self.snaps[arg[0]] = arg[1]
        if kind == "delete" and arg not in got:
            del self.snaps[arg]
        assert set(got) == set(self.snaps), (sorted(got), sorted(self.snaps))
        ok = [bytes(self.img)]
        if kind == "write":
            off, data = arg
            alt = bytearray(self.img)
            alt[off:off + len(data)] = data
            ok.append(bytes(alt))
        if kind == "rollback":
            ok = [bytes(live)] if hashlib.sha256(live).hexdigest() in (
                self.snaps[arg], hashlib.sha256(self.img).hexdigest()) else ok
        assert bytes(live) in ok, f"live volume is neither before nor after {kind}"
        self.img = bytearray(live)
        self.in_flight = None


def test_kill9_during_snapshot_operations(data_dir: Path, serve: Any) -> None:
    size = 8 * MiB
    run_nbdgw("volume", "create", "v1", "--size", str(size), "--data-dir", str(data_dir))
    d = Driver(data_dir, size, seed=99)
    rng = random.Random(5)
    for _round in range(6):
        s: Served = serve()
        pid = s.nbdkit_pid()
        t = threading.Thread(target=d.run, args=(s,), daemon=True)
        t.start()
        time.sleep(rng.uniform(0.5, 2.0))
        os.kill(pid, signal.SIGKILL)
        t.join(60)
        assert not t.is_alive()
        assert d.error is None, d.error
        with contextlib.suppress(Exception):
            s.proc.wait(30)
        s.stop()
        d.check()
    assert d.n > 5, d.cut  # snapshots were really taken and cut
    print("operations cut by kill -9:", d.cut)

