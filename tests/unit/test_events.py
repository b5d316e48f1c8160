"""gateway/events.py: summaries of `nbdgw status` reports and their differences."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gateway.events import EventLog, diff, exists, follow, summary


def report(state: str = "primary", epoch: int = 1, peer_state: str = "in sync",
           progress: dict[str, Any] | None = None, snaps: tuple[str, ...] = (),
           split: str | None = None) -> dict[str, Any]:
    return {"failover": {"state": state, "epoch": epoch, "primary": "main"},
            "split_brain": {"other_node": split} if split else None,
            "volumes": [{"name": "v1", "role": "primary", "snapshot_names": list(snaps),
                         "peers": [{"name": "dc", "state": peer_state,
                                    "progress": progress}]}]}


def test_nothing_changed_nothing_emitted() -> None:
    assert diff(summary(report()), summary(report())) == []
    assert diff(None, summary(report())) == []


def test_each_kind_of_change() -> None:
    old = summary(report())
    new = summary(report(state="fenced", peer_state="disconnected", snaps=("s1",),
                         split="dr"))
    assert diff(old, new) == [
        {"event": "node", "state": "fenced", "epoch": 1, "primary": "main",
         "old": "primary"},
        {"event": "split-brain", "other": "dr"},
        {"event": "peer", "volume": "v1", "peer": "dc", "state": "disconnected",
         "old": "in sync"},
        {"event": "snapshot", "volume": "v1", "name": "s1", "change": "created"}]
    assert diff(new, old)[-1] == {"event": "snapshot", "volume": "v1", "name": "s1",
                                  "change": "deleted"}


def test_progress_moves_in_steps() -> None:
    def at(done: int) -> dict[str, Any]:
        return summary(report(peer_state="resync",
                              progress={"phase": "resync", "done": done, "total": 1000}))
    assert diff(at(100), at(150)) == []  # still in the 10 % step
    assert diff(at(150), at(210)) == [{"event": "progress", "volume": "v1", "peer": "dc",
                                       "phase": "resync", "percent": 20}]


def test_exists_lists_the_current_state() -> None:
    out = exists(summary(report(snaps=("a", "b"))))
    assert [e["kind"] for e in out] == ["node", "volume", "peer"]
    assert out[1]["snapshots"] == 2 and out[2]["state"] == "in sync"


def test_the_log_numbers_events_and_follows_rotation(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    log.emit([{"event": "node", "state": "primary"}])
    got = follow(tmp_path, stop_after=3.0, poll=0.02)
    log.emit([{"event": "peer", "state": "a"}])
    first = next(got)
    (tmp_path / "events.jsonl").rename(tmp_path / "events.jsonl.1")  # as rotation does
    log.emit([{"event": "peer", "state": "b"}])
    second = next(got)
    assert (first["seq"], first["state"]) == (2, "a")
    assert (second["seq"], second["state"]) == (3, "b")
    assert EventLog(tmp_path).seq == 3  # a restarted daemon goes on numbering
    assert json.loads((tmp_path / "events.jsonl").read_text())["seq"] == 3
