"""The failover state machine (contract 6): pure, table-driven, no sockets or processes.

Theory of operation.  Three sites exchange heartbeats (gateway/heartbeat.py); each beat
carries the sender's failover state, its epoch (how many promotions its line of primaries
has seen) and how long ago it last heard each other site.  Decisions need a majority of
the three sites:

- A PRIMARY that has heard neither other site for ``timeout`` has lost the majority: it
  FENCES itself (service address dropped, nbdkit killed, senders stopped) at once.
- A STANDBY (the secondary) promotes only when the primary has been silent for
  ``timeout + fence_margin`` (so an isolated primary has fenced itself first) *and* a
  witness that is alive (the DR site) reports that it has not heard the primary for at
  least ``timeout`` either: {secondary, DR} is the majority that confirms.  A cut between
  primary and secondary alone, while DR still hears the primary, changes nothing.
- A FENCED primary serves again only after it has heard a majority continuously for
  ``timeout`` (hysteresis: a flapping link does not flip it back and forth) and nobody
  was promoted meanwhile.
- Every beat carries the highest primary epoch its sender knows of.  A node that is, was
  or wants to be primary and learns of an epoch above its own becomes STALE: it never
  serves again on its own (rejoin is an operator step).  A booting primary (STARTING)
  decides only after hearing every site or a timeout, so it learns this first.
- A WITNESS (DR) never promotes itself; promoting DR is an operator decision
  (OPERATOR_PROMOTE, `nbdgw promote`), which the daemon refuses while a main-site node
  is heard, unless forced.
- An Inconsistent replica never promotes (the daemon reports PROMOTION_FAILED).
- Rejoin (contract 5): a STALE node demotes its volumes to replicas of the newer primary
  (REJOIN) and receives again (REJOINED: STANDBY, or WITNESS on the DR site).  Writes it
  took that never reached the new primary are kept as a ``diverged-<generation>``
  snapshot first.  A node that learns of the newer primary while it was itself serving
  (PRIMARY) and holds writes the new primary lacks is in split brain: the daemon does
  not rejoin it; `nbdgw resolve` decides: ``--discard`` itself (it rejoins, its writes kept
  as a snapshot), or ``--discard`` the other primary (KEPT: it starts a newer generation on
  a higher epoch and serves, naming the other in its beats; that one demotes itself, its
  writes kept as a snapshot, and rejoins; replicas follow the higher epoch).
- Planned switchover: the primary drains (client I/O held, the target's ack at the
  journal's end), stops serving (HANDED_OVER: it becomes STALE and rejoins at once) and
  names the target in its beats; the target promotes on that word (HANDOVER) without
  waiting for any timeout.

``decide()`` turns the heartbeat view into at most one event; ``step()`` looks the event up
in ``TRANSITIONS[state][event]`` and returns the new state and the actions for the daemon.
An event a state does not list is an error naming both (h11's ``_state.py`` style).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class State(enum.Enum):
    STARTING = "starting"  # a primary that just booted: waiting to hear the majority
    PRIMARY = "primary"  # serving
    FENCED = "fenced"  # a primary without the majority: not serving
    STANDBY = "standby"  # the secondary: receiving, watching the primary
    PROMOTING = "promoting"
    WITNESS = "witness"  # DR: receiving, votes, never promotes itself
    STALE = "stale"  # a former primary; another node serves on a newer epoch


class Event(enum.Enum):
    QUORUM_OK = "quorum_ok"  # a majority heard (continuously, when it had been lost)
    QUORUM_LOST = "quorum_lost"  # neither other site heard for the timeout
    PRIMARY_GONE = "primary_gone"  # primary silent and the witness confirms
    NEWER_PRIMARY = "newer_primary"  # a primary with a higher epoch is alive
    PROMOTED = "promoted"
    PROMOTION_FAILED = "promotion_failed"
    OPERATOR_PROMOTE = "operator_promote"  # `nbdgw promote` (checked by the daemon first)
    HANDOVER = "handover"  # the primary drained and named this node its successor
    HANDED_OVER = "handed_over"  # this primary drained and handed over (switchover)
    REJOINED = "rejoined"  # a stale node's volumes are replicas of the new primary now
    REJOINED_AS_WITNESS = "rejoined_as_witness"  # the same, on the DR site
    KEPT = "kept"  # `resolve --discard OTHER` on a split-brained node: it serves again


class Action(enum.Enum):
    SERVE = "serve"  # start nbdkit, take the service address, start the senders
    FENCE = "fence"  # drop the service address, kill nbdkit, stop the senders
    PROMOTE = "promote"  # stop receiving, promote the replicas (new generation)
    RECEIVE = "receive"  # run the receivers (back to standby after a failed promotion)
    REJOIN = "rejoin"  # demote the volumes to replicas of the newer primary


class IllegalTransition(Exception):
    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"failover: event {event.value} is not allowed in state "
                         f"{state.value}")
        self.state = state
        self.event = event


S, E, A = State, Event, Action
# TRANSITIONS[state][event] = (next state, actions, in order)
TRANSITIONS: dict[State, dict[Event, tuple[State, tuple[Action, ...]]]] = {
    S.STARTING: {
        E.QUORUM_OK: (S.PRIMARY, (A.SERVE,)),
        E.QUORUM_LOST: (S.FENCED, ()),
        E.NEWER_PRIMARY: (S.STALE, (A.REJOIN,)),
    },
    S.PRIMARY: {
        E.QUORUM_OK: (S.PRIMARY, ()),
        E.QUORUM_LOST: (S.FENCED, (A.FENCE,)),
        E.NEWER_PRIMARY: (S.STALE, (A.FENCE, A.REJOIN)),
        E.HANDED_OVER: (S.STALE, (A.FENCE, A.REJOIN)),
    },
    S.FENCED: {
        E.QUORUM_OK: (S.PRIMARY, (A.SERVE,)),
        E.QUORUM_LOST: (S.FENCED, ()),
        E.NEWER_PRIMARY: (S.STALE, (A.REJOIN,)),
    },
    S.STANDBY: {
        E.PRIMARY_GONE: (S.PROMOTING, (A.PROMOTE,)),
        E.OPERATOR_PROMOTE: (S.PROMOTING, (A.PROMOTE,)),
        E.HANDOVER: (S.PROMOTING, (A.PROMOTE,)),
        E.NEWER_PRIMARY: (S.STANDBY, ()),
    },
    S.PROMOTING: {
        E.PROMOTED: (S.PRIMARY, (A.SERVE,)),
        E.PROMOTION_FAILED: (S.STANDBY, (A.RECEIVE,)),
    },
    S.WITNESS: {
        E.OPERATOR_PROMOTE: (S.PROMOTING, (A.PROMOTE,)),
        E.HANDOVER: (S.PROMOTING, (A.PROMOTE,)),
        E.NEWER_PRIMARY: (S.WITNESS, ()),
    },
    S.STALE: {
        E.NEWER_PRIMARY: (S.STALE, ()),
        E.REJOINED: (S.STANDBY, (A.RECEIVE,)),
        E.REJOINED_AS_WITNESS: (S.WITNESS, (A.RECEIVE,)),
        E.KEPT: (S.PRIMARY, (A.SERVE,)),
    },
}


def step(state: State, event: Event) -> tuple[State, tuple[Action, ...]]:
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise IllegalTransition(state, event) from None


@dataclass(frozen=True)
class Report:
    """What a peer said in its latest heartbeat."""

    state: State
    epoch: int
    sees: Mapping[str, float]  # peer -> seconds since that peer was last heard (inf: never)
    received: float  # when this report arrived (our clock)
    known_epoch: int = 0  # the highest primary epoch the peer knows of
    handover_to: str | None = None  # a primary that drained for a switchover: its successor
    discarding: str | None = None  # a primary that kept its writes over this site's (resolve)


@dataclass
class View:
    """This node's picture of the cluster, kept by the heartbeat thread and the daemon."""

    me: str
    epoch: int
    primary: str | None  # the site this node believes is primary (config, then beats)
    witnesses: tuple[str, ...]  # sites that may confirm a primary's death (DR)
    peers: tuple[str, ...]
    started: float
    heard: dict[str, float] = field(default_factory=dict)  # peer -> last beat (our clock)
    reports: dict[str, Report] = field(default_factory=dict)
    quorum_since: float | None = None  # since when a majority is heard continuously
    known_epoch: int = 0  # the highest primary epoch heard of (own included)
    promote_blocked_until: float = 0.0  # after a failed promotion
    # An operator promoted this site (DR, main site lost): it serves without a majority
    # (there is none to be had) until it hears of a newer epoch.
    quorum_exempt: bool = False
    handover_to: str | None = None  # set by this node's daemon after a switchover drain
    discarding: str | None = None  # set after `resolve --discard OTHER`: OTHER rejoins


