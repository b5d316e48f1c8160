"""Store health: what backs data_dir, and how much room is left on it.

Four sources, each read at the edge and parsed by a pure function:

- the file system of data_dir (``statvfs``, its mount from ``/proc/self/mountinfo``),
  and what each volume holds of it and may still take: its journal (up to
  ``journal.max_bytes``), its snapshots' pre-images, its sparse store;
- the Linux MD arrays under that file system (``/sys/dev/block``'s slaves, through
  LVM and partitions): ``/proc/mdstat`` (``parse_mdstat``) and ``mdadm --detail``
  (``parse_mdadm_detail``): degraded, rebuilding and how far, spares, failed members;
- the SMART health of the disks under those (``smartctl --json -i -H -A``,
  ``parse_smartctl``): passed or failed, reallocated and pending sectors, temperature
  (ATA), critical warnings, media errors and spare (NVMe).

``assess`` turns the facts into a ``HealthReport`` (pure: tested on recorded outputs of
healthy, degraded, rebuilding and failed arrays and disks).  ``check(cfg)`` does the
whole round; ``Monitor`` runs it for the daemon and logs transitions once each
(``health_problem`` when a check turns bad or worse, ``health_recovered`` when it is
fine again).  A tool that is not installed, or a disk whose SMART data cannot be read
(a virtual disk, no root), is a note in the report, never a failure.

JSON (``nbdgw health --json``; the ``health`` block of ``nbdgw status --json``)::

    {"level": "ok"|"warning"|"critical", "checked": float (UNIX time),
     "filesystem": null | {"path", "mount", "source", "fstype", "size_bytes", "free_bytes",
                           "free_ratio", "reserve_bytes"},
     "arrays": [{"name", "level", "state": "healthy"|"degraded"|"rebuilding"|"resyncing"|
                 "checking"|"reshaping"|"failed"|"inactive", "detail_state": str|null,
                 "raid_devices", "active_devices", "spare_devices", "failed_devices",
                 "sync": null | {"action", "percent", "finish_minutes"},
                 "members": [{"device", "state": "active"|"spare"|"rebuilding"|
                              "faulty"|"removed"}]}],
     "disks": [{"device", "model", "serial", "smart_passed": bool|null,
                "reallocated_sectors", "pending_sectors", "temperature_celsius",
                "media_errors", "critical_warning", "error": str|null}],
     "volumes": [{"name", "size", "allocated_bytes", "journal_bytes",
                  "journal_max_bytes", "journal_may_grow_bytes", "snapshots",
                  "snapshot_bytes"}],
     "problems": [{"key", "level", "message", "action"}],
     "notes": [str]}
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from blockstore.cdp import journal_cap_for
from blockstore.journal import segment_files
from blockstore.space import free_bytes, reserve_bytes
from blockstore.volume import list_volumes
from nbdgw_common.errors import CommandError
from nbdgw_common.proc import output

from .config import HealthConfig, NodeConfig, group_config, groups_of

log = structlog.get_logger(component="health")

TOOL_TIMEOUT = 10.0


class Level(enum.IntEnum):
    OK = 0
    WARNING = 1
    CRITICAL = 2

    def __str__(self) -> str:
        return self.name.lower()


# -- the facts ----------------------------------------------------------------------


@dataclass(frozen=True)
class Filesystem:
    path: str  # data_dir
    mount: str
    source: str
    fstype: str
    size_bytes: int
    free_bytes: int
    reserve_bytes: int  # client writes get ENOSPC below this (blockstore/space.py)

    @property
    def free_ratio(self) -> float:
        return self.free_bytes / self.size_bytes if self.size_bytes else 0.0


@dataclass(frozen=True)
class MdMember:
    device: str  # sda1
    state: str  # active | spare | rebuilding | faulty | removed


@dataclass(frozen=True)
class MdSync:
    action: str  # recovery | resync | check | repair | reshape
    percent: float | None  # None: DELAYED or PENDING
    finish_minutes: float | None = None


@dataclass(frozen=True)
class MdArray:
    name: str  # md0
    level: str  # raid1
    state: str  # see the module docstring
    raid_devices: int
    active_devices: int
    spare_devices: int
    failed_devices: int
    members: tuple[MdMember, ...] = ()
    sync: MdSync | None = None
    detail_state: str | None = None  # mdadm's "State :" line, when mdadm answered


@dataclass(frozen=True)
class Disk:
    device: str  # /dev/sda
    model: str | None = None
    serial: str | None = None
    smart_passed: bool | None = None
    reallocated_sectors: int | None = None
    pending_sectors: int | None = None
    temperature_celsius: int | None = None
    media_errors: int | None = None  # NVMe
    critical_warning: int | None = None  # NVMe bit mask
    available_spare: int | None = None  # NVMe, percent
    available_spare_threshold: int | None = None
    error: str | None = None  # why SMART could not be read


@dataclass(frozen=True)
class VolumeSpace:
    name: str
    size: int
    allocated_bytes: int  # of the sparse store
    journal_bytes: int
    journal_max_bytes: int
    snapshots: int
    snapshot_bytes: int  # pre-images and index on disk

    @property
    def journal_may_grow_bytes(self) -> int:
        return max(0, self.journal_max_bytes - self.journal_bytes)


@dataclass(frozen=True)
class Problem:
    key: str  # stable across checks: "filesystem", "array md0", "disk /dev/sda"
    level: Level
    message: str
    action: str


@dataclass(frozen=True)
class HealthReport:
    level: Level
    checked: float
    filesystem: Filesystem | None
    arrays: tuple[MdArray, ...] = ()
    disks: tuple[Disk, ...] = ()
    volumes: tuple[VolumeSpace, ...] = ()
    problems: tuple[Problem, ...] = ()
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        fs = None
        if self.filesystem is not None:
            fs = asdict(self.filesystem) | {"free_ratio": round(self.filesystem.free_ratio, 6)}
        return {
            "level": str(self.level), "checked": self.checked, "filesystem": fs,
            "arrays": [asdict(a) | {"members": [asdict(m) for m in a.members]}
                       for a in self.arrays],
            "disks": [{k: v for k, v in asdict(d).items()
                       if k not in ("available_spare", "available_spare_threshold")}
                      for d in self.disks],
            "volumes": [asdict(v) | {"journal_may_grow_bytes": v.journal_may_grow_bytes}
                        for v in self.volumes],
            "problems": [asdict(p) | {"level": str(p.level)} for p in self.problems],
            "notes": list(self.notes),
        }


# -- parsers (pure) -------------------------------------------------------------------

_MDSTAT_HEAD = re.compile(r"^(md\S+) : (active|inactive)(?: \((?:auto-)?read-only\))?"
                          r"(?: (\w+))?((?: \S+\[\d+\](?:\([A-Z]\))*)*)\s*$")
_MDSTAT_MEMBER = re.compile(r"(\S+)\[(\d+)\]((?:\([A-Z]\))*)")
_MDSTAT_SLOTS = re.compile(r"\[(\d+)/(\d+)\] \[([U_]+)\]")
_MDSTAT_SYNC = re.compile(r"(recovery|resync|check|repair|reshape)\s*=\s*"
                          r"(?:([\d.]+)%|(DELAYED|PENDING))"
                          r"(?:.*?finish=([\d.]+)min)?")


def _state(level: str, raid: int, up: int, sync: MdSync | None, failed_words: bool,
           inactive: bool) -> str:
    if inactive:
        return "inactive"
    if failed_words or up < _needed(level, raid):
        return "failed"
    if sync is not None and sync.action == "recovery":
        return "rebuilding"
    if up < raid:
        return "degraded"
    if sync is not None:
        return {"resync": "resyncing", "reshape": "reshaping"}.get(sync.action, "checking")
    return "healthy"


def _needed(level: str, raid: int) -> int:
    """Members an array of ``level`` needs to run (RAID10: at least half, a bound)."""
    return {"raid1": 1, "raid4": raid - 1, "raid5": raid - 1, "raid6": raid - 2,
            "raid10": (raid + 1) // 2}.get(level, raid)


def parse_mdstat(text: str) -> dict[str, MdArray]:
    """/proc/mdstat: every array, its members, slots up and any resync or recovery."""
    arrays: dict[str, MdArray] = {}
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("md"):
            blocks.append([line])
        elif blocks and line.startswith((" ", "\t")) and line.strip():
            blocks[-1].append(line)
    for block in blocks:
        m = _MDSTAT_HEAD.match(block[0])
        if m is None:
            continue
        name, activity, level = m.group(1), m.group(2), m.group(3) or ""
        inactive = activity == "inactive"
        body = "\n".join(block[1:])
        slots = _MDSTAT_SLOTS.search(body)
        raid, up = (int(slots.group(1)), slots.group(3).count("U")) if slots else (0, 0)
        s = _MDSTAT_SYNC.search(body)
        sync = None
        if s is not None:
            sync = MdSync(s.group(1), float(s.group(2)) if s.group(2) else None,
                          float(s.group(4)) if s.group(4) else None)
        members = []
        for dev, idx, flags in _MDSTAT_MEMBER.findall(m.group(4) or ""):
            state = ("faulty" if "(F)" in flags else "spare" if "(S)" in flags else
                     "rebuilding" if sync is not None and sync.action == "recovery"
                     and int(idx) >= raid else "active")
            members.append((int(idx), MdMember(dev, state)))
        members.sort(key=lambda x: x[0])
        ms = tuple(x[1] for x in members)
        arrays[name] = MdArray(
            name=name, level=level, raid_devices=raid, active_devices=up,
            spare_devices=sum(x.state in ("spare", "rebuilding") for x in ms),
            failed_devices=sum(x.state == "faulty" for x in ms), members=ms, sync=sync,
            state=_state(level, raid, up, sync, False, inactive))
    return arrays


_DETAIL_MEMBER = re.compile(r"^\s*(?:\d+|-)\s+\d+\s+\d+\s+(?:\d+|-)\s+(.+?)(?:\s+(/dev/\S+))?$")
_DETAIL_STATUS = re.compile(r"^(Rebuild|Resync|Reshape|Check) Status : (\d+)% complete")


def parse_mdadm_detail(name: str, text: str) -> MdArray:
    """`mdadm --detail /dev/NAME`: the State line, device counts, the sync status and the
    member table (what mdstat cannot say: which member is the one rebuilding)."""
    kv: dict[str, str] = {}
    members: list[MdMember] = []
    sync = None
    in_table = False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("Number") and "RaidDevice State" in line:
            in_table = True
            continue
        if in_table:
            m = _DETAIL_MEMBER.match(raw)
            if m:
                words = m.group(1).split()
                state = ("faulty" if "faulty" in words else
                         "rebuilding" if "rebuilding" in words else
                         "spare" if "spare" in words else
                         "removed" if "removed" in words else "active")
                dev = (m.group(2) or "-").removeprefix("/dev/")
                members.append(MdMember(dev, state))
            continue
        s = _DETAIL_STATUS.match(line)
        if s:
            action = {"Rebuild": "recovery", "Resync": "resync", "Reshape": "reshape",
                      "Check": "check"}[s.group(1)]
            sync = MdSync(action, float(s.group(2)))
            continue
        key, sep, value = line.partition(" : ")
        if sep:
            kv[key.strip()] = value.strip()
    state_line = kv.get("State", "")
    words = {w.strip() for w in state_line.split(",")}
    level = kv.get("Raid Level", "")
    raid = int(kv.get("Raid Devices", "0") or 0)
    active = int(kv.get("Active Devices", "0") or 0)
    if sync is None and "recovering" in words:
        sync = MdSync("recovery", None)
    elif sync is None and "resyncing" in words:
        sync = MdSync("resync", None)
    return MdArray(
        name=name, level=level, raid_devices=raid, active_devices=active,
        spare_devices=int(kv.get("Spare Devices", "0") or 0),
        failed_devices=int(kv.get("Failed Devices", "0") or 0),
        members=tuple(members), sync=sync, detail_state=state_line or None,
        state=_state(level, raid, active, sync, "FAILED" in words,
                     "inactive" in words or "Not Started" in words))


def merge_md(stat: MdArray | None, detail: MdArray | None) -> MdArray | None:
    """mdadm's view where it has one (State, counts, members), mdstat's finish time."""
    if detail is None or stat is None:
        return detail or stat
    sync = detail.sync or stat.sync
    if sync is not None and stat.sync is not None and stat.sync.action == sync.action:
        sync = replace(sync, percent=stat.sync.percent if stat.sync.percent is not None
                       else sync.percent, finish_minutes=stat.sync.finish_minutes)
    return replace(detail, level=detail.level or stat.level, sync=sync,
                   members=detail.members or stat.members)


_ATA_REALLOCATED = 5
_ATA_PENDING = 197
_ATA_TEMPERATURE = (194, 190)  # Temperature_Celsius, Airflow_Temperature_Cel


def parse_smartctl(device: str, text: str) -> Disk:
    """`smartctl --json -H -A DEVICE` (ATA, NVMe or SCSI).  Its exit status is a bit
    mask and says less than the JSON, so only the JSON is read; a device smartctl could
    not open or identify is a Disk with ``error``."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return Disk(device, error="smartctl printed no JSON")
    msgs = [m.get("string", "") for m in doc.get("smartctl", {}).get("messages", [])
            if m.get("severity") == "error"]
    status = doc.get("smart_status")
    if status is None and msgs:
        return Disk(device, error="; ".join(msgs))
    attrs = {a["id"]: a for a in doc.get("ata_smart_attributes", {}).get("table", [])}

    def raw(attr: int) -> int | None:
        a = attrs.get(attr)
        return None if a is None else int(a["raw"]["value"])

    nvme = doc.get("nvme_smart_health_information_log") or {}
    temp = doc.get("temperature", {}).get("current", nvme.get("temperature"))
    if temp is None:  # an old smartctl: the attribute's raw value
        temp = next((raw(a) for a in _ATA_TEMPERATURE if raw(a) is not None), None)
    return Disk(
        device=device, model=doc.get("model_name") or doc.get("scsi_model_name"),
        serial=doc.get("serial_number"),
        smart_passed=None if status is None else bool(status.get("passed")),
        reallocated_sectors=raw(_ATA_REALLOCATED) if attrs else
        doc.get("scsi_grown_defect_list"),
        pending_sectors=raw(_ATA_PENDING),
        temperature_celsius=None if temp is None else int(temp),
        media_errors=nvme.get("media_errors"), critical_warning=nvme.get("critical_warning"),
        available_spare=nvme.get("available_spare"),
        available_spare_threshold=nvme.get("available_spare_threshold"),
        error=("; ".join(msgs) or None) if status is None else None)


