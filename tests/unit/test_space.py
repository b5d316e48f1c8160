"""A full file system: state files (meta.write_json), the room kept for them
(space.SpaceGuard) and the rate-limited write_failed events (volume.FailureLog)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from blockstore import meta, space
from blockstore.errors import NoSpace
from blockstore.record import Op
from blockstore.volume import FailureLog

MiB = 1 << 20


def enospc(*_args: Any, **_kw: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def listing(d: Path) -> list[str]:
    return sorted(os.listdir(d))


def test_write_json_rewrites_a_small_file_in_place_on_a_full_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    meta.write_json(path, {"kind": "state", "version": 1, "checkpoint_seq": 123456, "a": "x"})
    old_size = path.stat().st_size
    monkeypatch.setattr(meta, "pwrite_all", enospc)  # the temp file cannot be written
    meta.write_json(path, {"kind": "state", "version": 1, "checkpoint_seq": 7})
    assert json.loads(path.read_text()) == {"kind": "state", "version": 1, "checkpoint_seq": 7}
    assert path.stat().st_size == old_size  # padded: the same block, the same size
    assert listing(tmp_path) == ["state.json"]  # no temp file left
    meta.write_json(path, {"kind": "state", "version": 1, "checkpoint_seq": 7, "longer": "y" * 80})
    assert json.loads(path.read_text())["longer"] == "y" * 80  # grown within its block


def test_write_json_on_a_full_disk_names_path_need_and_free(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "resync.json"
    meta.write_json(big, {"extents": list(range(200))})
    before = big.read_bytes()
    monkeypatch.setattr(meta, "pwrite_all", enospc)
    monkeypatch.setattr(space, "free_bytes", lambda st: 12288)
    new = {"extents": list(range(300))}
    with pytest.raises(NoSpace) as ei:
        meta.write_json(big, new)
    need = len(json.dumps(new, indent=2, sort_keys=True)) + 1
    assert str(ei.value) == (f"No space left on device: writing {big} needs {need} bytes, "
                             "12288 bytes free on its file system")
    assert (ei.value.errno, ei.value.path, ei.value.needed, ei.value.free) == (
        errno.ENOSPC, str(big), need, 12288)
    assert big.read_bytes() == before  # too big for a sector: never rewritten in place
    with pytest.raises(NoSpace):
        meta.write_json(tmp_path / "new.json", {"kind": "x"})  # nothing to rewrite
    assert listing(tmp_path) == ["resync.json"]


def test_write_json_removes_its_temp_file_on_any_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def eio(*_args: Any, **_kw: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(meta, "pwrite_all", eio)
    with pytest.raises(OSError, match="Input/output error"):
        meta.write_json(tmp_path / "state.json", {"kind": "state"})
    assert listing(tmp_path) == []


class FakeStatvfs:
    def __init__(self, total: int, free: int) -> None:
        self.f_frsize = 4096
        self.f_blocks = total // 4096
        self.f_bfree = self.f_bavail = free // 4096


def test_reserve_is_a_fraction_of_the_file_system_within_bounds() -> None:
    assert space.reserve_bytes(64 * MiB) == MiB
    assert space.reserve_bytes(10 << 30) == (10 << 30) // 512
    assert space.reserve_bytes(10 << 40) == 64 * MiB


def test_space_guard_refuses_what_would_eat_into_the_reserve(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fs = {"free": 40 * MiB}
    calls = []

    def statvfs(path: Any) -> FakeStatvfs:
        calls.append(path)
        return FakeStatvfs(1 << 30, fs["free"])

    monkeypatch.setattr(space.os, "statvfs", statvfs)
    guard = space.SpaceGuard(tmp_path / "store", "v1")
    assert guard.reserve == 2 * MiB  # 1 GiB / 512
    guard.check(MiB)  # room 37 MiB: asks again after a quarter of it (9.25 MiB)
    for _ in range(9):
        guard.check(MiB)
    assert len(calls) == 2  # the constructor's and the first check's
    guard.check(MiB)
    assert len(calls) == 3
    fs["free"] = 3 * MiB
    guard.budget = 0
    with pytest.raises(NoSpace) as ei:
        guard.check(2 * MiB)
    assert str(ei.value) == (
        f"No space left on device: a write to volume v1 needs {2 * MiB} bytes (store and "
        f"journal) plus {2 * MiB} kept free for nbdgw's state files; {3 * MiB} bytes free "
        f"on the file system of {tmp_path / 'store'}")
    assert (ei.value.needed, ei.value.free) == (4 * MiB, 3 * MiB)
    guard.check(MiB // 2)  # what still fits is not refused


def test_write_failures_are_logged_at_a_bounded_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("blockstore.volume.time.monotonic", lambda: now[0])
    fl = FailureLog("v1")
    err = NoSpace("No space left on device: full", "/d/volumes/v1/store", 3 * MiB, 0)
    with capture_logs() as logs:
        for _ in range(5):
            fl.report(Op.WRITE, 0, MiB, err)
            now[0] += 1.0
        now[0] += 10.0
        fl.report(Op.ZERO, MiB, 4096, OSError(errno.EIO, "Input/output error"))
        fl.report(Op.WRITE, 0, MiB, err)
        fl.flush()
        fl.flush()
    assert logs == [
        {"component": "blockstore", "event": "write_failed", "log_level": "warning",
         "volume": "v1", "op": "write",
         "offset": 0, "length": MiB, "error": "No space left on device: full",
         "errno": "ENOSPC", "suppressed": 0, "count": 1, "path": "/d/volumes/v1/store",
         "needed_bytes": 3 * MiB, "free_bytes": 0},
        {"component": "blockstore", "event": "write_failed", "log_level": "warning",
         "volume": "v1", "op": "zero",
         "offset": MiB, "length": 4096, "error": "Input/output error", "errno": "EIO",
         "suppressed": 4, "count": 6},
        {"component": "blockstore", "event": "write_failures_unlogged", "log_level": "warning",
         "volume": "v1",
         "suppressed": 1, "count": 7},
    ]
