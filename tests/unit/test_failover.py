"""The failover transition table and the heartbeat envelope and guard (no daemons)."""

from __future__ import annotations

import math

import msgpack
import pytest

from gateway.failover import TRANSITIONS, Action, Event, IllegalTransition, State, step
from gateway.heartbeat import (
    MAGIC,
    BadBeat,
    BeatGuard,
    BeatKeys,
    body_from_wire,
    body_to_wire,
    derive_key,
    seal,
    unseal,
)
from gateway.nodecore import BeatBody, Echo

KEY = derive_key(b"s" * 32)
BOOT = bytes(range(16))


def body(**kw: object) -> BeatBody:
    base: dict[str, object] = {"state": "primary", "epoch": 3, "primary": "main",
                               "vote_epoch": 3, "vote_for": "main", "serving": True,
                               "consistent": True}
    base.update(kw)
    return BeatBody(**base)  # type: ignore[arg-type]


# -- the table ---------------------------------------------------------------------------


def test_every_state_is_in_the_table() -> None:
    assert set(TRANSITIONS) == set(State)


@pytest.mark.parametrize(("state", "event", "new", "actions"), [
    (State.STARTING, Event.QUORUM_OK, State.PRIMARY, (Action.SERVE,)),
    (State.PRIMARY, Event.QUORUM_LOST, State.FENCED, (Action.FENCE,)),
    (State.FENCED, Event.QUORUM_OK, State.PRIMARY, (Action.SERVE,)),
    (State.FENCED, Event.ELECTED, State.RECLAIMING, (Action.RECLAIM,)),
    (State.PRIMARY, Event.NEWER_PRIMARY, State.STALE, (Action.FENCE, Action.REJOIN)),
    (State.PRIMARY, Event.HANDED_OVER, State.STALE, (Action.FENCE, Action.REJOIN)),
    (State.STANDBY, Event.ELECTED, State.PROMOTING, (Action.PROMOTE,)),
    (State.STANDBY, Event.NEWER_PRIMARY, State.STANDBY, (Action.FOLLOW,)),
    (State.WITNESS, Event.OPERATOR_PROMOTE, State.PROMOTING, (Action.PROMOTE,)),
    (State.PROMOTING, Event.PROMOTION_FAILED, State.STANDBY, (Action.RECEIVE,)),
    (State.STALE, Event.REJOINED, State.STANDBY, (Action.RECEIVE,)),
    (State.STALE, Event.KEPT, State.RECLAIMING, (Action.RECLAIM,)),
])
def test_transitions(state: State, event: Event, new: State,
                     actions: tuple[Action, ...]) -> None:
    assert step(state, event) == (new, actions)


@pytest.mark.parametrize(("state", "event"), [
    (State.WITNESS, Event.QUORUM_LOST), (State.STANDBY, Event.HANDED_OVER),
    (State.PRIMARY, Event.ELECTED), (State.STALE, Event.OPERATOR_PROMOTE),
])
def test_illegal_moves_name_state_and_event(state: State, event: Event) -> None:
    with pytest.raises(IllegalTransition, match=f"event {event.value} is not allowed in "
                                                f"state {state.value}"):
        step(state, event)


def test_fencing_kills_nbdkit_before_anything_else() -> None:
    """Every transition that fences does it first: clients' connections are reset while
    the service address is still here (the daemon drops the address inside FENCE, after
    nbdkit and the iSCSI sessions)."""
    for events in TRANSITIONS.values():
        for _new, actions in events.values():
            if Action.FENCE in actions:
                assert actions[0] is Action.FENCE


# -- the envelope --------------------------------------------------------------------------


def test_beat_round_trip_keeps_every_field() -> None:
    b = body(campaign=4, data_epoch=3, served_epoch=3, outdated=("dc",), handover_to="dc",
             echo={"dc": Echo(BOOT, 17, 0.25, True)}, sees={"dc": 0.4, "dr": math.inf},
             sync=("dc",))
    s = unseal(KEY, seal(KEY, "main", BOOT, 42, b))
    assert (s.node, s.boot, s.counter) == ("main", BOOT, 42)
    assert s.body == b


def test_a_beat_sealed_with_another_secret_is_refused() -> None:
    """The empty-key MAC of the old format let anyone forge beats; now a key is required
    and a beat of any other key fails its MAC."""
    data = seal(derive_key(b"other secret of 32 bytes........"), "main", BOOT, 1, body())
    with pytest.raises(BadBeat, match="authentication failed") as e:
        unseal(KEY, data)
    assert e.value.reason == "mac"


# Rotating the peer secret (SECURITY.md): the current secret, the next one, a stranger's.
OLD, NEW, STRANGER = b"s" * 32, b"the next secret, at least 16 bytes", b"an impostor's key!"


def test_a_beat_under_the_next_secret_is_accepted_only_while_it_is_configured() -> None:
    data = BeatKeys.derive(NEW).seal("main", BOOT, 1, body())
    for keys in (BeatKeys.derive(OLD, NEW), BeatKeys.derive(NEW), BeatKeys.derive(NEW, OLD)):
        assert keys.unseal(data).counter == 1
    assert unseal(KEY, data, next_key=derive_key(NEW)).node == "main"
    with pytest.raises(BadBeat, match="authentication failed") as e:
        BeatKeys.derive(OLD).unseal(data)  # next_secret_file removed (or never set)
    assert e.value.reason == "mac"


