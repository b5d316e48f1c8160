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


def rpo_report(lag_s: float | None, lag_b: int, exceeded: bool | None) -> dict[str, Any]:
    r = report()
    p = r["volumes"][0]["peers"][0]
    p["data_loss_window"] = {"seconds": lag_s, "bytes": lag_b}
    p["rpo"] = None if exceeded is None else {"seconds": 60.0, "bytes": None,
                                              "exceeded": exceeded}
    return r


def test_an_rpo_bound_passed_and_recovered_is_one_event_each() -> None:
    ok, over = summary(rpo_report(3.0, 4096, False)), summary(rpo_report(75.5, 9 << 20, True))
    assert diff(ok, summary(rpo_report(40.0, 8192, False))) == []  # lag moves, bound holds
    assert diff(ok, over) == [{"event": "rpo", "volume": "v1", "peer": "dc",
                               "state": "exceeded", "lag_seconds": 75.5,
                               "lag_bytes": 9 << 20, "bound_seconds": 60.0,
                               "bound_bytes": None}]
    assert diff(over, summary(rpo_report(80.0, 10 << 20, True))) == []  # still past it
    assert diff(over, ok)[0]["state"] == "ok"
    # A link without a bound never alerts; a bound removed while past it says ok.
    assert diff(summary(rpo_report(3.0, 0, None)), summary(rpo_report(900.0, 1 << 30, None))
                ) == []
    assert diff(over, summary(rpo_report(900.0, 1 << 30, None)))[0]["state"] == "ok"
    assert "rpo_detail" not in exists(over)[2] and exists(over)[2]["rpo"] == "exceeded"


def test_rpo_state_against_the_bounds() -> None:
    from gateway.config import RpoConfig
    from gateway.status import rpo_state

    w = {"seconds": 30.0, "bytes": 5 << 20}
    assert rpo_state(w, None) is None and rpo_state(w, RpoConfig()) is None
    assert rpo_state(w, RpoConfig(seconds=60))["exceeded"] is False  # type: ignore[index]
    assert rpo_state(w, RpoConfig(seconds=10))["exceeded"] is True  # type: ignore[index]
    assert rpo_state(w, RpoConfig(bytes=4 << 20)) == {"seconds": None, "bytes": 4 << 20,
                                                      "exceeded": True}
    assert rpo_state({"seconds": None, "bytes": 0}, RpoConfig(seconds=1))[  # type: ignore[index]
        "exceeded"] is False  # nothing unacknowledged: no age
