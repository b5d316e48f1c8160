"""Store health (gateway/health.py) on recorded outputs: /proc/mdstat, `mdadm --detail`
and `smartctl --json -i -H -A` of healthy, degraded, rebuilding and failed arrays and
disks (tests/unit/health_data/), parsed to exact reports; the walk from data_dir to its
arrays and disks on a fake /sys; the transitions a Monitor logs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway import health as H
from gateway.config import HealthConfig, NodeConfig
from gateway.health import Disk, Level, MdArray, MdMember, MdSync, Problem
from tests.statusschema import HEALTH, check

DATA = Path(__file__).parent / "health_data"
GiB = 1 << 30


def text(name: str) -> str:
    return (DATA / name).read_text()


def members(*pairs: str) -> tuple[MdMember, ...]:
    return tuple(MdMember(*p.split(":")) for p in pairs)


# -- /proc/mdstat and mdadm --detail ---------------------------------------------------

HEALTHY = MdArray("md0", "raid1", "healthy", 2, 2, 1, 0,
                  members("sda1:active", "sdb1:active", "sdc1:spare"))
DEGRADED = MdArray("md0", "raid1", "degraded", 2, 1, 0, 1,
                   members("sda1:active", "sdb1:faulty"))
REBUILDING = MdArray("md0", "raid1", "rebuilding", 2, 1, 1, 0,
                     members("sda1:active", "sdc1:rebuilding"),
                     MdSync("recovery", 8.5, 152.4))
FAILED = MdArray("md1", "raid5", "failed", 4, 2, 0, 2,
                 members("sda2:active", "sdb2:active", "sdc2:faulty", "sdd2:faulty"))


@pytest.mark.parametrize(("fixture", "expected"), [
    ("mdstat-healthy", {"md0": HEALTHY}),
    ("mdstat-degraded", {"md0": DEGRADED}),
    ("mdstat-rebuilding", {"md0": REBUILDING}),
    ("mdstat-failed", {"md1": FAILED, "md0": MdArray("md0", "raid1", "healthy", 2, 2, 0, 0,
                                                     members("sda1:active", "sdb1:active"))}),
    ("mdstat-resync", {
        "md1": MdArray("md1", "raid5", "resyncing", 4, 4, 0, 0,
                       members("sda2:active", "sdb2:active", "sdc2:active", "sdd2:active"),
                       MdSync("resync", 12.6, 140.9)),
        "md2": MdArray("md2", "raid1", "resyncing", 2, 2, 0, 0,
                       members("sde1:active", "sdf1:active"), MdSync("resync", None)),
        "md127": MdArray("md127", "", "inactive", 0, 0, 1, 0, members("sdg1:spare"))}),
])
def test_mdstat(fixture: str, expected: dict[str, MdArray]) -> None:
    assert H.parse_mdstat(text(fixture)) == expected


@pytest.mark.parametrize(("fixture", "name", "expected"), [
    ("mdadm-detail-healthy", "md0", MdArray(
        "md0", "raid1", "healthy", 2, 2, 1, 0,
        members("sda1:active", "sdb1:active", "sdc1:spare"), None, "clean")),
    ("mdadm-detail-degraded", "md0", MdArray(
        "md0", "raid1", "degraded", 2, 1, 0, 1,
        members("sda1:active", "-:removed", "sdb1:faulty"), None, "clean, degraded")),
    ("mdadm-detail-rebuilding", "md0", MdArray(
        "md0", "raid1", "rebuilding", 2, 1, 1, 0, members("sda1:active", "sdc1:rebuilding"),
        MdSync("recovery", 8.0), "clean, degraded, recovering")),
    ("mdadm-detail-failed", "md1", MdArray(
        "md1", "raid5", "failed", 4, 2, 0, 2,
        members("sda2:active", "sdb2:active", "-:removed", "-:removed", "sdc2:faulty",
                "sdd2:faulty"), None, "clean, FAILED")),
])
def test_mdadm_detail(fixture: str, name: str, expected: MdArray) -> None:
    assert H.parse_mdadm_detail(name, text(fixture)) == expected


def test_merge_takes_mdadm_state_and_mdstat_progress() -> None:
    merged = H.merge_md(REBUILDING, H.parse_mdadm_detail("md0", text("mdadm-detail-rebuilding")))
    assert merged == MdArray("md0", "raid1", "rebuilding", 2, 1, 1, 0,
                             members("sda1:active", "sdc1:rebuilding"),
                             MdSync("recovery", 8.5, 152.4), "clean, degraded, recovering")
    assert H.merge_md(DEGRADED, None) == DEGRADED


H0 = HealthConfig()


@pytest.mark.parametrize(("array", "problem"), [
    (HEALTHY, None),
    (DEGRADED, Problem(
        "array md0", Level.CRITICAL,
        "MD array md0 (raid1) is degraded: 1 of 2 devices working, faulty: sdb1, no spare",
        "mdadm /dev/md0 --remove the faulty device, add a new disk (mdadm /dev/md0 --add "
        "DEVICE); it rebuilds onto it")),
    (REBUILDING, Problem(
        "array md0", Level.WARNING,
        "MD array md0 (raid1) is rebuilding onto sdc1: 8.5 % done, about 152 min left; "
        "1 of 2 devices in sync",
        "let it finish; until then one more disk failure may lose the array: keep the "
        "replicas in sync")),
    (FAILED, Problem(
        "array md1", Level.CRITICAL,
        "MD array md1 (raid5) has failed: 2 of 4 devices working, faulty: sdc2, sdd2",
        "the data under data_dir cannot be trusted or read here: serve from a replica "
        "('nbdgw switchover' or 'nbdgw promote'), then repair md1 (mdadm --detail "
        "/dev/md1)")),
    (MdArray("md0", "raid1", "healthy", 2, 2, 0, 1,
             members("sda1:active", "sdc1:active", "sdb1:faulty")), Problem(
        "array md0", Level.WARNING, "MD array md0 (raid1) runs on a spare; faulty: sdb1",
        "mdadm /dev/md0 --remove /dev/sdb1 and replace the disk, so that a spare is there "
        "for the next failure")),
    (MdArray("md3", "raid6", "degraded", 6, 5, 0, 0), Problem(
        "array md3", Level.WARNING, "MD array md3 (raid6) is degraded: 5 of 6 devices "
        "working, no spare", "add a new disk (mdadm /dev/md3 --add DEVICE); it rebuilds "
        "onto it")),
])
def test_array_problems(array: MdArray, problem: Problem | None) -> None:
    report = H.assess(None, [array], [], [], H0)
    assert report.problems == (() if problem is None else (problem,))
    assert report.level == (Level.OK if problem is None else problem.level)


def test_resync_is_a_note_not_a_problem() -> None:
    arrays = H.parse_mdstat(text("mdstat-resync"))
    report = H.assess(None, [arrays["md1"], arrays["md2"]], [], [], H0)
    assert (report.level, report.problems) == (Level.OK, ())
    assert report.notes == ("MD array md1: resync 12.6 %", "MD array md2: resync")


# -- smartctl ------------------------------------------------------------------------------


@pytest.mark.parametrize(("fixture", "disk"), [
    ("smartctl-ata-healthy.json", Disk("/dev/sda", "WDC WD20EFRX-68EUZN0", "WD-WCC4M1KX7Y3H",
                                       True, 0, 0, 34)),
    ("smartctl-ata-failing.json", Disk("/dev/sdb", "WDC WD20EFRX-68EUZN0", "WD-WCC4M5RL0JZ2",
                                       False, 3912, 16, 39)),
    ("smartctl-ata-worn.json", Disk("/dev/sdc", "WDC WD20EFRX-68EUZN0", "WD-WCC4M3PZ81DA",
                                    True, 8, 2, 63)),
    ("smartctl-nvme-healthy.json", Disk("/dev/nvme0", "Samsung SSD 970 EVO Plus 1TB",
                                        "S4EWNX0R312345A", True, None, None, 38, 0, 0, 100,
                                        10)),
    ("smartctl-nvme-critical.json", Disk("/dev/nvme1", "Samsung SSD 970 EVO Plus 1TB",
                                         "S4EWNX0R398765B", False, None, None, 47, 12, 5, 9,
                                         10)),
    ("smartctl-virtio.json", Disk("/dev/vda", error="/dev/vda: Unable to detect device type")),
])
def test_smartctl(fixture: str, disk: Disk) -> None:
    assert H.parse_smartctl(disk.device, text(fixture)) == disk


def disk(fixture: str, device: str) -> Disk:
    return H.parse_smartctl(device, text(fixture))


@pytest.mark.parametrize(("d", "problem"), [
    (disk("smartctl-ata-healthy.json", "/dev/sda"), None),
    (disk("smartctl-nvme-healthy.json", "/dev/nvme0"), None),
    (disk("smartctl-virtio.json", "/dev/vda"), None),
    (disk("smartctl-ata-failing.json", "/dev/sdb"), Problem(
        "disk /dev/sdb", Level.CRITICAL, "disk /dev/sdb (WDC WD20EFRX-68EUZN0): fails its "
        "SMART health check, 3912 reallocated sectors, 16 pending sectors",
        "replace it now (a member of an MD array: mdadm --fail and --remove it first; the "
        "array rebuilds onto the new disk)")),
    (disk("smartctl-ata-worn.json", "/dev/sdc"), Problem(
        "disk /dev/sdc", Level.WARNING, "disk /dev/sdc (WDC WD20EFRX-68EUZN0): 8 reallocated "
        "sectors, 2 pending sectors, 63 °C (health.max_disk_temperature 60)",
        "it is wearing out: plan its replacement and watch the counts; check the cooling")),
    (disk("smartctl-nvme-critical.json", "/dev/nvme1"), Problem(
        "disk /dev/nvme1", Level.CRITICAL, "disk /dev/nvme1 (Samsung SSD 970 EVO Plus 1TB): "
        "fails its SMART health check, NVMe critical warning 0x05 (spare below threshold, "
        "reliability degraded), available spare 9 % (threshold 10 %), 12 media errors",
        "replace it now (a member of an MD array: mdadm --fail and --remove it first; the "
        "array rebuilds onto the new disk)")),
])
def test_disk_problems(d: Disk, problem: Problem | None) -> None:
    report = H.assess(None, [], [d], [], H0)
    assert report.problems == (() if problem is None else (problem,))
    if d.error:
        assert report.notes == (f"SMART of /dev/vda not read: {d.error}",)


def test_garbage_from_smartctl_is_an_error_not_a_crash() -> None:
    assert H.parse_smartctl("/dev/sda", "Segmentation fault") == Disk(
        "/dev/sda", error="smartctl printed no JSON")


# -- the file system -----------------------------------------------------------------------


def fs(free: int, size: int = 100 * GiB) -> H.Filesystem:
    return H.Filesystem("/srv/nbdgw", "/srv", "/dev/md0", "ext4", size, free, 64 << 20)


VOLS = [H.VolumeSpace("v1", 50 * GiB, 30 * GiB, 6 * GiB, 8 * GiB, 12, 20 * GiB),
        H.VolumeSpace("v2", 10 * GiB, 2 * GiB, 1 * GiB, 8 * GiB, 0, 0)]


@pytest.mark.parametrize(("free", "level", "limit"), [
    (20 * GiB, None, ""),
    (10 * GiB, Level.WARNING, "10.0 %, warning below 15 %"),
    (4 * GiB, Level.CRITICAL, "4.0 %, critical below 5 %"),
])
def test_filesystem_thresholds_and_what_holds_the_space(free: int, level: Level | None,
                                                         limit: str) -> None:
    report = H.assess(fs(free), [], [], VOLS, H0)
    if level is None:
        assert report.problems == ()
        return
    assert report.problems == (Problem(
        "filesystem", level,
        f"the file system of /srv/nbdgw (/dev/md0, /srv) has {free / GiB:.1f} GiB free of "
        f"100.0 GiB ({limit}); held by v1: journal 6.0 GiB, 12 snapshots 20.0 GiB; v2: "
        "journal 1.0 GiB; the journals may still grow by 9.0 GiB (to journal.max_bytes)",
        "delete snapshots no longer needed ('nbdgw snapshot list VOLUME', 'nbdgw snapshot "
        "delete VOLUME NAME'), or lower journal.max_bytes (now 8.0 GiB per volume; a peer "
        "further behind is then resynced by extents), or grow the file system"),)


def test_a_full_file_system_says_writes_are_refused() -> None:
    (p,) = H.assess(fs(32 << 20), [], [], [], H0).problems
    assert p.level is Level.CRITICAL
    assert p.message == (
        "the file system of /srv/nbdgw (/dev/md0, /srv) has 32.0 MiB free of 100.0 GiB "
        "(0.0 %, critical below 5 %); client writes get ENOSPC now (the last 64.0 MiB are "
        "kept for the volumes' state files)")
    assert p.action == "grow the file system"


def test_overcommitted_sparse_stores_are_a_note() -> None:
    report = H.assess(fs(20 * GiB), [], [], VOLS, H0)
    assert report.notes == ("the volumes' sparse stores may still grow by 28.0 GiB, more "
                            "than the 20.0 GiB free: the file system is overcommitted",)


def test_mountinfo_picks_the_longest_mount_of_the_device() -> None:
    info = ("22 1 9:0 / / rw,relatime shared:1 - ext4 /dev/md0 rw\n"
            "40 22 9:0 /srv /srv/nbdgw rw,relatime shared:1 - ext4 /dev/md0 rw\n"
            "41 22 0:44 / /srv/nbdgw/x rw - tmpfs tmpfs rw,size=16384k\n")
    assert H.parse_mountinfo(info, (9, 0), "/srv/nbdgw/volumes") == (
        "/srv/nbdgw", "/dev/md0", "ext4")
    assert H.parse_mountinfo(info, (9, 0), "/var/lib") == ("/", "/dev/md0", "ext4")
    assert H.parse_mountinfo(info, (0, 44), "/srv/nbdgw/x") == ("/srv/nbdgw/x", "tmpfs", "tmpfs")


# -- from data_dir to arrays and disks, with fake tools ------------------------------------


def fake_sys(root: Path, data_dir: Path) -> Path:
    """LVM (dm-0) on md0 (RAID1 of sda1, sdb1), like a typical store node."""
    dev = os.stat(data_dir).st_dev
    blk = root / "devices"
    for d in ("virtual/block/dm-0/slaves", "virtual/block/md0/slaves", "virtual/block/md0/md",
              "pci/ata1/block/sda/sda1", "pci/ata2/block/sdb/sdb1"):
        (blk / d).mkdir(parents=True)
    for p in ("sda", "sdb"):
        (blk / f"pci/ata{1 if p == 'sda' else 2}/block/{p}/{p}1/partition").write_text("1\n")
    (blk / "virtual/block/dm-0/slaves/md0").symlink_to(blk / "virtual/block/md0")
    (blk / "virtual/block/md0/slaves/sda1").symlink_to(blk / "pci/ata1/block/sda/sda1")
    (blk / "virtual/block/md0/slaves/sdb1").symlink_to(blk / "pci/ata2/block/sdb/sdb1")
    (root / "dev" / "block").mkdir(parents=True)
    (root / "dev" / "block" / f"{os.major(dev)}:{os.minor(dev)}").symlink_to(
        blk / "virtual/block/dm-0")
    return root


def test_backing_devices_through_lvm_md_and_partitions(tmp_path: Path) -> None:
    sys_root = fake_sys(tmp_path / "sys", tmp_path)
    assert H.backing_devices(tmp_path, sys_root) == (["md0"], ["sda", "sdb"])


def test_a_degraded_array_with_a_failing_disk_end_to_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sys_root = fake_sys(tmp_path / "sys", tmp_path)
    mdstat = tmp_path / "mdstat"
    mdstat.write_text(text("mdstat-degraded"))
    answers = {
        ("mdadm", "--detail", "/dev/md0"): (0, text("mdadm-detail-degraded"), ""),
        ("smartctl", "--json", "-i", "-H", "-A", "--nocheck=standby", "/dev/sda"):
            (0, text("smartctl-ata-healthy.json"), ""),
        ("smartctl", "--json", "-i", "-H", "-A", "--nocheck=standby", "/dev/sdb"):
            (24, text("smartctl-ata-failing.json"), ""),
    }
    monkeypatch.setattr(H, "_tool", lambda argv, ttl: answers[tuple(argv)])
    cfg = NodeConfig(data_dir=tmp_path)
    report = H.gather(cfg, sys_root=sys_root, mdstat=mdstat)
    assert report.level is Level.CRITICAL
    assert [p.key for p in report.problems] == ["array md0", "disk /dev/sdb"]
    j = report.to_json()
    assert j["arrays"] == [{
        "name": "md0", "level": "raid1", "state": "degraded",
        "detail_state": "clean, degraded", "raid_devices": 2, "active_devices": 1,
        "spare_devices": 0, "failed_devices": 1, "sync": None,
        "members": [{"device": "sda1", "state": "active"},
                    {"device": "-", "state": "removed"},
                    {"device": "sdb1", "state": "faulty"}]}]
    assert [(d["device"], d["smart_passed"], d["reallocated_sectors"]) for d in j["disks"]] \
        == [("/dev/sda", True, 0), ("/dev/sdb", False, 3912)]
    assert j["level"] == "critical" and j["notes"] == []
    check(j, HEALTH)  # the schema `nbdgw status --json` documents


def test_missing_tools_are_notes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sys_root = fake_sys(tmp_path / "sys", tmp_path)
    mdstat = tmp_path / "mdstat"
    mdstat.write_text(text("mdstat-rebuilding"))

    def missing(argv: list[str], ttl: float) -> Any:
        raise H.CommandError(argv, 127, f"{argv[0]}: command not found")

    monkeypatch.setattr(H, "_tool", missing)
    report = H.gather(NodeConfig(data_dir=tmp_path), sys_root=sys_root, mdstat=mdstat)
    assert report.notes == ("mdadm not installed: md0 read from /proc/mdstat only",
                            "smartctl not installed (Debian package smartmontools): disks "
                            "not checked")
    assert [a.state for a in report.arrays] == ["rebuilding"]
    assert report.level is Level.WARNING


# -- transitions -----------------------------------------------------------------------------


def test_monitor_logs_each_transition_once() -> None:
    rounds = [[], [HEALTHY], [DEGRADED], [DEGRADED], [REBUILDING], [HEALTHY], [HEALTHY]]
    it = iter(rounds)
    mon = H.Monitor(NodeConfig(), checker=lambda cfg: H.assess(None, next(it), [], [], H0))
    with capture_logs() as logs:
        for _ in rounds:
            mon.run()
    assert [(e["event"], e.get("level"), e.get("log_level")) for e in logs] == [
        ("health_problem", "critical", "warning"),   # degraded
        ("health_improved", "warning", "info"),      # rebuilding
        ("health_recovered", None, "info"),          # healthy again
    ]
    assert logs[0]["key"] == "array md0" and logs[0]["message"].startswith("MD array md0")


def test_status_shows_health_in_text_and_on_a_terminal() -> None:
    """The health block of `nbdgw status`: plain lines, and rich's rendering of them."""
    from rich.console import Console

    from gateway import status, statusview

    r = H.assess(fs(4 * GiB), [DEGRADED], [disk("smartctl-ata-healthy.json", "/dev/sda")],
                 VOLS, H0).to_json()
    report = {"node": "n1", "data_dir": "/srv/nbdgw", "role": None, "failover": None,
              "split_brain": None, "health": r, "volumes": []}
    lines = status.render_text(report)
    assert lines[1] == ("health: CRITICAL: 4.0 GiB free of 100.0 GiB (4.0 %), md0 degraded, "
                        "SMART 1/1 disks passed")
    assert lines[2].startswith("  CRITICAL: the file system of /srv/nbdgw ")
    assert lines[4] == ("  CRITICAL: MD array md0 (raid1) is degraded: 1 of 2 devices working, "
                        "faulty: sdb1, no spare")
    console = Console(width=200, record=True, color_system=None)
    console.print(statusview.render(report))
    out = console.export_text()
    assert "health: CRITICAL: 4.0 GiB free" in out
    assert "    what to do: mdadm /dev/md0 --remove the faulty device" in out