def test_an_unrelated_secret_is_refused_during_a_rotation() -> None:
    data = seal(derive_key(STRANGER), "main", BOOT, 1, body())
    for keys in (BeatKeys.derive(OLD, NEW), BeatKeys.derive(NEW, OLD)):
        with pytest.raises(BadBeat, match="authentication failed") as e:
            keys.unseal(data)
        assert e.value.reason == "mac"


def test_beats_are_sealed_with_the_current_secret_not_the_next() -> None:
    data = BeatKeys.derive(OLD, NEW).seal("main", BOOT, 7, body())
    assert unseal(derive_key(OLD), data).counter == 7
    with pytest.raises(BadBeat, match="authentication failed"):
        unseal(derive_key(NEW), data)


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "size"), (b"x" * 5000, "size"), (b"HTTP/1.1 200 OK" + b"\0" * 40, "magic"),
])
def test_garbage_is_refused_by_reason(data: bytes, reason: str) -> None:
    with pytest.raises(BadBeat) as e:
        unseal(KEY, data)
    assert e.value.reason == reason


def test_a_tampered_body_fails_the_mac() -> None:
    data = bytearray(seal(KEY, "main", BOOT, 1, body()))
    data[len(MAGIC) + 5] ^= 1
    with pytest.raises(BadBeat, match="authentication failed"):
        unseal(KEY, bytes(data))


@pytest.mark.parametrize(("wire", "msg"), [
    ({}, "missing field"),
    ({**body_to_wire(body()), "e": -1}, "epoch: expected an unsigned integer"),
    ({**body_to_wire(body()), "o": ["x"] * 100}, "outdated: expected a list of at most"),
    ({**body_to_wire(body()), "ec": {"dc": [b"short", 1, 0.1, True]}}, "echo: expected"),
    ({**body_to_wire(body()), "sv": 1}, "serving: expected true or false"),
])
def test_malformed_bodies_are_clear_errors(wire: dict[str, object], msg: str) -> None:
    with pytest.raises(BadBeat, match=msg):
        body_from_wire(wire)


def test_a_well_sealed_but_malformed_payload_is_malformed_not_a_crash() -> None:
    import hashlib
    import hmac

    head = MAGIC + msgpack.packb([2, "main", BOOT, 1, {"st": 5}])
    data = head + hmac.new(KEY, head, hashlib.sha256).digest()[:16]
    with pytest.raises(BadBeat) as e:
        unseal(KEY, data)
    assert e.value.reason == "malformed"


# -- the guard -----------------------------------------------------------------------------


def guard() -> BeatGuard:
    return BeatGuard({"main": frozenset({"192.0.2.1", "203.0.113.1"}),
                      "dr": frozenset({"192.0.2.3"})})


def sealed(node: str = "main", counter: int = 1, boot: bytes = BOOT) -> object:
    return unseal(KEY, seal(KEY, node, boot, counter, body()))


def test_replayed_beats_are_refused_from_any_address() -> None:
    g = guard()
    first = sealed(counter=5)
    g.admit(first, "192.0.2.1")  # type: ignore[arg-type]
    for src in ("192.0.2.1", "203.0.113.1"):
        with pytest.raises(BadBeat, match="repeats counter 5") as e:
            g.admit(first, src)  # type: ignore[arg-type]
        assert e.value.reason == "replay"
    with pytest.raises(BadBeat, match="repeats counter 4"):
        g.admit(sealed(counter=4), "192.0.2.1")  # type: ignore[arg-type]
    g.admit(sealed(counter=6), "203.0.113.1")  # type: ignore[arg-type]  # second path


def test_a_restarted_peer_starts_a_new_counter_and_old_boots_stay_closed() -> None:
    g = guard()
    g.admit(sealed(counter=900), "192.0.2.1")  # type: ignore[arg-type]
    new = bytes(16)
    g.admit(sealed(counter=1, boot=new), "192.0.2.1")  # type: ignore[arg-type]
    with pytest.raises(BadBeat, match="replay"):
        g.admit(sealed(counter=900), "192.0.2.1")  # type: ignore[arg-type]


def test_beats_from_strangers_and_wrong_addresses_are_refused() -> None:
    g = guard()
    with pytest.raises(BadBeat, match="not a configured peer") as e:
        g.admit(sealed(node="mallory"), "192.0.2.1")  # type: ignore[arg-type]
    assert e.value.reason == "unknown_peer"
    with pytest.raises(BadBeat, match=r"from 192\.0\.2\.66, not one of its addresses") as e:
        g.admit(sealed(), "192.0.2.66")  # type: ignore[arg-type]
    assert e.value.reason == "address"
    g.admit(sealed(counter=2), "::ffff:192.0.2.1")  # type: ignore[arg-type]  # v4-mapped
