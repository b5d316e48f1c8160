"""`nbdgw events`: one JSON line per change of what `nbdgw status` shows.

The daemon keeps ``<data_dir>/run/events.jsonl`` (append-only; rotated to
``events.jsonl.1`` past ``MAX_BYTES``): failover transitions as they happen, and once a
second the differences between two summaries of the node (``summary()``): peer states
per volume, resync and compare progress (in steps of ``PROGRESS_STEP``), split brain,
snapshots created and deleted, health.  `nbdgw events` first prints the current state
as ``exists`` events (like ``drbdsetup events2 --now``), then follows the file.

Every event is a flat object: ``{"seq", "time", "event", ...}`` with ``event`` one of
``node`` (state, epoch, primary), ``peer`` (volume, peer, state, old), ``progress``
(volume, peer, phase, percent), ``split-brain`` (other, or null when settled),
``snapshot`` (volume, name, change: created|deleted), ``health`` (level, detail),
``rpo`` (volume, peer, state: exceeded|ok, lag_seconds, lag_bytes, bound_seconds,
bound_bytes: a link's ``rpo`` bound passed, or back within it) and
``exists`` (kind and the fields of that kind).  ``diff()`` is pure.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from blockstore.errors import BlockstoreError
from blockstore.modes import create_file

from .config import NodeConfig

FILE: Final = "events.jsonl"
MAX_BYTES: Final = 4 << 20
PROGRESS_STEP: Final = 10  # percent


def node_summary(data_dir: Path, cfg: NodeConfig | None = None) -> dict[str, Any]:
    """The summary of the node in ``data_dir`` (its `nbdgw status` report, read from
    disk, plus the snapshot names; with ``cfg``, the links' RPO bounds too)."""
    from .snapshots import listing
    from .status import node_report

    report = node_report("", data_dir, cfg, live=False)
    for v in report["volumes"]:
        try:
            v["snapshot_names"] = [r["name"] for r in listing(data_dir, v["name"])]
        except (BlockstoreError, OSError, ValueError):
            v["snapshot_names"] = []
    return summary(report)


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the events follow, taken from a `nbdgw status` report (gateway/status.py)
    whose volumes carry ``snapshot_names``."""
    fo = report.get("failover") or {}
    vols: dict[str, Any] = {}
    for v in report.get("volumes", []):
        peers = {}
        for p in v.get("peers", []):
            prog = p.get("progress") or None
            pct = None
            if prog and prog.get("total"):
                pct = int(100 * prog["done"] / prog["total"]) // PROGRESS_STEP * PROGRESS_STEP
            rpo = p.get("rpo")
            peers[p["name"]] = {"state": p["state"],
                                "phase": prog.get("phase") if prog else None, "percent": pct,
                                "rpo": None if rpo is None else (
                                    "exceeded" if rpo["exceeded"] else "ok"),
                                "rpo_detail": None if rpo is None else {
                                    "lag_seconds": p["data_loss_window"]["seconds"],
                                    "lag_bytes": p["data_loss_window"]["bytes"],
                                    "bound_seconds": rpo["seconds"],
                                    "bound_bytes": rpo["bytes"]}}
        vols[v["name"]] = {"role": v["role"], "peers": peers,
                           "snapshots": sorted(s for s in v.get("snapshot_names", []))}
    sb = report.get("split_brain")
    health = report.get("health") or {}
    return {"state": fo.get("state"), "epoch": fo.get("epoch"), "primary": fo.get("primary"),
            "split_brain": sb.get("other_node") if sb else None,
            "health": {"level": health.get("level"), "detail": health.get("summary")},
            "volumes": vols}


def diff(old: dict[str, Any] | None, new: dict[str, Any]) -> list[dict[str, Any]]:
    """The events that lead from summary ``old`` to summary ``new`` (None: none yet)."""
    if old is None:
        return []
    out: list[dict[str, Any]] = []
    if (old["state"], old["epoch"], old["primary"]) != (new["state"], new["epoch"],
                                                        new["primary"]):
        out.append({"event": "node", "state": new["state"], "epoch": new["epoch"],
                    "primary": new["primary"], "old": old["state"]})
    if old["split_brain"] != new["split_brain"]:
        out.append({"event": "split-brain", "other": new["split_brain"]})
    if old["health"] != new["health"]:
        out.append({"event": "health", **new["health"]})
    for name, v in new["volumes"].items():
        ov = old["volumes"].get(name, {"peers": {}, "snapshots": []})
        for peer, p in v["peers"].items():
            op = ov["peers"].get(peer, {"state": None, "phase": None, "percent": None})
            if p["state"] != op["state"]:
                out.append({"event": "peer", "volume": name, "peer": peer,
                            "state": p["state"], "old": op["state"]})
            old_rpo = op.get("rpo")
            if p.get("rpo") != old_rpo and (p.get("rpo") == "exceeded"
                                            or old_rpo == "exceeded"):
                out.append({"event": "rpo", "volume": name, "peer": peer,
                            "state": p["rpo"] or "ok", **(p.get("rpo_detail") or {})})
            if p["percent"] is not None and (p["phase"], p["percent"]) != (
                    op["phase"], op["percent"]):
                out.append({"event": "progress", "volume": name, "peer": peer,
                            "phase": p["phase"], "percent": p["percent"]})
        for snap in sorted(set(v["snapshots"]) - set(ov["snapshots"])):
            out.append({"event": "snapshot", "volume": name, "name": snap,
                        "change": "created"})
        for snap in sorted(set(ov["snapshots"]) - set(v["snapshots"])):
            out.append({"event": "snapshot", "volume": name, "name": snap,
                        "change": "deleted"})
    return out


def exists(s: dict[str, Any]) -> list[dict[str, Any]]:
    """The current state as ``exists`` events (what `nbdgw events` prints first)."""
    out: list[dict[str, Any]] = [{"event": "exists", "kind": "node", "state": s["state"],
                                  "epoch": s["epoch"], "primary": s["primary"],
                                  "split_brain": s["split_brain"], **{
                                      f"health_{k}": v for k, v in s["health"].items()}}]
    for name, v in s["volumes"].items():
        out.append({"event": "exists", "kind": "volume", "volume": name, "role": v["role"],
                    "snapshots": len(v["snapshots"])})
        for peer, p in v["peers"].items():
            out.append({"event": "exists", "kind": "peer", "volume": name, "peer": peer,
                        **{k: x for k, x in p.items() if k != "rpo_detail"}})
    return out


class EventLog:
    """The daemon's side: number events and append them (one write per line)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / FILE
        self.seq = self._last_seq()

    def _last_seq(self) -> int:
        try:
            with self.path.open("rb") as f:
                f.seek(max(0, self.path.stat().st_size - 4096))
                lines = f.read().splitlines()
            return int(json.loads(lines[-1])["seq"]) if lines else 0
        except (OSError, ValueError, KeyError, IndexError):
            return 0

    def emit(self, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        now = time.time()
        data = b""
        for e in events:
            self.seq += 1
            data += json.dumps({"seq": self.seq, "time": round(now, 3), **e}).encode() + b"\n"
        with contextlib.suppress(OSError):
            if self.path.exists() and self.path.stat().st_size + len(data) > MAX_BYTES:
                os.replace(self.path, self.path.with_name(FILE + ".1"))
            fd = create_file(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)


def follow(run_dir: Path, stop_after: float | None = None,
           poll: float = 0.2) -> Iterator[dict[str, Any]]:
    """Events appended to the log from this call on (survives rotation); ``stop_after``
    bounds the wait in seconds (None: for ever).  The log is opened here, before the
    first ``next()``, so nothing written between this call and the reading is missed."""
    return _Follower(run_dir / FILE, stop_after, poll)


class _Follower:
    def __init__(self, path: Path, stop_after: float | None, poll: float) -> None:
        self.path = path
        self.poll = poll
        self.deadline = None if stop_after is None else time.monotonic() + stop_after
        self.f: Any = None
        self.inode: int | None = None
        self.buf = b""
        with contextlib.suppress(FileNotFoundError):
            self.f = path.open("rb")
            self.f.seek(0, os.SEEK_END)  # only what comes after this call
            self.inode = os.fstat(self.f.fileno()).st_ino
        self.pending: list[dict[str, Any]] = []

    def __iter__(self) -> _Follower:
        return self

    def _reopen_if_rotated(self) -> None:
        try:
            ino = self.path.stat().st_ino
        except FileNotFoundError:
            return
        if ino != self.inode:
            if self.f is not None:
                self.buf += self.f.read()  # the rest of the rotated file
                self.f.close()
            self.f = self.path.open("rb")
            self.inode = ino

    def __next__(self) -> dict[str, Any]:
        while not self.pending:
            if self.deadline is not None and time.monotonic() >= self.deadline:
                if self.f is not None:
                    self.f.close()
                raise StopIteration
            self._reopen_if_rotated()
            chunk = self.f.read() if self.f is not None else b""
            if chunk or self.buf.endswith(b"\n"):
                self.buf += chunk
                *lines, self.buf = self.buf.split(b"\n")
                for line in lines:
                    with contextlib.suppress(ValueError):
                        self.pending.append(json.loads(line))
            else:
                time.sleep(self.poll)
        return self.pending.pop(0)
