"""The failover state machine and heartbeat codec, fed with synthetic views (no daemons)."""

from __future__ import annotations

import hashlib
import hmac
import math
import socket
import time

import msgpack
import pytest

from gateway.failover import (
    TRANSITIONS,
    Action,
    Event,
    IllegalTransition,
    Report,
    State,
    Timers,
    View,
    decide,
    primary_gone,
    step,
)
from gateway.heartbeat import BadBeat, Beat, Heartbeat, decode_beat, encode_beat

T = Timers(timeout=2.0, fence_margin=1.0)
SECRET = b"s" * 32


def view(me: str, *, epoch: int = 0, primary: str | None = "main") -> View:
    peers = tuple(n for n in ("main", "dc", "dr") if n != me)
    return View(me=me, epoch=epoch, primary=primary, witnesses=("dr",) if me != "dr" else (),
                peers=peers, started=0.0, known_epoch=epoch)


def hear(v: View, node: str, at: float, state: State, sees: dict[str, float],
         epoch: int = 0, known: int = 0, handover_to: str | None = None) -> None:
    v.heard[node] = at
    v.reports[node] = Report(state, epoch, sees, at, known, handover_to)


# -- the table -------------------------------------------------------------------------

def test_every_state_is_in_the_table() -> None:
    assert set(TRANSITIONS) == set(State)


@pytest.mark.parametrize(("state", "event", "new", "actions"), [
    (State.STARTING, Event.QUORUM_OK, State.PRIMARY, (Action.SERVE,)),
    (State.PRIMARY, Event.QUORUM_LOST, State.FENCED, (Action.FENCE,)),
    (State.FENCED, Event.QUORUM_OK, State.PRIMARY, (Action.SERVE,)),
    (State.PRIMARY, Event.NEWER_PRIMARY, State.STALE, (Action.FENCE, Action.REJOIN)),
    (State.FENCED, Event.NEWER_PRIMARY, State.STALE, (Action.REJOIN,)),
    (State.STARTING, Event.NEWER_PRIMARY, State.STALE, (Action.REJOIN,)),
    (State.PRIMARY, Event.HANDED_OVER, State.STALE, (Action.FENCE, Action.REJOIN)),
    (State.STALE, Event.REJOINED, State.STANDBY, (Action.RECEIVE,)),
    (State.STALE, Event.REJOINED_AS_WITNESS, State.WITNESS, (Action.RECEIVE,)),
    (State.STANDBY, Event.HANDOVER, State.PROMOTING, (Action.PROMOTE,)),
    (State.WITNESS, Event.HANDOVER, State.PROMOTING, (Action.PROMOTE,)),
    (State.STALE, Event.KEPT, State.PRIMARY, (Action.SERVE,)),
    (State.STANDBY, Event.PRIMARY_GONE, State.PROMOTING, (Action.PROMOTE,)),
    (State.PROMOTING, Event.PROMOTED, State.PRIMARY, (Action.SERVE,)),
    (State.PROMOTING, Event.PROMOTION_FAILED, State.STANDBY, (Action.RECEIVE,)),
])
def test_transitions(state: State, event: Event, new: State,
                     actions: tuple[Action, ...]) -> None:
    assert step(state, event) == (new, actions)


@pytest.mark.parametrize(("state", "event"), [
    (State.WITNESS, Event.PRIMARY_GONE),  # DR never promotes itself
    (State.STALE, Event.QUORUM_OK),  # a former primary never serves again on its own
    (State.PRIMARY, Event.PROMOTED),
])
def test_illegal_moves_name_state_and_event(state: State, event: Event) -> None:
    with pytest.raises(IllegalTransition) as ei:
        step(state, event)
    assert str(ei.value) == (f"failover: event {event.value} is not allowed in state "
                             f"{state.value}")


# -- decisions --------------------------------------------------------------------------

