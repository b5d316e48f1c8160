"""The derivation of `nbdgw fleet events` from etcd's changes (gateway/fleet.py), pure:
one revision's changes read together (a switchover's transaction, a lease's expiry)."""

from __future__ import annotations

import json
from typing import Any

from gateway.fleet import Change, derive_events


def j(**v: Any) -> str:
    return json.dumps(v)


def whats(changes: list[Change]) -> list[tuple[int, str, str | None]]:
    return [(e.revision, e.what, e.node) for e in derive_events(changes)]


A1 = j(node="a", epoch=1)
MEMBER_A = j(state="primary", consistent=True, data_epoch=1)


def test_a_take_then_served() -> None:
    assert whats([
        Change(5, "g/primary", False, A1),
        Change(5, "g/state", False, j(epoch=1, served=0, outdated=[])),
        Change(6, "g/state", False, j(epoch=1, served=1, outdated=[]),
               j(epoch=1, served=0, outdated=[])),
    ]) == [(5, "taken", "a"), (6, "served", None)]


def test_a_switchover_is_a_handover_then_a_take_from_it() -> None:
    events = derive_events([
        Change(7, "g/primary", True, None, A1),
        Change(7, "g/handover", False, j(to="b", **{"from": "a"})),
        Change(8, "g/primary", False, j(node="b", epoch=2)),
        Change(8, "g/handover", True, None, j(to="b", **{"from": "a"})),
    ])
    assert [(e.what, e.node) for e in events] == [("handed_over", "a"), ("taken", "b")]
    assert events[1].text == "b took the primary key on epoch 2 (switchover from a)"


def test_a_lease_expiry_is_lost_and_a_delete_alone_released() -> None:
    assert whats([
        Change(9, "g/primary", True, None, A1),
        Change(9, "g/members/a", True, None, MEMBER_A),
        Change(11, "h/primary", True, None, j(node="c", epoch=4)),
    ]) == [(9, "lost", "a"), (9, "member_gone", "a"), (11, "released", "c")]


def test_outdated_marks_set_and_cleared() -> None:
    s0 = j(epoch=2, served=2, outdated=[])
    s1 = j(epoch=2, served=2, outdated=["b", "c"])
    s2 = j(epoch=2, served=2, outdated=["c"])
    assert whats([Change(3, "g/state", False, s1, s0), Change(4, "g/state", False, s2, s1)]) \
        == [(3, "outdated", "b"), (3, "outdated", "c"), (4, "in_sync", "b")]


def test_member_rewrites_that_change_nothing_are_no_events() -> None:
    standby = j(state="standby", consistent=True, data_epoch=1, epoch=1)
    assert whats([
        Change(3, "g/members/b", False, standby),
        Change(4, "g/members/b", False, standby, standby),
        Change(5, "g/members/b", False, j(state="primary", consistent=True, data_epoch=1,
                                          epoch=2), standby),
    ]) == [(3, "member", "b"), (5, "member", "b")]


def test_a_restart_rebinds_and_a_withdrawn_handover() -> None:
    assert whats([
        Change(3, "g/primary", False, A1, A1),
        Change(4, "g/handover", True, None, j(to="b", **{"from": "a"})),
    ]) == [(3, "rebound", "a"), (4, "handover_withdrawn", "a")]


def test_history_before_compaction_unknown_prev_still_gives_events() -> None:
    """A put whose previous value was compacted away (prev None) is read as new."""
    assert whats([Change(2, "g/members/b", False, j(state="standby", consistent=True))]) \
        == [(2, "member", "b")]


def test_values_that_are_not_nbdgw_s_are_not_fatal() -> None:
    assert whats([Change(2, "g/primary", False, "garbage"),
                  Change(3, "g/state", False, "[1]", "{")]) == [(2, "taken", "?")]
