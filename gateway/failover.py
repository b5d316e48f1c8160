"""The failover transition table (DESIGN.md §6): states, events, actions.  Pure data.

This table is the single source of truth for how a node's failover state moves;
``gateway/nodecore.py`` decides *which* event the heartbeats, requests and local facts
call for (votes, leases, epochs: see its theory of operation) and looks the move up
here.  An event a state does not list is an error naming both (h11's ``_state.py``).

States:

- STARTING: a node whose runtime role is primary, just booted: it learns where the
  cluster stands before it serves (a peer may know of a newer primary).
- PRIMARY: holds a write lease granted by a majority and serves.
- FENCED: a primary without a lease: not serving (nbdkit killed, address released).
- STANDBY: the secondary: receives, votes, may campaign for a new epoch.
- WITNESS: the DR site: receives, votes, never campaigns on its own; and a witness
  node (role witness: no data), which stays here for good.
- PROMOTING: elected (or promoted by an operator): replicas become primary volumes.
- RECLAIMING: a former primary whose supporters moved to a newer epoch that never got
  a primary, elected again: its volumes start a new generation on the new epoch.
- STALE: a former primary that learned of a newer primary; it rejoins as a replica
  (or stays here, in split brain, until `nbdgw resolve`).
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    STARTING = "starting"
    PRIMARY = "primary"
    FENCED = "fenced"
    STANDBY = "standby"
    WITNESS = "witness"
    PROMOTING = "promoting"
    RECLAIMING = "reclaiming"
    STALE = "stale"


class Event(enum.Enum):
    QUORUM_OK = "quorum_ok"  # a lease from a majority (steady, when it had been lost)
    QUORUM_LOST = "quorum_lost"  # the lease ran out (or never came, at boot)
    NEWER_PRIMARY = "newer_primary"  # a primary on a higher epoch is known
    ELECTED = "elected"  # a majority voted for this node on a new epoch
    PROMOTED = "promoted"
    PROMOTION_FAILED = "promotion_failed"
    PROMOTION_FAILED_DR = "promotion_failed_dr"  # the same, on the DR site
    RECLAIMED = "reclaimed"
    RECLAIM_FAILED = "reclaim_failed"
    OPERATOR_PROMOTE = "operator_promote"  # `nbdgw promote` (checked by the core first)
    HANDED_OVER = "handed_over"  # this primary drained and voted for its successor
    REJOINED = "rejoined"  # a stale node's volumes are replicas of the new primary now
    REJOINED_AS_WITNESS = "rejoined_as_witness"  # the same, on the DR site
    KEPT = "kept"  # `resolve --discard OTHER` on a split-brained node: it serves again


class Action(enum.Enum):
    SERVE = "serve"  # lease first, nbdkit, iSCSI, service address, senders
    FENCE = "fence"  # nbdkit and iSCSI sessions first, then the address, senders
    PROMOTE = "promote"  # stop receiving; promote replicas to the new generation
    RECLAIM = "reclaim"  # primary volumes start a new generation on the new epoch
    RECEIVE = "receive"  # run the receivers (of the primary this node follows)
    FOLLOW = "follow"  # re-plan replication towards a new primary
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
        E.ELECTED: (S.RECLAIMING, (A.RECLAIM,)),
    },
    S.PRIMARY: {
        E.QUORUM_LOST: (S.FENCED, (A.FENCE,)),
        E.NEWER_PRIMARY: (S.STALE, (A.FENCE, A.REJOIN)),
        E.HANDED_OVER: (S.STALE, (A.FENCE, A.REJOIN)),
    },
    S.FENCED: {
        E.QUORUM_OK: (S.PRIMARY, (A.SERVE,)),
        E.NEWER_PRIMARY: (S.STALE, (A.REJOIN,)),
        E.ELECTED: (S.RECLAIMING, (A.RECLAIM,)),
    },
    S.RECLAIMING: {
        E.RECLAIMED: (S.PRIMARY, (A.SERVE,)),
        E.RECLAIM_FAILED: (S.FENCED, ()),
    },
    S.STANDBY: {
        E.ELECTED: (S.PROMOTING, (A.PROMOTE,)),
        E.OPERATOR_PROMOTE: (S.PROMOTING, (A.PROMOTE,)),
        E.NEWER_PRIMARY: (S.STANDBY, (A.FOLLOW,)),
    },
    S.WITNESS: {
        E.ELECTED: (S.PROMOTING, (A.PROMOTE,)),  # only as a switchover's target
        E.OPERATOR_PROMOTE: (S.PROMOTING, (A.PROMOTE,)),
        E.NEWER_PRIMARY: (S.WITNESS, (A.FOLLOW,)),
    },
    S.PROMOTING: {
        E.PROMOTED: (S.PRIMARY, (A.SERVE,)),
        E.PROMOTION_FAILED: (S.STANDBY, (A.RECEIVE,)),
        E.PROMOTION_FAILED_DR: (S.WITNESS, (A.RECEIVE,)),
    },
    S.STALE: {
        E.REJOINED: (S.STANDBY, (A.RECEIVE,)),
        E.REJOINED_AS_WITNESS: (S.WITNESS, (A.RECEIVE,)),
        E.KEPT: (S.RECLAIMING, (A.RECLAIM,)),
        E.NEWER_PRIMARY: (S.STALE, (A.REJOIN,)),
    },
}


def step(state: State, event: Event) -> tuple[State, tuple[Action, ...]]:
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise IllegalTransition(state, event) from None