def test_primary_keeps_serving_with_one_peer_and_fences_with_none() -> None:
    v = view("main")
    hear(v, "dr", 10.0, State.WITNESS, {"main": 0.1, "dc": math.inf})
    assert decide(State.PRIMARY, v, 11.0, T) is None  # dc gone, dr heard: majority
    assert decide(State.PRIMARY, v, 12.5, T) is Event.QUORUM_LOST  # nobody for 2.5 s


def test_secondary_promotes_only_with_the_witness_confirming() -> None:
    v = view("dc")
    hear(v, "main", 0.5, State.PRIMARY, {})
    # DR still hears the primary (a cut between primary and secondary only): no failover.
    for t in (4.0, 6.0, 10.0):
        hear(v, "dr", t - 0.2, State.WITNESS, {"main": 0.3, "dc": 0.1})
        assert decide(State.STANDBY, v, t, T) is None
    # DR has not heard it for 2 s either, and the primary is silent for 3 s+: promote.
    hear(v, "dr", 12.0, State.WITNESS, {"main": 2.5, "dc": 0.1})
    assert decide(State.STANDBY, v, 12.1, T) is Event.PRIMARY_GONE


def test_no_promotion_without_a_live_witness() -> None:
    v = view("dc")
    hear(v, "main", 0.5, State.PRIMARY, {})
    hear(v, "dr", 1.0, State.WITNESS, {"main": math.inf})
    assert not primary_gone(v, 10.0, T)  # DR's report is stale: it cannot vote


def test_no_promotion_before_the_fence_margin() -> None:
    v = view("dc")
    hear(v, "main", 10.0, State.PRIMARY, {})
    hear(v, "dr", 12.9, State.WITNESS, {"main": 2.9})
    assert decide(State.STANDBY, v, 12.9, T) is None  # 2.9 s < timeout + margin
    assert decide(State.STANDBY, v, 13.05, T) is Event.PRIMARY_GONE


def test_promotion_blocked_after_a_failure() -> None:
    v = view("dc")
    v.promote_blocked_until = 100.0
    hear(v, "dr", 50.0, State.WITNESS, {"main": math.inf})
    assert decide(State.STANDBY, v, 50.1, T) is None


def test_fenced_primary_needs_a_steady_majority() -> None:
    v = view("main")
    for t in (20.0, 20.5, 21.0):  # a flapping link: heard, then not
        hear(v, "dr", t, State.WITNESS, {})
        assert decide(State.FENCED, v, t, T) is None
    assert decide(State.FENCED, v, 21.5, T) is None
    hear(v, "dr", 22.0, State.WITNESS, {})
    assert decide(State.FENCED, v, 22.1, T) is Event.QUORUM_OK  # 2 s of quorum


def test_booting_primary_learns_of_a_newer_primary_first() -> None:
    v = view("main")
    hear(v, "dr", 0.3, State.WITNESS, {"main": math.inf}, known=1)  # DR knows epoch 1
    assert decide(State.STARTING, v, 0.4, T) is Event.NEWER_PRIMARY
    v2 = view("main")
    hear(v2, "dr", 0.3, State.WITNESS, {})
    assert decide(State.STARTING, v2, 0.4, T) is None  # dc not heard yet: wait
    assert decide(State.STARTING, v2, 2.1, T) is Event.QUORUM_OK  # waited a timeout
    v3 = view("main")
    assert decide(State.STARTING, v3, 2.1, T) is Event.QUORUM_LOST  # nobody at all


def test_two_primaries_the_older_epoch_yields() -> None:
    v = view("main", epoch=0)
    hear(v, "dc", 5.0, State.PRIMARY, {}, epoch=1, known=1)
    assert decide(State.PRIMARY, v, 5.1, T) is Event.NEWER_PRIMARY
    newer = view("dc", epoch=1, primary="dc")
    hear(newer, "main", 5.0, State.PRIMARY, {}, epoch=0)
    assert decide(State.PRIMARY, newer, 5.1, T) is None


