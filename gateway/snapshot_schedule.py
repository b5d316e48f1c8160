"""Timed snapshots: what is due now and what to prune (pure), and the runner the node
daemon calls.

Time is cut into slots per schedule, in UTC: every N minutes from the epoch (N dividing
60 lands on the hour), hourly at :00, daily at 00:00, weekly on Monday 00:00.  A
schedule's snapshot for a slot is named ``<schedule>-<slot start, %Y%m%dT%H%MZ>``, so the
names say which slot they stand for and a run is idempotent: a slot whose snapshot
exists is not due.  When the newest slot has no snapshot, one is taken, however many
slots went by since the last one (downtime): those are *missed* and logged, never made
up with a burst.  After taking, a schedule deletes its own oldest snapshots beyond
``keep`` (never anyone else's); when the volume holds 512 snapshots already, it deletes
first so that the new one fits.
"""

from __future__ import annotations

import calendar
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from blockstore.clone import clones_of
from blockstore.errors import BlockstoreError
from blockstore.snapshot import MAX_SNAPSHOTS
from blockstore.volume import is_replica, list_volumes
from nbdgw_common.errors import GatewayError

from . import snapshots
from .config import Every, NodeConfig, SnapshotSchedule

log = structlog.get_logger(component="snapshot_schedule")

_WEEK_ORIGIN = 4 * 86400  # Monday 1970-01-05 00:00 UTC
_STAMP = "%Y%m%dT%H%MZ"


def period(s: SnapshotSchedule) -> int:
    return s.minutes * 60


def slot_start(s: SnapshotSchedule, now: float) -> int:
    """Start of the slot ``now`` lies in (seconds since the epoch, UTC)."""
    origin = _WEEK_ORIGIN if s.every is Every.WEEKLY else 0
    p = period(s)
    return origin + (int(now) - origin) // p * p


def snapshot_name(s: SnapshotSchedule, slot: int) -> str:
    return f"{s.name}-{time.strftime(_STAMP, time.gmtime(slot))}"


def _slot_of(s: SnapshotSchedule, name: str) -> int | None:
    m = re.fullmatch(re.escape(s.name) + r"-(\d{8}T\d{4}Z)", name)
    if m is None:
        return None
    return calendar.timegm(time.strptime(m.group(1), _STAMP))


@dataclass(frozen=True)
class Plan:
    """What one schedule should do now on its volumes."""

    schedule: str
    take: str | None  # the snapshot to take, or None when the slot has one
    missed: int  # slots with no snapshot between the last one and this one
    last: str | None  # the schedule's newest snapshot before now
    prune: tuple[str, ...]  # the schedule's snapshots to delete, oldest first
    prune_first: bool  # the volume is full: delete before taking


def plan(s: SnapshotSchedule, now: float, existing: list[str]) -> Plan:
    """Decide for schedule ``s`` at ``now``, given the names of a volume's snapshots."""
    mine = sorted((slot, n) for n in existing if (slot := _slot_of(s, n)) is not None)
    cur = slot_start(s, now)
    last_slot, last = mine[-1] if mine else (None, None)
    due = last_slot is None or last_slot < cur
    missed = 0
    if due and last_slot is not None:
        missed = (cur - last_slot) // period(s) - 1
    count = len(mine) + (1 if due else 0)
    prune = tuple(n for _, n in mine[:max(0, count - s.keep)])
    full = due and len(existing) >= MAX_SNAPSHOTS
    return Plan(s.name, snapshot_name(s, cur) if due else None, max(0, missed), last, prune,
                full)


def next_due(schedules: tuple[SnapshotSchedule, ...], now: float) -> float:
    """The start of the next slot of any schedule after ``now``."""
    return min(slot_start(s, now) + period(s) for s in schedules)


class Scheduler:
    """Runs the node's snapshot schedules (the daemon calls ``run`` in a thread, or
    ``run_once`` from its own loop)."""

    def __init__(self, cfg: NodeConfig, data_dir: Path | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.data_dir = data_dir or cfg.data_dir
        self.clock = clock

    def volumes_of(self, s: SnapshotSchedule) -> list[str]:
        """The schedule's volumes; none while any of them is a replica (a replica takes
        its primary's snapshots from the journal)."""
        infos = {v.name: v for v in list_volumes(self.data_dir)}
        names = list(s.volumes) or [n for n, i in infos.items() if not is_replica(i)]
        missing = [n for n in names if n not in infos]
        if missing:
            raise GatewayError(f"schedule {s.name}: no volume named {missing[0]} in "
                               f"{self.data_dir}")
        if any(is_replica(infos[n]) for n in names):
            return []
        return names

    def run_once(self, now: float | None = None) -> list[dict[str, Any]]:
        """Run every schedule that is due; one failing does not stop the others."""
        now = self.clock() if now is None else now
        results = []
        for s in self.cfg.snapshots.schedules:
            try:
                results.append(self._run(s, now))
            except (GatewayError, BlockstoreError, OSError) as e:
                log.error("snapshot_schedule_failed", schedule=s.name, error=str(e))
                results.append({"schedule": s.name, "error": str(e)})
        return results

    def _run(self, s: SnapshotSchedule, now: float) -> dict[str, Any]:
        vols = self.volumes_of(s)
        if not vols:
            return {"schedule": s.name, "skipped": "replica or no volumes"}
        existing = [r["name"] for r in snapshots.listing(self.data_dir, vols[0])]
        p = plan(s, now, existing)
        out: dict[str, Any] = {"schedule": s.name, "volumes": vols, "taken": None,
                               "pruned": [], "missed": p.missed}
        if p.take is None:
            return out
        if p.missed:
            log.warning("snapshot_runs_missed", schedule=s.name, missed=p.missed,
                        last=p.last, catch_up=p.take)
        if p.prune_first:
            out["pruned"] += self._prune(vols, p.prune)
        snapshots.create(self.data_dir, vols, p.take)
        out["taken"] = p.take
        log.info("snapshot_scheduled_taken", schedule=s.name, snapshot=p.take, volumes=vols)
        if not p.prune_first:
            out["pruned"] += self._prune(vols, p.prune)
        return out

    def _prune(self, vols: list[str], names: tuple[str, ...]) -> list[str]:
        done = []
        for name in names:
            users = [c for v in vols for c in clones_of(self.data_dir, v, name)]
            if users:  # a clone's base stays until the clone is deleted
                log.warning("snapshot_kept_for_clone", snapshot=name, volumes=vols,
                            clones=users)
                continue
            for v in vols:
                if name in {r["name"] for r in snapshots.listing(self.data_dir, v)}:
                    snapshots.delete(self.data_dir, v, name)
            log.info("snapshot_pruned", snapshot=name, volumes=vols)
            done.append(name)
        return done

    def run(self, stop: threading.Event, max_sleep: float = 60.0) -> None:
        """Run until ``stop`` is set: at start (catching up), then at each slot."""
        if not self.cfg.snapshots.schedules:
            return
        while not stop.is_set():
            self.run_once()
            wait = next_due(self.cfg.snapshots.schedules, self.clock()) - self.clock()
            stop.wait(min(max(wait, 0.5), max_sleep))
