"""A sync peer's standing (peerlink/syncstate.py), fed events: no daemons, no clocks."""

from __future__ import annotations

import pytest

from peerlink.syncstate import (
    TRANSITIONS,
    IllegalSyncEvent,
    Standing,
    SyncEvent,
    SyncStanding,
)


def test_the_table_names_every_standing() -> None:
    assert set(TRANSITIONS) == set(Standing)
    # Only a stalled peer may be degraded, and only by permission.
    assert [s for s, evs in TRANSITIONS.items() if SyncEvent.PERMIT in evs] == [
        Standing.STALLED]
    assert [s for s, evs in TRANSITIONS.items()
            if Standing.DEGRADED in evs.values()] == [Standing.STALLED]


def test_an_illegal_event_names_the_standing_and_the_event() -> None:
    st = SyncStanding(1.0)
    with pytest.raises(IllegalSyncEvent, match="sync standing ok: event permit is not "
                                               "allowed"):
        st.fire(SyncEvent.PERMIT)


def test_overdue_after_the_timeout_of_the_oldest_waited_seq() -> None:
    st = SyncStanding(2.0)
    st.want(5, acked=3, now=10.0)
    st.want(4, acked=3, now=10.5)  # older than what is waited for already: covered by 5
    st.want(7, acked=3, now=11.0)
    assert st.overdue(11.9, None) is None
    assert st.overdue(12.0, None) == "no acknowledgement of seq 5 within 2 s (waited 2.0 s)"
    st.acked(5)  # the oldest acknowledged: the next one is timed from when it was wanted
    assert st.overdue(12.5, None) is None
    assert st.overdue(13.0, None) is not None
    st.acked(9)
    assert st.overdue(100.0, None) is None
    st.want(8, acked=9, now=100.0)  # already acknowledged: nothing to wait for
    assert not st.waiting


def test_overdue_when_the_link_is_down_that_long() -> None:
    st = SyncStanding(1.0)
    assert st.overdue(5.0, down_since=4.5) is None
    assert st.overdue(5.0, down_since=4.0) == "peer unreachable for 1 s"


def test_stalled_holds_until_permitted_then_releases_and_resumes_when_caught_up() -> None:
    st = SyncStanding(1.0)
    st.want(10, acked=0, now=0.0)
    assert st.fire(SyncEvent.STALL, wall=1234.0) is Standing.STALLED
    assert st.holds and st.stalled_since == 1234.0
    st.want(12, acked=0, now=3.0)
    assert st.holds  # still: waiters keep waiting without permission
    assert st.fire(SyncEvent.PERMIT) is Standing.DEGRADED
    assert not st.holds and st.stalled_since is None and not st.waiting
    assert st.released == 12  # acknowledged to clients without the peer
    st.want(15, acked=0, now=4.0)
    assert st.released == 15 and not st.waiting
    # Caught up only once it holds the journal it saw and everything released.
    assert not st.caught_up(14, journal_seen=14, streaming=True, inflight=False)
    assert not st.caught_up(20, journal_seen=21, streaming=True, inflight=False)
    assert not st.caught_up(21, journal_seen=21, streaming=False, inflight=False)
    assert not st.caught_up(21, journal_seen=21, streaming=True, inflight=True)
    assert st.caught_up(21, journal_seen=21, streaming=True, inflight=False)
    assert st.fire(SyncEvent.CATCH_UP) is Standing.OK and st.holds


def test_a_stalled_peer_that_answers_recovers_without_degrading() -> None:
    st = SyncStanding(1.0)
    st.want(3, acked=0, now=0.0)
    st.fire(SyncEvent.STALL, wall=1.0)
    st.acked(3)
    assert st.overdue(10.0, None) is None
    assert st.fire(SyncEvent.RECOVER) is Standing.OK
    assert st.released == 0 and st.stalled_since is None
