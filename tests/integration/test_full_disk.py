"""A full data disk, through the whole cycle an operator lives through.

data_dir is a 64 MiB tmpfs holding a 128 MiB volume.  A real `nbdgw serve` takes 1 MiB
writes from a libnbd client past the point where the file system is full, then:

- every failed write is ENOSPC to the client, nothing acknowledged is lost, and the log
  has one structured ``write_failed`` event per failure (rate-limited, no traceback)
  naming the path, the bytes needed and the bytes free;
- SIGTERM closes the volume cleanly (exit status 0, no ``volume_close_failed``);
- a restart serves again (reads work, writes get ENOSPC), ``serve --read-only`` and
  ``volume checksum`` work, and no ``*.tmp`` file is left anywhere;
- the same once something else took the last free byte of the file system too (the
  space nbdgw keeps for its own state files gone): close still succeeds, and reads,
  read-only serving and the checksum still work.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from contextlib import suppress
from pathlib import Path
from typing import Any

import nbd
import pytest

from tests.conftest import Served, run_nbdgw
from tests.integration.conftest import connected, tmpfs

MiB = 1 << 20
VOL = 128 * MiB

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")]




def chunk(i: int) -> bytes:
    return struct.pack("<QQ", 0xF011_D15C, i) * (MiB // 16)




def events(s: Served, name: str) -> list[dict[str, Any]]:
    out = []
    for line in s.stderr().splitlines():
        with suppress(ValueError):
            e = json.loads(line)
            if isinstance(e, dict) and e.get("event") == name:
                out.append(e)
    return out


def tmp_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.tmp"))


def fill_up(path: Path) -> None:
    """Another writer takes every byte left on the file system of ``path``."""
    with open(path, "wb") as f:
        with suppress(OSError):
            while True:
                f.write(bytes(64 * 1024))
                f.flush()
        with suppress(OSError):
            os.fsync(f.fileno())


def model_digest(acked: list[int], region: dict[int, bytes]) -> str:
    model = bytearray(VOL)
    for i in acked:
        model[i * MiB:(i + 1) * MiB] = chunk(i)
    for i, data in region.items():
        model[i * MiB:(i + 1) * MiB] = data
    return hashlib.sha256(model).hexdigest()


def stopped_cleanly(s: Served) -> str:
    """Stop `nbdgw serve`: exit status 0, no traceback, every volume closed."""
    rc = s.stop()
    err = s.stderr()
    assert rc == 0, err
    assert "Traceback" not in err and "volume_close_failed" not in err, err
    return err


def write_past_full(dd: Path, logs: Path, failures_wanted: int = 25
                    ) -> tuple[list[int], dict[int, bytes], Served]:
    """1 MiB writes from offset 0 on until ``failures_wanted`` of them failed."""
    s = Served(dd, [], log_dir=logs)
    acked: list[int] = []
    errors: list[nbd.Error] = []
    try:
        with connected(s) as h:
            for i in range(VOL // MiB):
                try:
                    h.pwrite(chunk(i), i * MiB)
                except nbd.Error as e:
                    errors.append(e)
                    if len(errors) == failures_wanted:
                        break
                    continue
                assert not errors, f"write {i} succeeded after a failure"
                acked.append(i)
            assert {e.errno for e in errors} == {"ENOSPC"}, errors
            assert len(errors) == failures_wanted and 16 <= len(acked) < 64, len(acked)
            h.flush()
            for i in acked:
                assert h.pread(MiB, i * MiB) == chunk(i), f"acknowledged write {i} lost"
            # The failed range: old (zeros) or new, block by block.
            region = {len(acked): h.pread(MiB, len(acked) * MiB)}
    finally:
        stopped_cleanly(s)
    return acked, region, s


def check_failures_logged(s: Served, dd: Path, failures: int) -> None:
    """One event per failure, but rate-limited: the first one, then at most one every
    10 s with the number of those not logged since, and at close the rest."""
    failed = events(s, "write_failed")
    assert 1 <= len(failed) <= 10, failed
    first = failed[0]
    assert first["level"] == "warning" and first["volume"] == "v1"
    assert first["error"].startswith("No space left on device"), first
    assert first["path"].startswith(str(dd)) and first["needed_bytes"] >= MiB, first
    assert first["free_bytes"] < first["needed_bytes"] + 4 * MiB, first
    unlogged = events(s, "write_failures_unlogged")
    assert len(failed) + sum(e["suppressed"] for e in failed + unlogged) == failures, \
        (failed, unlogged)
    assert unlogged[-1]["count"] == failures


def read_only_and_checksum(dd: Path, logs: Path, acked: list[int], digest: str) -> None:
    s = Served(dd, ["--read-only"], log_dir=logs)
    try:
        with connected(s) as h:
            for i in acked:
                assert h.pread(MiB, i * MiB) == chunk(i)
    finally:
        stopped_cleanly(s)
    p = run_nbdgw("volume", "checksum", "v1", "--data-dir", str(dd), check=False)
    assert (p.returncode, p.stdout) == (0, f"{digest}  v1\n"), p.stderr
    assert tmp_files(dd) == []


@pytest.mark.timeout(240)
def test_full_disk_cycle(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    with tmpfs(tmp_path / "data", "64m") as dd:
        run_nbdgw("volume", "create", "v1", "--size", "128M", "--data-dir", str(dd))

        # 1. Write past full: ENOSPC, nothing acknowledged lost, a clean close.
        acked, region, s = write_past_full(dd, logs)
        check_failures_logged(s, dd, 25)
        assert tmp_files(dd) == []
        state = json.loads((dd / "volumes" / "v1" / "state.json").read_text())
        assert state["clean"] is True, state
        digest = model_digest(acked, region)

        # 2. Restart read-write on the full disk: reads work, writes are ENOSPC.
        s = Served(dd, [], log_dir=logs)
        try:
            with connected(s) as h:
                assert h.pread(MiB, acked[-1] * MiB) == chunk(acked[-1])
                with pytest.raises(nbd.Error) as ei:
                    h.pwrite(chunk(100), 100 * MiB)
                assert ei.value.errnum == errno.ENOSPC
        finally:
            stopped_cleanly(s)

        # 3. Read-only serving and the checksum on the full disk.
        read_only_and_checksum(dd, logs, acked, digest)

        # 4. Someone else takes the last bytes (nbdgw's reserve for its state files
        #    too): a served volume that is written to and closed stays readable.
        s = Served(dd, [], log_dir=logs)
        try:
            fill_up(dd / "filler")
            with connected(s) as h:
                with pytest.raises(nbd.Error):
                    h.pwrite(chunk(101), 101 * MiB)
                assert h.pread(MiB, acked[0] * MiB) == chunk(acked[0])
        finally:
            stopped_cleanly(s)
        assert tmp_files(dd) == []
        read_only_and_checksum(dd, logs, acked, digest)

        # 5. The filler goes, and the guest frees space (TRIM is never refused): it
        #    writes again.
        (dd / "filler").unlink()
        s = Served(dd, [], log_dir=logs)
        try:
            with connected(s) as h:
                gone = acked[-4:-1]
                h.trim(4 * MiB, gone[0] * MiB)
                h.pwrite(chunk(acked[-1]), acked[-1] * MiB)
                h.flush()
        finally:
            stopped_cleanly(s)
        p = run_nbdgw("volume", "checksum", "v1", "--data-dir", str(dd))
        assert p.stdout == f"{model_digest([i for i in acked if i not in gone], region)}  v1\n"
        assert tmp_files(dd) == []
