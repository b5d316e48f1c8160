"""Store health on a real small file system: a 16 MiB tmpfs holding two volumes (journals,
a snapshot's pre-images), nearly filled by another writer.  `nbdgw health`, the health
block of `nbdgw status` and a Monitor see it go critical, then warning, then fine, and
say which volumes hold what."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from blockstore.volume import Volume, create_volume
from gateway import health as H
from gateway.config import NodeConfig
from gateway.health import Level
from tests.conftest import run_nbdgw
from tests.integration.conftest import tmpfs

MiB = 1 << 20
KiB = 1 << 10

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")]




def leave_free(filler: Path, free: int) -> None:
    """Grow or shrink ``filler`` so that ``free`` bytes are left on its file system."""
    st = os.statvfs(filler.parent)
    now = st.f_bfree * st.f_frsize
    size = filler.stat().st_size if filler.exists() else 0
    with open(filler, "ab") as f:
        f.truncate(max(0, size + now - free))
        os.posix_fallocate(f.fileno(), 0, max(1, size + now - free))


def status_json(dd: Path) -> dict:
    return json.loads(run_nbdgw("status", "--json", "--data-dir", str(dd)).stdout)


def make_volumes(dd: Path) -> None:
    create_volume(dd, "v1", 32 * MiB)
    create_volume(dd, "v2", 8 * MiB)
    v1 = Volume.open(dd, "v1")
    v1.write(b"\x11" * 3 * MiB, 0)
    v1.snapshot_create("before")
    v1.write(b"\x22" * MiB, 0)  # 1 MiB of pre-images kept for the snapshot
    v1.close()
    v2 = Volume.open(dd, "v2")
    v2.write(b"\x33" * 512 * KiB, 0)
    v2.close()


def critical_in_cli_and_status(dd: Path) -> None:
    """`nbdgw health` exits with status 2; `nbdgw status` shows it with what to do."""
    cli = run_nbdgw("health", "--json", "--data-dir", str(dd), check=False)
    assert cli.returncode == 2, cli.stderr
    assert json.loads(cli.stdout)["problems"][0]["key"] == "filesystem"
    assert status_json(dd)["health"]["level"] == "critical"
    text = run_nbdgw("status", "--data-dir", str(dd)).stdout.splitlines()
    assert text[1].startswith("health: CRITICAL: ")
    assert text[2].startswith(f"  CRITICAL: the file system of {dd} (tmpfs, {dd}) has ")
    assert text[3].startswith("    what to do: delete snapshots no longer needed")


@pytest.mark.timeout(120)
def test_capacity_on_a_nearly_full_tmpfs(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "data", "16m") as dd:
        make_volumes(dd)
        cfg = NodeConfig(data_dir=dd)
        mon = H.Monitor(cfg)

        # Another writer leaves 512 KiB: critical, writes refused, who holds what.
        filler = dd / "filler"
        leave_free(filler, 512 * KiB)
        with capture_logs() as logs:
            r = mon.run()
        assert r.level is Level.CRITICAL
        (p,) = r.problems
        vols = {v.name: v for v in r.volumes}
        assert (vols["v1"].snapshots, vols["v2"].snapshots) == (1, 0)
        assert vols["v1"].snapshot_bytes >= MiB
        assert 4 * MiB < vols["v1"].journal_bytes < 4 * MiB + 8 * KiB
        assert 512 * KiB < vols["v2"].journal_bytes < 520 * KiB
        fs = r.filesystem
        assert fs is not None and (fs.fstype, fs.mount, fs.size_bytes) == (
            "tmpfs", str(dd), 16 * MiB)
        assert p.message == (
            f"the file system of {dd} (tmpfs, {dd}) has {H._gib(fs.free_bytes)} free of "
            f"16.0 MiB ({100 * fs.free_ratio:.1f} %, critical below 5 %); client writes get "
            "ENOSPC now (the last 1.0 MiB are kept for the volumes' state files); held by "
            f"v1: journal {H._gib(vols['v1'].journal_bytes)}, 1 snapshot "
            f"{H._gib(vols['v1'].snapshot_bytes)}; v2: journal "
            f"{H._gib(vols['v2'].journal_bytes)}; the journals may still grow by "
            f"{H._gib(2 * (1 << 30) - vols['v1'].journal_bytes - vols['v2'].journal_bytes)} "
            "(to journal.max_bytes)")
        assert p.action.startswith("delete snapshots no longer needed")
        assert [(e["event"], e["level"]) for e in logs] == [("health_problem", "critical")]

        critical_in_cli_and_status(dd)

        # 2 MiB free (12.5 %): a warning, logged once as the change it is.
        leave_free(filler, 2 * MiB)
        with capture_logs() as logs:
            r = mon.run()
            mon.run()
        assert r.level is Level.WARNING
        assert "warning below 15 %" in r.problems[0].message
        assert "ENOSPC" not in r.problems[0].message
        assert [(e["event"], e["level"]) for e in logs] == [("health_improved", "warning")]

        # The filler goes: fine again.
        filler.unlink()
        with capture_logs() as logs:
            r = mon.run()
        assert (r.level, r.problems) == (Level.OK, ())
        assert [e["event"] for e in logs] == ["health_recovered"]
        cli = run_nbdgw("health", "--data-dir", str(dd), check=False)
        assert cli.returncode == 0
        assert cli.stdout.splitlines()[0] == "health: OK"
        assert f"  note: {dd} is on tmpfs without a block device: no arrays or disks to " \
               "check" in cli.stdout.splitlines()