def parse_mountinfo(text: str, dev: tuple[int, int], path: str) -> tuple[str, str, str]:
    """(mount point, source, fstype) of the mount of device ``dev`` that holds ``path``
    (the longest mount point that is a prefix of it: bind mounts share a device)."""
    best: tuple[str, str, str] | None = None
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5:
            continue
        if fields[2] != f"{dev[0]}:{dev[1]}":
            continue
        mount = fields[4].replace("\\040", " ")
        if not (path == mount or path.startswith(mount.rstrip("/") + "/")):
            continue
        fstype, source = [*right.split(), "", ""][:2]
        if best is None or len(mount) > len(best[0]):
            best = (mount, source, fstype)
    return best or ("", "", "")


# -- the assessment (pure) ------------------------------------------------------------


def _gib(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _fs_problem(fs: Filesystem, volumes: Iterable[VolumeSpace], h: HealthConfig
                ) -> Problem | None:
    pct = 100 * fs.free_ratio
    refusing = fs.free_bytes <= fs.reserve_bytes
    if refusing or pct < h.critical_free_percent:
        level, limit = Level.CRITICAL, f"critical below {h.critical_free_percent:g} %"
    elif pct < h.warn_free_percent:
        level, limit = Level.WARNING, f"warning below {h.warn_free_percent:g} %"
    else:
        return None
    vols = sorted(volumes, key=lambda v: v.journal_bytes + v.snapshot_bytes, reverse=True)
    held = []
    for v in vols:
        part = f"{v.name}: journal {_gib(v.journal_bytes)}"
        if v.snapshots:
            part += (f", {v.snapshots} snapshot{'s' if v.snapshots > 1 else ''} "
                     f"{_gib(v.snapshot_bytes)}")
        held.append(part)
    grow = sum(v.journal_may_grow_bytes for v in vols)
    message = (f"the file system of {fs.path} ({fs.source or fs.fstype}, {fs.mount}) has "
               f"{_gib(fs.free_bytes)} free of {_gib(fs.size_bytes)} ({pct:.1f} %, {limit})")
    if refusing:
        message += (f"; client writes get ENOSPC now (the last {_gib(fs.reserve_bytes)} "
                    "are kept for the volumes' state files)")
    if held:
        message += "; held by " + "; ".join(held)
    if grow:
        message += f"; the journals may still grow by {_gib(grow)} (to journal.max_bytes)"
    actions = []
    if any(v.snapshots for v in vols):
        actions.append("delete snapshots no longer needed ('nbdgw snapshot list VOLUME', "
                       "'nbdgw snapshot delete VOLUME NAME')")
    if any(v.journal_bytes for v in vols):
        actions.append(f"lower journal.max_bytes (now {_gib(vols[0].journal_max_bytes)} "
                       "per volume; a peer further behind is then resynced by extents)")
    actions.append("grow the file system")
    return Problem("filesystem", level, message, ", or ".join(actions))


def _array_problem(a: MdArray) -> Problem | None:
    key = f"array {a.name}"
    faulty = [m.device for m in a.members if m.state == "faulty"]
    spares = [m.device for m in a.members if m.state == "spare"]
    if a.state in ("failed", "inactive"):
        return Problem(key, Level.CRITICAL,
                       f"MD array {a.name} ({a.level or 'unknown level'}) has {a.state}: "
                       f"{a.active_devices} of {a.raid_devices} devices working"
                       + (f", faulty: {', '.join(faulty)}" if faulty else ""),
                       "the data under data_dir cannot be trusted or read here: serve "
                       "from a replica ('nbdgw switchover' or 'nbdgw promote'), then "
                       f"repair {a.name} (mdadm --detail /dev/{a.name})")
    if a.state == "rebuilding":
        sync = a.sync
        done = "" if sync is None or sync.percent is None else f"{sync.percent:g} % done"
        left = ("" if sync is None or sync.finish_minutes is None else
                f", about {sync.finish_minutes:.0f} min left")
        onto = [m.device for m in a.members if m.state == "rebuilding"]
        return Problem(key, Level.WARNING,
                       f"MD array {a.name} ({a.level}) is rebuilding"
                       + (f" onto {', '.join(onto)}" if onto else "")
                       + (f": {done}{left}" if done or left else "")
                       + f"; {a.active_devices} of {a.raid_devices} devices in sync",
                       "let it finish; until then one more disk failure may lose the "
                       "array: keep the replicas in sync")
    if a.state == "degraded":
        spare_left = a.level == "raid6" and a.raid_devices - a.active_devices == 1
        return Problem(key, Level.WARNING if spare_left else Level.CRITICAL,
                       f"MD array {a.name} ({a.level}) is degraded: {a.active_devices} of "
                       f"{a.raid_devices} devices working"
                       + (f", faulty: {', '.join(faulty)}" if faulty else "")
                       + (f", spare: {', '.join(spares)}" if spares else ", no spare"),
                       (f"mdadm /dev/{a.name} --remove the faulty device, " if faulty else "")
                       + f"add a new disk (mdadm /dev/{a.name} --add DEVICE); it rebuilds "
                       "onto it")
    if faulty:
        return Problem(key, Level.WARNING,
                       f"MD array {a.name} ({a.level}) runs on a spare; faulty: "
                       f"{', '.join(faulty)}",
                       f"mdadm /dev/{a.name} --remove {' '.join('/dev/' + f for f in faulty)}"
                       " and replace the disk, so that a spare is there for the next "
                       "failure")
    return None


_NVME_WARNINGS = {0x01: "spare below threshold", 0x02: "temperature", 0x04: "reliability "
                  "degraded", 0x08: "read-only", 0x10: "volatile memory backup failed"}


def _disk_problem(d: Disk, h: HealthConfig) -> Problem | None:
    critical: list[str] = []
    warning: list[str] = []
    if d.smart_passed is False:
        critical.append("fails its SMART health check")
    if d.critical_warning:
        bits = [n for b, n in _NVME_WARNINGS.items() if d.critical_warning & b]
        critical.append(f"NVMe critical warning {d.critical_warning:#04x} ({', '.join(bits)})")
    if (d.available_spare is not None and d.available_spare_threshold is not None
            and d.available_spare <= d.available_spare_threshold):
        critical.append(f"available spare {d.available_spare} % (threshold "
                        f"{d.available_spare_threshold} %)")
    for count, what in ((d.reallocated_sectors, "reallocated sectors"),
                        (d.pending_sectors, "pending sectors"),
                        (d.media_errors, "media errors")):
        if count:
            warning.append(f"{count} {what}")
    worn = bool(warning)
    hot = d.temperature_celsius is not None and d.temperature_celsius >= h.max_disk_temperature
    if hot:
        warning.append(f"{d.temperature_celsius} °C (health.max_disk_temperature "
                       f"{h.max_disk_temperature})")
    if not critical and not warning:
        return None
    name = d.device + (f" ({d.model})" if d.model else "")
    if critical:
        action = ("replace it now (a member of an MD array: mdadm --fail and --remove it "
                  "first; the array rebuilds onto the new disk)")
    else:
        action = "; ".join(
            (["it is wearing out: plan its replacement and watch the counts"] if worn else [])
            + (["check the cooling"] if hot else []))
    return Problem(f"disk {d.device}", Level.CRITICAL if critical else Level.WARNING,
                   f"disk {name}: " + ", ".join(critical + warning), action)


def assess(filesystem: Filesystem | None, arrays: Iterable[MdArray], disks: Iterable[Disk],
           volumes: Iterable[VolumeSpace], h: HealthConfig, notes: Iterable[str] = (),
           now: float = 0.0) -> HealthReport:
    """The report: every problem with what to do, the worst level."""
    arrays, disks, volumes = tuple(arrays), tuple(disks), tuple(volumes)
    problems: list[Problem] = []
    out_notes = list(notes)
    if filesystem is not None:
        p = _fs_problem(filesystem, volumes, h)
        if p is not None:
            problems.append(p)
        stores = sum(v.size - v.allocated_bytes for v in volumes if v.size > v.allocated_bytes)
        if stores > filesystem.free_bytes:
            out_notes.append(f"the volumes' sparse stores may still grow by {_gib(stores)}, "
                             f"more than the {_gib(filesystem.free_bytes)} free: the file "
                             "system is overcommitted")
    for a in arrays:
        p = _array_problem(a)
        if p is not None:
            problems.append(p)
        elif a.sync is not None:
            pct = "" if a.sync.percent is None else f" {a.sync.percent:g} %"
            out_notes.append(f"MD array {a.name}: {a.sync.action}{pct}")
    for d in disks:
        p = _disk_problem(d, h)
        if p is not None:
            problems.append(p)
        if d.error:
            out_notes.append(f"SMART of {d.device} not read: {d.error}")
    level = max((p.level for p in problems), default=Level.OK)
    return HealthReport(level, now, filesystem, arrays, disks, volumes, tuple(problems),
                        tuple(out_notes))


# -- I/O at the edges ------------------------------------------------------------------


def _read(path: Path | str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def filesystem_of(data_dir: Path) -> Filesystem:
    real = os.path.realpath(data_dir)
    st = os.statvfs(real)
    dev = os.stat(real).st_dev
    mount, source, fstype = parse_mountinfo(_read("/proc/self/mountinfo") or "",
                                            (os.major(dev), os.minor(dev)), real)
    size = int(st.f_blocks) * int(st.f_frsize)
    return Filesystem(str(data_dir), mount, source, fstype, size, free_bytes(st),
                      reserve_bytes(size))


def backing_devices(data_dir: Path, sys_root: Path = Path("/sys")) -> tuple[list[str], list[str]]:
    """(MD arrays, whole disks) under data_dir's file system, through device-mapper
    (LVM), MD and partitions: ``/sys/dev/block/MAJ:MIN`` and each device's ``slaves``."""
    dev = os.stat(os.path.realpath(data_dir)).st_dev
    top = sys_root / "dev" / "block" / f"{os.major(dev)}:{os.minor(dev)}"
    if os.major(dev) == 0 or not top.exists():
        return [], []  # tmpfs, overlay, NFS: no block device
    arrays: list[str] = []
    disks: list[str] = []
    seen: set[str] = set()
    todo = [top.resolve()]
    while todo:
        node = todo.pop()
        name = node.name
        if name in seen:
            continue
        seen.add(name)
        slaves = sorted((node / "slaves").iterdir()) if (node / "slaves").is_dir() else []
        if (node / "md").is_dir():
            arrays.append(name)
        if slaves:
            todo.extend(s.resolve() for s in slaves)
        elif (node / "partition").exists():
            disks.append(node.parent.name)
        else:
            disks.append(name)
    return sorted(arrays), sorted(set(disks))


_cache: dict[tuple[str, ...], tuple[float, tuple[int, str, str]]] = {}
_cache_lock = threading.Lock()


def _tool(argv: list[str], ttl: float) -> tuple[int, str, str]:
    """An external tool's answer, reused for ``ttl`` seconds (mdadm and smartctl are
    asked once per health.interval, however often status or metrics ask)."""
    key = tuple(argv)
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None and now - hit[0] < ttl:
        return hit[1]
    result = output(argv, timeout=TOOL_TIMEOUT)
    with _cache_lock:
        _cache[key] = (now, result)
    return result


def volume_spaces(data_dir: Path, journal_max: int) -> list[VolumeSpace]:
    """What each volume holds on disk, read from its files (no lock, nothing written)."""
    def total(paths: Iterable[Path], blocks: bool) -> int:
        n = 0
        for p in paths:  # nbdkit may release segments meanwhile
            with contextlib.suppress(FileNotFoundError):
                st = p.stat()
                n += st.st_blocks * 512 if blocks else st.st_size
        return n

    out = []
    for info in list_volumes(data_dir):
        try:
            segments = segment_files(info.path / "journal")
        except FileNotFoundError:  # deleted meanwhile
            segments = []
        journal = total(segments, blocks=False)
        sdir = info.path / "snapshots"
        count = 0
        if sdir.is_dir():
            from .snapshots import listing

            with contextlib.suppress(Exception):  # a torn index must not hide the rest
                count = len(listing(data_dir, info.name))
        out.append(VolumeSpace(
            name=info.name, size=info.size,
            allocated_bytes=total([info.path / "store"], blocks=True),
            journal_bytes=journal, journal_max_bytes=journal_cap_for(info.path, journal_max),
            snapshots=count,
            snapshot_bytes=total(sdir.iterdir(), blocks=True) if sdir.is_dir() else 0))
    return out


def _arrays(names: list[str], mdstat: Path, ttl: float, notes: list[str]) -> list[MdArray]:
    stat = parse_mdstat(_read(mdstat) or "") if names else {}
    out = []
    for name in names:
        detail = None
        try:
            rc, text, err = _tool(["mdadm", "--detail", f"/dev/{name}"], ttl)
            if rc == 0:
                detail = parse_mdadm_detail(name, text)
            else:
                notes.append(f"mdadm --detail /dev/{name}: {err.strip() or rc}")
        except CommandError as e:
            notes.append(f"mdadm not installed: {name} read from /proc/mdstat only"
                         if e.returncode == 127 else f"{e}: {name} read from /proc/mdstat only")
        a = merge_md(stat.get(name), detail)
        if a is not None:
            out.append(a)
    return out


def _disks(names: list[str], ttl: float, notes: list[str]) -> list[Disk]:
    """smartctl for every disk at once: a dying disk may take smartctl the whole
    TOOL_TIMEOUT, and `nbdgw status` must not wait that long once per disk."""
    from concurrent.futures import ThreadPoolExecutor

    def one(name: str) -> Disk | CommandError:
        dev = f"/dev/{name}"
        try:
            _, text, err = _tool(["smartctl", "--json", "-i", "-H", "-A", "--nocheck=standby",
                                  dev], ttl)
        except CommandError as e:
            return e if e.returncode in (126, 127) else Disk(dev, error=str(e))
        return (parse_smartctl(dev, text) if text.strip() else
                Disk(dev, error=err.strip() or "no output"))

    if not names:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
        results = list(pool.map(one, names))
    cannot = next((r for r in results if isinstance(r, CommandError)), None)
    if cannot is not None:
        notes.append("smartctl not installed (Debian package smartmontools): disks not "
                     "checked" if cannot.returncode == 127 else
                     f"smartctl cannot be run here ({cannot.stderr}): disks not checked")
        return []
    return [r for r in results if isinstance(r, Disk)]


def gather(cfg: NodeConfig, smart: bool = True, sys_root: Path = Path("/sys"),
           mdstat: Path = Path("/proc/mdstat")) -> HealthReport:
    """Read every source and assess; nothing here raises for a missing tool."""
    notes: list[str] = []
    try:
        fs = filesystem_of(cfg.data_dir)
    except OSError as e:
        r = assess(None, (), (), (), cfg.health, notes, time.time())
        return replace(r, level=Level.CRITICAL, problems=(Problem(
            "filesystem", Level.CRITICAL, f"data_dir {cfg.data_dir}: {e.strerror or e}",
            "create it, mount its file system, or correct node.data_dir"),))
    volumes: list[VolumeSpace] = []
    try:
        volumes = node_volumes(cfg)
    except (OSError, ValueError) as e:
        notes.append(f"volumes not measured: {e}")
    md_names, disk_names = backing_devices(cfg.data_dir, sys_root)
    if not md_names and not disk_names:
        notes.append(f"{cfg.data_dir} is on {fs.fstype or 'a file system'} without a block "
                     "device: no arrays or disks to check")
    arrays = _arrays(md_names, mdstat, cfg.health.interval, notes)
    disks = _disks(disk_names, cfg.health.interval, notes) if smart else []
    return assess(fs, arrays, disks, volumes, cfg.health, notes, time.time())


def node_volumes(cfg: NodeConfig) -> list[VolumeSpace]:
    """The volumes of ``cfg``'s data_dir; on a node config with groups, those of every
    group of the node (named GROUP/VOLUME), whose data_dirs share the node's file system:
    the check a monitoring system runs on the host, once, without naming a group."""
    if not cfg.groups:
        return volume_spaces(cfg.data_dir, cfg.journal.max_bytes)
    out: list[VolumeSpace] = []
    for g in groups_of(cfg):
        gc = group_config(cfg, g.name)
        if gc.data_dir.is_dir():  # a group with no volume created yet has none
            out += [replace(v, name=f"{g.name}/{v.name}")
                    for v in volume_spaces(gc.data_dir, gc.journal.max_bytes)]
    return out


def check(cfg: NodeConfig) -> HealthReport:
    """One health round for ``cfg``'s data_dir (the daemon calls it through Monitor)."""
    return gather(cfg)


# -- transitions -----------------------------------------------------------------------


@dataclass
class Monitor:
    """Runs ``check`` and logs what changed since the previous round, once each: a
    problem that appears or gets worse (``health_problem``, warning), one that is gone
    (``health_recovered``, info).  The same problem at the same level is not logged
    again.  For the daemon: ``Monitor(cfg).start(stop_event)`` (a thread that runs it
    every ``health.interval`` seconds), or ``run()`` from a worker of its own, off the
    event loop (mdadm and smartctl may take a second or two)."""

    cfg: NodeConfig
    checker: Callable[[NodeConfig], HealthReport] = check
    previous: dict[str, Problem] = field(default_factory=dict)
    last: HealthReport | None = None

    def run(self) -> HealthReport:
        report = self.checker(self.cfg)
        self.observe(report)
        return report

    def start(self, stop: threading.Event) -> threading.Thread:
        """run() now and every health.interval seconds on a thread of its own, until
        ``stop`` is set: the daemon's whole hook is ``Monitor(cfg).start(stop_event)``."""
        def loop() -> None:
            while True:
                try:
                    self.run()
                except Exception as e:  # noqa: BLE001 - a check that fails must not end the watch
                    log.error("health_check_failed", error=f"{type(e).__name__}: {e}")
                if stop.wait(self.cfg.health.interval):
                    return

        t = threading.Thread(target=loop, name="nbdgw-health", daemon=True)
        t.start()
        return t

    def observe(self, report: HealthReport) -> None:
        now = {p.key: p for p in report.problems}
        for key, p in now.items():
            old = self.previous.get(key)
            if old is None or p.level > old.level:
                log.warning("health_problem", key=key, level=str(p.level), message=p.message,
                            action=p.action)
        for key, old in self.previous.items():
            if key not in now:
                log.info("health_recovered", key=key, was=str(old.level), message=old.message)
            elif now[key].level < old.level:
                log.info("health_improved", key=key, level=str(now[key].level),
                         was=str(old.level), message=now[key].message)
        self.previous = now
        self.last = report


# -- text -------------------------------------------------------------------------------


def summary_lines(r: dict[str, Any]) -> list[str]:
    """A report's JSON in a few lines for `nbdgw status`: the level and the space left,
    then each problem and what to do (`nbdgw health` has the rest)."""
    parts = []
    fs = r.get("filesystem")
    if fs is not None:
        parts.append(f"{_gib(fs['free_bytes'])} free of {_gib(fs['size_bytes'])} "
                     f"({100 * fs['free_ratio']:.1f} %)")
    parts += [f"{a['name']} {a['state']}" for a in r["arrays"]]
    smart = [d for d in r["disks"] if d["smart_passed"] is not None]
    if smart:
        ok = sum(1 for d in smart if d["smart_passed"])
        parts.append(f"SMART {ok}/{len(smart)} disks passed")
    out = [f"health: {r['level'].upper()}" + (f": {', '.join(parts)}" if parts else "")]
    for p in r["problems"]:
        out.append(f"  {p['level'].upper()}: {p['message']}")
        out.append(f"    what to do: {p['action']}")
    return out


def render_text(r: dict[str, Any]) -> list[str]:
    """Plain lines of a report's JSON (nbdgw health, nbdgw status)."""
    out = [f"health: {r['level'].upper()}"]
    fs = r.get("filesystem")
    if fs is not None:
        out.append(f"  file system {fs['mount'] or '?'} ({fs['source'] or '-'}, "
                   f"{fs['fstype'] or '-'}): {_gib(fs['free_bytes'])} free of "
                   f"{_gib(fs['size_bytes'])} ({100 * fs['free_ratio']:.1f} %)")
    for a in r["arrays"]:
        sync = a["sync"]
        line = (f"  array {a['name']} {a['level']}: {a['state']}, {a['active_devices']}/"
                f"{a['raid_devices']} in sync, {a['spare_devices']} spare, "
                f"{a['failed_devices']} failed")
        if sync is not None and sync["percent"] is not None:
            line += f", {sync['action']} {sync['percent']:g} %"
        out.append(line)
    for d in r["disks"]:
        if d["error"] and d["smart_passed"] is None:
            continue  # said in the notes
        smart = {True: "passed", False: "FAILED", None: "unknown"}[d["smart_passed"]]
        extra = [f"{k.replace('_', ' ')} {d[k]}" for k in
                 ("reallocated_sectors", "pending_sectors", "media_errors") if d[k]]
        if d["temperature_celsius"] is not None:
            extra.append(f"{d['temperature_celsius']} °C")
        out.append(f"  disk {d['device']}{' ' + d['model'] if d['model'] else ''}: SMART "
                   f"{smart}" + (", " + ", ".join(extra) if extra else ""))
    for v in r["volumes"]:
        out.append(f"  volume {v['name']}: journal {_gib(v['journal_bytes'])} of "
                   f"{_gib(v['journal_max_bytes'])}, {v['snapshots']} snapshots "
                   f"{_gib(v['snapshot_bytes'])}, store {_gib(v['allocated_bytes'])} of "
                   f"{_gib(v['size'])}")
    for p in r["problems"]:
        out.append(f"  {p['level'].upper()}: {p['message']}")
        out.append(f"    what to do: {p['action']}")
    out += [f"  note: {n}" for n in r["notes"]]
    return out