@dataclass(frozen=True)
class Timers:
    timeout: float = 2.0
    fence_margin: float = 1.0


def alive(view: View, now: float, t: Timers) -> set[str]:
    return {p for p, at in view.heard.items() if now - at < t.timeout}


def decide(state: State, view: View, now: float, t: Timers) -> Event | None:
    """The event the heartbeat view calls for now, if any (pure but for the view's
    ``quorum_since``, which it keeps)."""
    up = alive(view, now, t)
    has_majority = (len(up) + 1 > (len(view.peers) + 1) // 2 if view.peers else True) \
        or view.quorum_exempt
    if has_majority:
        view.quorum_since = view.quorum_since if view.quorum_since is not None else now
    else:
        view.quorum_since = None
    for p in up:
        rep = view.reports.get(p)
        if rep is not None:
            view.known_epoch = max(view.known_epoch, rep.known_epoch,
                                   rep.epoch if rep.state is State.PRIMARY else 0)
    if view.known_epoch > view.epoch and state in (
            State.STARTING, State.PRIMARY, State.FENCED, State.STALE):
        return Event.NEWER_PRIMARY
    rule = _RULES.get(state)
    return rule(view, now, t, up, has_majority) if rule is not None else None


def _starting(view: View, now: float, t: Timers, up: set[str], majority: bool) -> Event | None:
    # Hear every site, or wait a timeout: a peer may know of a newer primary.
    heard_all = len(up) == len(view.peers)
    if majority and (heard_all or now - view.started >= t.timeout) \
            and not _other_primary(view, up):
        return Event.QUORUM_OK
    if not majority and now - view.started >= t.timeout:
        return Event.QUORUM_LOST
    return None


def _primary(view: View, now: float, t: Timers, up: set[str], majority: bool) -> Event | None:
    return None if majority else Event.QUORUM_LOST


def _fenced(view: View, now: float, t: Timers, up: set[str], majority: bool) -> Event | None:
    steady = view.quorum_since is not None and now - view.quorum_since >= t.timeout
    return Event.QUORUM_OK if steady and not _other_primary(view, up) else None


def _standby(view: View, now: float, t: Timers, up: set[str], majority: bool) -> Event | None:
    if handed_to_me(view, up):
        return Event.HANDOVER
    return Event.PRIMARY_GONE if primary_gone(view, now, t) else None


def _witness(view: View, now: float, t: Timers, up: set[str], majority: bool) -> Event | None:
    return Event.HANDOVER if handed_to_me(view, up) else None


_RULES = {State.STARTING: _starting, State.PRIMARY: _primary, State.FENCED: _fenced,
          State.STANDBY: _standby, State.WITNESS: _witness}


def handed_to_me(view: View, up: set[str]) -> bool:
    """An alive site that was primary on the newest epoch this node knows has drained
    and named this node its successor."""
    for p in up:
        rep = view.reports.get(p)
        if rep is not None and rep.handover_to == view.me and rep.epoch >= view.known_epoch:
            return True
    return False


def _other_primary(view: View, up: set[str]) -> bool:
    return any(view.reports.get(p) is not None and view.reports[p].state is State.PRIMARY
               for p in up)


def primary_gone(view: View, now: float, t: Timers) -> bool:
    """Positive confirmation that the primary is gone: silent to this node for
    timeout + fence_margin, and an alive witness has not heard it for timeout either."""
    p = view.primary
    if p is None or now < view.promote_blocked_until:
        return False
    last = view.heard.get(p, view.started)
    if now - last < t.timeout + t.fence_margin:
        return False
    for w in view.witnesses:
        rep = view.reports.get(w)
        if w == p or rep is None or now - rep.received >= t.timeout:
            continue  # a witness we cannot hear cannot vote
        witness_silence = rep.sees.get(p, float("inf")) + (now - rep.received)
        if witness_silence >= t.timeout:
            return True
    return False
