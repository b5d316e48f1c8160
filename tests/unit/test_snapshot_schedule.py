"""Timed snapshots: the pure plan (slots, names, missed runs, pruning) with a fake
clock, and the runner on real (idle, unserved) volumes."""

from __future__ import annotations

import calendar
import time
from pathlib import Path

import pytest
import structlog

from blockstore.volume import Volume, create_volume
from gateway import snapshots
from gateway.config import Every, NodeConfig, SnapshotSchedule, SnapshotsConfig
from gateway.snapshot_schedule import Scheduler, next_due, plan, slot_start, snapshot_name

HOURLY = SnapshotSchedule("hourly", Every.HOURLY, 60, 3)
QUARTER = SnapshotSchedule("q", Every.MINUTES, 15, 2)
WEEKLY = SnapshotSchedule("w", Every.WEEKLY, 10080, 2)


def t(stamp: str) -> int:
    return calendar.timegm(time.strptime(stamp, "%Y-%m-%d %H:%M:%S"))


def test_slots_are_utc_and_aligned() -> None:
    assert slot_start(HOURLY, t("2026-11-22 10:59:59")) == t("2026-11-22 10:00:00")
    assert slot_start(QUARTER, t("2026-11-22 10:44:00")) == t("2026-11-22 10:30:00")
    assert slot_start(WEEKLY, t("2026-11-22 10:00:00")) == t("2026-11-16 00:00:00")  # Mon
    assert snapshot_name(HOURLY, t("2026-11-22 10:00:00")) == "hourly-20261122T1000Z"
    assert next_due((HOURLY, QUARTER), t("2026-11-22 10:44:00")) == t("2026-11-22 10:45:00")


def test_first_run_takes_the_current_slot() -> None:
    p = plan(HOURLY, t("2026-11-22 10:20:00"), ["manual", "q-20261122T1000Z"])
    assert (p.take, p.missed, p.last, p.prune, p.prune_first) == (
        "hourly-20261122T1000Z", 0, None, (), False)


def test_not_due_when_the_slot_has_its_snapshot() -> None:
    p = plan(HOURLY, t("2026-11-22 10:59:00"), ["hourly-20261122T1000Z"])
    assert p.take is None and p.prune == ()


def test_downtime_gives_one_catch_up_and_counts_the_missed() -> None:
    have = ["hourly-20261122T0500Z", "hourly-20261122T0600Z", "hourly-20261122T0700Z"]
    p = plan(HOURLY, t("2026-11-22 10:05:00"), have)
    assert p.take == "hourly-20261122T1000Z"
    assert p.missed == 2  # 08:00 and 09:00
    assert p.last == "hourly-20261122T0700Z"
    assert p.prune == ("hourly-20261122T0500Z",)  # keep 3 counting the new one


def test_only_the_schedules_own_snapshots_are_pruned() -> None:
    have = [f"q-20261122T10{m:02d}Z" for m in (0, 15, 30)] + ["hourly-20261122T1000Z", "x"]
    p = plan(QUARTER, t("2026-11-22 10:50:00"), have)
    assert p.prune == ("q-20261122T1000Z", "q-20261122T1015Z")


def test_a_full_volume_prunes_before_taking() -> None:
    have = [f"m{i}" for i in range(510)] + ["hourly-20261122T0800Z", "hourly-20261122T0900Z"]
    p = plan(HOURLY, t("2026-11-22 10:00:00"), have)
    assert p.prune_first and p.take == "hourly-20261122T1000Z"
    p = plan(SnapshotSchedule("hourly", Every.HOURLY, 60, 5), t("2026-11-22 10:00:00"), have)
    assert p.prune == () and p.prune_first  # nothing of its own to give up: create fails