# -- heartbeat codec ----------------------------------------------------------------------

def test_beat_round_trip() -> None:
    beat = encode_beat(SECRET, "dc", State.STANDBY, 3, {"main": 0.25, "dr": math.inf}, 7, 4)
    assert decode_beat(SECRET, beat) == Beat("dc", State.STANDBY, 3,
                                             {"main": 0.25, "dr": math.inf}, 7, 4)
    beat = encode_beat(SECRET, "main", State.STANDBY, 3, {}, 8, 3, "dc")
    assert decode_beat(SECRET, beat).handover_to == "dc"
    beat = encode_beat(SECRET, "main", State.PRIMARY, 4, {}, 9, 4, None, "dr",
                       {"dc": (41, 0.125)})
    b = decode_beat(SECRET, beat)
    assert (b.handover_to, b.discarding, b.echo) == (None, "dr", {"dc": (41, 0.125)})
    # A beat of an older release (7 fields) reads with the defaults.
    old = msgpack.packb([1, "dc", "standby", 3, {}, 7, 4])
    mac = hmac.new(SECRET, old, hashlib.sha256).digest()[:16]
    assert decode_beat(SECRET, b"NGHB" + mac + old) == Beat("dc", State.STANDBY, 3, {}, 7, 4)


def test_round_trip_times_come_from_echoed_sequence_numbers() -> None:
    """Two real heartbeat threads on loopback: each measures the other's round trip."""
    views = {n: view(n, epoch=0) for n in ("main", "dc")}
    socks = {}
    for n in views:
        socks[n] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        socks[n].bind(("127.0.0.1", 0))
    ports = {n: s.getsockname()[1] for n, s in socks.items()}
    for s in socks.values():
        s.close()
    hbs = {n: Heartbeat(views[n], bind=("127.0.0.1", ports[n]),
                        targets={o: [("127.0.0.1", ports[o])] for o in views if o != n},
                        secret=SECRET, interval=0.05,
                        state_fn=lambda: (State.STANDBY, 0)) for n in views}
    for hb in hbs.values():
        hb.start()
    try:
        deadline = time.monotonic() + 5
        while not all(hb.rtt for hb in hbs.values()) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        for hb in hbs.values():
            hb.stop()
    assert set(hbs["main"].rtt) == {"dc"} and set(hbs["dc"].rtt) == {"main"}
    assert all(0 <= hb.rtt[p] < 0.5 for hb in hbs.values() for p in hb.rtt)


def test_handover_names_the_successor() -> None:
    # A standby promotes at once when the primary of the newest epoch hands over to it;
    # a handover to another node, or from an older epoch, changes nothing.
    v = view("dc", epoch=2, primary="main")
    hear(v, "main", 5.0, State.STANDBY, {"dr": 0.1}, epoch=2, handover_to="dc")
    assert decide(State.STANDBY, v, 5.1, T) is Event.HANDOVER
    w = view("dr", epoch=2, primary="main")
    hear(w, "main", 5.0, State.STANDBY, {"dc": 0.1}, epoch=2, handover_to="dc")
    assert decide(State.WITNESS, w, 5.1, T) is None
    old = view("dc", epoch=3, primary="main")
    hear(old, "main", 5.0, State.STANDBY, {}, epoch=2, handover_to="dc")
    assert decide(State.STANDBY, old, 5.1, T) is None


@pytest.mark.parametrize(("data", "msg"), [
    (b"GET / HTTP/1.1", "not a heartbeat"),
    (encode_beat(b"x" * 32, "dc", State.STANDBY, 0, {}, 1), "heartbeat authentication failed"),
    (b"NGHB" + b"\0" * 16 + b"\x93\x01\x02", "heartbeat authentication failed"),
])
def test_bad_beats_are_refused(data: bytes, msg: str) -> None:
    with pytest.raises(BadBeat) as ei:
        decode_beat(SECRET, data)
    assert str(ei.value) == msg