def test_monitor_thread_checks_every_interval_and_survives_a_failing_check() -> None:
    import threading

    calls: list[int] = []

    def checker(cfg: NodeConfig) -> H.HealthReport:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return H.assess(None, [], [], [], H0)

    stop = threading.Event()
    mon = H.Monitor(NodeConfig(health=HealthConfig(interval=0.05)), checker=checker)
    with capture_logs() as logs:
        t = mon.start(stop)
        while len(calls) < 4:
            t.join(0.05)
        stop.set()
        t.join(5)
    assert not t.is_alive()
    assert [e["event"] for e in logs] == ["health_check_failed"]


def test_a_cdp_window_raises_the_journal_bound_health_measures_against(tmp_path) -> None:
    """A volume keeping CDP history may hold journal.max_bytes plus its window's
    max_bytes (Volume.journal_cap): health must not count that as over its bound."""
    from blockstore.cdp import CdpPolicy, write_policy
    from blockstore.volume import create_volume
    from gateway.health import volume_spaces

    create_volume(tmp_path, "plain", 1 << 20)
    kept = create_volume(tmp_path, "kept", 1 << 20)
    write_policy(kept.path, CdpPolicy(3600.0, 8 << 30))
    caps = {v.name: v.journal_max_bytes for v in volume_spaces(tmp_path, 1 << 30)}
    assert caps == {"plain": 1 << 30, "kept": (1 << 30) + (8 << 30)}