def test_runner_takes_prunes_and_logs_missed_runs(tmp_path: Path) -> None:
    for name in ("a", "b"):
        create_volume(tmp_path, name, 1 << 20)
    create_volume(tmp_path, "r", 1 << 20, replica=True)
    cfg = NodeConfig(data_dir=tmp_path, snapshots=SnapshotsConfig((HOURLY,)))
    now = [float(t("2026-11-22 07:10:00"))]
    sched = Scheduler(cfg, clock=lambda: now[0])
    with structlog.testing.capture_logs() as logs:
        for stamp in ("07:10", "07:40", "08:01", "12:30"):
            now[0] = t(f"2026-11-22 {stamp}:00")
            sched.run_once()
    want = ["hourly-20261122T0800Z", "hourly-20261122T1200Z"]
    for vol in ("a", "b"):  # one group of every non-replica volume; r is skipped
        rows = snapshots.listing(tmp_path, vol)
        assert [r["name"] for r in rows][-2:] == want
        assert len(rows) == 3 and rows[0]["name"] == "hourly-20261122T0700Z"
    assert snapshots.listing(tmp_path, "r") == []
    groups = {r["group"] for vol in ("a", "b") for r in snapshots.listing(tmp_path, vol)
              if r["name"] == want[-1]}
    assert len(groups) == 1 and groups != {""}
    missed = [e for e in logs if e["event"] == "snapshot_runs_missed"]
    assert missed == [{"event": "snapshot_runs_missed", "component": "snapshot_schedule",
                       "schedule": "hourly", "missed": 3,
                       "last": "hourly-20261122T0800Z", "catch_up": "hourly-20261122T1200Z",
                       "log_level": "warning"}]
    now[0] = t("2026-11-22 13:00:00")
    sched.run_once()  # keep 3: the 07:00 one goes
    assert [r["name"] for r in snapshots.listing(tmp_path, "a")] == [
        "hourly-20261122T0800Z", "hourly-20261122T1200Z", "hourly-20261122T1300Z"]


def test_runner_reports_a_failing_schedule_and_runs_the_others(tmp_path: Path) -> None:
    create_volume(tmp_path, "a", 1 << 20)
    bad = SnapshotSchedule("bad", Every.HOURLY, 60, 2, ("nope",))
    cfg = NodeConfig(data_dir=tmp_path, snapshots=SnapshotsConfig((bad, HOURLY)))
    res = Scheduler(cfg).run_once(float(t("2026-11-22 10:00:00")))
    assert res[0] == {"schedule": "bad", "error": f"schedule bad: no volume named nope in "
                                                   f"{tmp_path}"}
    assert res[1]["taken"] == "hourly-20261122T1000Z"
    vol = Volume.open(tmp_path, "a")
    assert [r["name"] for r in vol.snapshot_list()] == ["hourly-20261122T1000Z"]
    vol.close()


@pytest.mark.parametrize("every", [Every.HOURLY, Every.DAILY, Every.WEEKLY])
def test_slot_boundaries_are_slots_of_their_own(every: Every) -> None:
    minutes = {Every.HOURLY: 60, Every.DAILY: 1440, Every.WEEKLY: 10080}[every]
    s = SnapshotSchedule("s", every, minutes, 1)
    start = slot_start(s, t("2026-11-22 10:30:00"))
    assert slot_start(s, start) == start
    assert slot_start(s, start - 1) == start - minutes * 60


def test_pruning_keeps_a_snapshot_a_clone_is_made_of(tmp_path: Path) -> None:
    from blockstore.clone import create_clone

    create_volume(tmp_path, "a", 1 << 20)
    keep1 = SnapshotSchedule("h", Every.HOURLY, 60, 1)
    sched = Scheduler(NodeConfig(data_dir=tmp_path, snapshots=SnapshotsConfig((keep1,))))
    sched.run_once(float(t("2026-11-22 10:00:00")))
    create_clone(tmp_path, "drill", "a", "h-20261122T1000Z", 1 << 20)
    with structlog.testing.capture_logs() as logs:
        sched.run_once(float(t("2026-11-22 11:00:00")))
    assert [r["name"] for r in snapshots.listing(tmp_path, "a")] == [
        "h-20261122T1000Z", "h-20261122T1100Z"]  # the clone's base stays
    assert any(e["event"] == "snapshot_kept_for_clone" and e["clones"] == ["drill"]
               for e in logs)
