"""Model checking of the node core (gateway/nodecore.py) with three simulated sites.

Every schedule runs in both topologies: main, dc and a DR site ``dr`` (a replica), and
main, dc and a witness ``wit`` (no data: never shipped to, never a candidate, target or
primary; requests to make it one are refused).  A pair with a witness must fail over as
the three data sites do.

tests/unit/nodecore_sim.py wires three cores through a network that drops, delays,
duplicates, reorders and replays real sealed beats, with crashes, freezes, partitions,
switchovers and clock drift, and checks at every step: never two valid write leases; an
isolated primary stops within the timeout; every elected primary holds each write that
was acknowledged under sync protection and a prefix of the last primary's history; and,
once everything heals, exactly one primary with the others following it.

Volume groups (issue 22) run one core per group on each of their sites: GroupsSim puts
two groups on three hosts (g1 primary on A, g2 primary on B, each the other's secondary,
W the witness of both with one witness core per group), where a host's power cut, freeze
or partition hits every core on it at once; the same invariants hold within each group.

The bounded run here takes well under a minute; ``-m slow`` runs thousands of seeds.
A failing seed is reproduced with ``random_run(seed, trace=True)``.
"""

from __future__ import annotations

import math

import pytest

from gateway import nodecore
from gateway.nodecore import BeatIn, NodeCore
from tests.unit.nodecore_sim import (
    THIRD,
    GroupsSim,
    Sim,
    Violation,
    random_groups_run,
    random_run,
)

TOPOLOGIES = ("dr", "witness")
topologies = pytest.mark.parametrize("topology", TOPOLOGIES)

# -- scripted schedules ---------------------------------------------------------------------


def formed(seed: int = 1, **kw: object) -> Sim:
    sim = Sim(seed, **kw)  # type: ignore[arg-type]
    sim.advance(4.0)
    assert sim.converged() is None, sim.states()
    assert sim.nodes["main"].core is not None
    assert sim.nodes["main"].core.state.value == "primary"
    return sim


def primary(sim: Sim) -> str | None:
    prim = [n for n, node in sim.nodes.items() if node.core is not None
            and node.core.state.value == "primary"
            and node.lease_until_local > node.local(sim.t)]
    return prim[0] if len(prim) == 1 else None


def until(sim: Sim, cond: object, limit: float) -> float:
    start = sim.t
    while sim.t - start < limit:
        sim.advance(sim.t + 0.05)
        if cond():  # type: ignore[operator]
            return sim.t - start
    raise AssertionError(f"not within {limit} s: {sim.states()}")


@topologies
def test_power_cut_of_the_primary_elects_the_secondary_within_bounds(topology: str) -> None:
    sim = formed(topology=topology)
    sim.crash("main")
    took = until(sim, lambda: primary(sim) == "dc", 8.0)
    # timeout + fence_margin, a vote round trip, the promotion (up to 1.5 s in the sim)
    assert took <= 2.0 + 1.0 + 1.0 + 1.5


@topologies
def test_promotion_right_after_start_needs_no_fixed_wait(topology: str) -> None:
    """The old daemon waited 30 s after a failed promotion of a still-Inconsistent replica;
    a replica that becomes Consistent is promotable at once."""
    sim = Sim(2, topology=topology)
    sim.nodes["dc"].consistent = False
    sim.advance(1.0)
    sim.nodes["dc"].consistent = True
    sim.crash("main")
    took = until(sim, lambda: primary(sim) == "dc", 10.0)
    assert took < 8.0


@topologies
def test_an_isolated_primary_stops_within_the_timeout_and_the_other_takes_over(
        topology: str) -> None:
    sim = formed(topology=topology)
    sim.isolate("main")
    t0 = sim.t
    until(sim, lambda: sim.nodes["main"].lease_until_local <= sim.nodes["main"].local(sim.t),
          3.0)
    assert sim.t - t0 <= 2.0
    until(sim, lambda: primary(sim) == "dc", 8.0)
    sim.heal()
    until(sim, lambda: sim.converged() is None, 15.0)
    assert sim.nodes["main"].hard.primary == "dc"


@topologies
def test_replayed_beats_after_a_power_cut_delay_nothing(topology: str) -> None:
    """Beats of the dead primary played again from its own address (the attack that kept
    the old secondary from promoting) are refused; promotion takes as long as without."""
    plain = formed(seed=3, topology=topology)
    plain.crash("main")
    base = until(plain, lambda: primary(plain) == "dc", 10.0)
    sim = formed(seed=3, topology=topology)
    captured = [m for m in sim.recorded if m.src == "main"]
    sim.crash("main")
    for m in captured[-40:]:  # replayed over the next seconds, to both peers
        for dst in ("dc", THIRD[topology]):
            m2 = type(m)(sim.t + 0.1 * captured.index(m) % 4, m.src, dst, m.data, m.src_addr)
            sim.inflight.append(m2)
    took = until(sim, lambda: primary(sim) == "dc", 10.0)
    assert took <= base + 0.5


@topologies
def test_sync_stall_outdates_the_peer_which_then_cannot_be_elected(topology: str) -> None:
    sim = formed(seed=4, topology=topology)
    sim.set_link("main", "dc", False)
    sim.set_link("dc", "main", False)
    until(sim, lambda: "dc" in sim.nodes["main"].degraded, 5.0)
    # the third site (DR or witness) recorded it first
    assert "dc" in sim.nodes[THIRD[topology]].hard.outdated
    written = sim.next_write
    until(sim, lambda: any(w >= written for w in sim.acked), 2.0)  # writes go on
    sim.crash("main")
    sim.advance(sim.t + 10.0)
    assert primary(sim) is None  # dc lacks acknowledged writes: no automatic failover
    dc = sim.nodes["dc"].core
    assert dc is not None and dc.state.value == "standby"
    sim.heal()
    until(sim, lambda: sim.converged() is None, 15.0)
    assert primary(sim) == "main"


@topologies
def test_switchover_then_power_cut_of_the_new_primary_then_of_the_old(topology: str) -> None:
    """The issue's fork schedule: switchover main->dc, dc power-cut at once, then main
    power-cut; every step safe, and the three sites converge on one history."""
    sim = formed(seed=5, topology=topology)
    sim.request("main", "switchover", to="dc", timeout=5)
    until(sim, lambda: sim.nodes["dc"].core is not None
          and sim.nodes["dc"].core.state.value in ("promoting", "primary"), 5.0)
    sim.crash("dc")
    sim.advance(sim.t + 8.0)
    sim.crash("main")
    sim.advance(sim.t + 5.0)
    sim.heal()
    until(sim, lambda: sim.converged() is None, 30.0)
    p = sim.nodes[primary(sim) or "main"]
    for n in ("main", "dc"):
        assert sim.nodes[n].data == p.data


@topologies
def test_switchover_whose_target_dies_returns_to_the_old_primary(topology: str) -> None:
    sim = formed(seed=6, topology=topology)
    sim.request("main", "switchover", to="dc", timeout=5)
    until(sim, lambda: sim.nodes["main"].core is not None
          and sim.nodes["main"].core.state.value in ("stale", "standby"), 5.0)
    sim.crash("dc")
    until(sim, lambda: primary(sim) == "main", 15.0)


@topologies
def test_a_switchover_whose_primary_is_cut_off_in_its_drain_fails_at_once(
        topology: str) -> None:
    """Lab schedules (tests/integration/test_lab_schedules.py): the primary, isolated
    during a switchover's drain, fenced itself and another site took over, but the drain
    waited out its whole timeout and then answered "nothing changed, client I/O resumed".
    The core that loses the primary role mid-drain answers at once, and truly, and tells
    the daemon to stop the drain (which would hold the worker, and the rejoin, 30 s)."""
    sim = formed(seed=8, topology=topology)
    main = sim.nodes["main"]
    sim.request("main", "switchover", to="dc", timeout=30)
    sim.isolate("main")
    took = until(sim, lambda: bool(main.replies), 5.0)
    assert took <= 2.0 + 0.5, took  # when its lease ran out: it fenced
    err = main.replies[-1]["error"]
    assert err.startswith("switchover to dc failed: node main lost its primary role during "
                          "the drain (this primary lost the majority of the sites"), err
    assert "it is fenced now: client I/O is not resumed here" in err, err
    assert "nothing changed" not in err, err
    assert main.replies[-1]["lost_primary"] is True
    sim.advance(sim.t + 0.1)
    assert main.busy is None or main.busy[0] != "drain", main.busy  # the drain stopped
    sim.heal()
    until(sim, lambda: sim.converged() is None, 30.0)
    assert len(main.replies) == 1  # one answer to one request


def test_operator_promotion_of_dr_is_refused_while_the_main_site_is_heard() -> None:
    sim = formed(seed=7)
    sim.request("dr", "promote")
    assert "the main site is alive" in sim.nodes["dr"].replies[-1]["error"]
    sim.crash("main")
    sim.crash("dc")
    sim.advance(sim.t + 3.0)
    sim.request("dr", "promote")
    until(sim, lambda: primary(sim) == "dr", 5.0)
    assert sim.nodes["dr"].replies[-1]["ok"]


# -- the witness ---------------------------------------------------------------------------


def test_the_witness_is_never_promoted_nor_a_switchover_target() -> None:
    sim = formed(seed=7, topology="witness")
    sim.request("wit", "promote", force=True)
    assert sim.nodes["wit"].replies[-1]["error"] == (
        "node wit is a witness: it holds no data, so it can never be promoted; promote a "
        "data site")
    sim.request("main", "switchover", to="wit", timeout=5)
    assert sim.nodes["main"].replies[-1]["error"] == (
        "wit is a witness: it holds no data and can never take over; switch over to a "
        "data site")
    sim.crash("main")
    sim.crash("dc")  # both data sites gone: the witness has nothing to offer
    sim.advance(sim.t + 3.0)
    sim.request("wit", "promote", force=True)
    assert "is a witness" in sim.nodes["wit"].replies[-1]["error"]
    sim.advance(sim.t + 10.0)
    assert primary(sim) is None


def test_witness_down_changes_nothing() -> None:
    """The pair still has a majority (main and dc): main keeps its lease throughout."""
    sim = formed(seed=9, topology="witness")
    sim.crash("wit")
    t0 = sim.t
    while sim.t - t0 < 10.0:
        sim.advance(sim.t + 0.05)
        assert primary(sim) == "main"
    sim.restart("wit")
    until(sim, lambda: sim.converged() is None, 10.0)


def test_pair_cut_from_each_other_elects_exactly_one_primary() -> None:
    """main and dc both hear the witness but not each other: the witness backs main
    (it hears it), so main keeps serving and dc is never elected."""
    sim = formed(seed=10, topology="witness")
    sim.set_link("main", "dc", False)
    sim.set_link("dc", "main", False)
    t0 = sim.t
    while sim.t - t0 < 15.0:
        sim.advance(sim.t + 0.05)
        assert primary(sim) in ("main", None)
    assert primary(sim) == "main"
    dc = sim.nodes["dc"].core
    assert dc is not None and dc.state.value == "standby"
    sim.heal()
    until(sim, lambda: sim.converged() is None, 15.0)
    assert primary(sim) == "main"


def test_pair_cut_then_primary_dies_elects_the_secondary_through_the_witness() -> None:
    sim = formed(seed=11, topology="witness", sync=False)
    sim.set_link("main", "dc", False)
    sim.set_link("dc", "main", False)
    sim.advance(sim.t + 3.0)
    sim.crash("main")
    took = until(sim, lambda: primary(sim) == "dc", 10.0)
    assert took <= 2.0 + 1.0 + 1.0 + 1.5


# -- random schedules ------------------------------------------------------------------------


@topologies
@pytest.mark.parametrize("seed", range(120))
def test_random_faults_bounded(seed: int, topology: str) -> None:
    random_run(seed, faults=10, duration=45.0, topology=topology)


@topologies
@pytest.mark.parametrize("seed", range(1000, 1030))
def test_random_compound_faults_bounded(seed: int, topology: str) -> None:
    random_run(seed, faults=20, duration=70.0, topology=topology)


@pytest.mark.slow
@topologies
@pytest.mark.parametrize("block", range(20))
def test_random_faults_soak(block: int, topology: str) -> None:
    for seed in range(10_000 + block * 200, 10_000 + (block + 1) * 200):
        random_run(seed, faults=24, duration=90.0, topology=topology)


# -- two groups, one witness ------------------------------------------------------------------


def groups_formed(seed: int = 1) -> GroupsSim:
    gs = GroupsSim(seed)
    gs.advance(4.0)
    assert gs.converged() is None and (gs.primary("g1"), gs.primary("g2")) == ("A", "B")
    return gs


def test_power_cut_of_a_host_fails_over_its_group_only() -> None:
    """A's power cut: g1 (primary on A) is served by B within the single-group bound;
    g2 (primary on B, its secondary on A) keeps its lease on B at every step."""
    gs = groups_formed()
    gs.each("A", "crash")
    start = gs.t
    while gs.primary("g1") != "B":
        assert gs.t - start < 2.0 + 1.0 + 1.0 + 1.5, gs.groups["g1"].states()
        assert gs.primary("g2") == "B", gs.groups["g2"].states()
        gs.advance(gs.t + 0.05)
    for _ in range(100):  # A stays down: both groups serve from B
        gs.advance(gs.t + 0.05)
        assert (gs.primary("g1"), gs.primary("g2")) == ("B", "B")
    gs.each("A", "restart")
    gs.advance(gs.t + 6.0)
    assert gs.converged() is None and (gs.primary("g1"), gs.primary("g2")) == ("B", "B")


def test_the_shared_witness_down_moves_nothing_in_either_group() -> None:
    gs = groups_formed(seed=2)
    gs.each("W", "crash")
    for _ in range(int(3 * (2.0 + 1.0) / 0.05)):
        gs.advance(gs.t + 0.05)
        assert (gs.primary("g1"), gs.primary("g2")) == ("A", "B")
    gs.each("W", "restart")
    gs.advance(gs.t + 3.0)
    assert gs.converged() is None


def test_a_frozen_witness_delays_the_failover_of_both_groups_until_it_is_back() -> None:
    """W frozen when A loses power: B alone is no majority of either group, so g1 elects
    nobody and g2's primary B, whose lease needs a supporter (A is gone, W silent), stops
    writing; once W is back, B serves both."""
    gs = groups_formed(seed=3)
    gs.each("W", "freeze", 8.0)
    gs.each("A", "crash")
    gs.advance(gs.t + 6.0)
    assert gs.primary("g1") is None and gs.primary("g2") is None, gs.converged()
    gs.advance(gs.t + 8.0)
    assert (gs.primary("g1"), gs.primary("g2")) == ("B", "B"), gs.converged()


@pytest.mark.parametrize("seed", range(20))
def test_random_host_faults_with_a_shared_witness_bounded(seed: int) -> None:
    random_groups_run(seed, faults=10, duration=45.0)


@pytest.mark.slow
@pytest.mark.parametrize("block", range(10))
def test_random_host_faults_with_a_shared_witness_soak(block: int) -> None:
    for seed in range(20_000 + block * 200, 20_000 + (block + 1) * 200):
        random_groups_run(seed, faults=24, duration=90.0)


# -- the model catches the bugs it is for ----------------------------------------------------


def test_the_model_catches_a_core_that_trusts_replayed_beats(monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """Mutation check: a core that takes every authentic beat as a sign of life at its
    receive time (the old heartbeat, no counter or freshness check), behind no replay
    guard, is caught by the model within a few seeds."""

    def trusting(self: NodeCore, ev: BeatIn) -> None:
        v = self.peers.get(ev.node)
        if v is None:
            return
        v.boot, v.seq, v.seq_at, v.seq_fresh = ev.boot, ev.seq, ev.now, True
        v.anchor = ev.now  # the lease from when the beat arrived, not when it was sent
        v.fresh_at = ev.now
        if ev.body.serving:
            v.serving_at = ev.now
        v.body = ev.body
        self._learn(ev.node, ev.body)

    monkeypatch.setattr(nodecore.NodeCore, "_beat_in", trusting)
    found = []
    for seed in range(60):
        try:
            random_run(seed, faults=16, duration=60.0, guard=False)
        except Violation as e:
            found.append(str(e).splitlines()[0])
            break
    assert found, "the model did not catch a replayable core"


@topologies
def test_the_model_catches_a_core_that_forgets_outdated_marks(monkeypatch: pytest.MonkeyPatch,
                                                              topology: str) -> None:
    """Mutation check: votes that ignore the outdated marks elect a peer without
    acknowledged writes (the sync-mode loss of the issue)."""
    orig = nodecore.NodeCore._vote_refusal

    def forgetful(self: NodeCore, cand: str, b: nodecore.BeatBody,
                  epoch: int | None = None) -> str | None:
        why = orig(self, cand, b, epoch)
        return None if why is not None and "outdated" in why else why

    monkeypatch.setattr(nodecore.NodeCore, "_vote_refusal", forgetful)

    def stall_then_cut_power() -> None:
        sim = formed(seed=4, topology=topology)
        sim.set_link("main", "dc", False)
        sim.set_link("dc", "main", False)
        until(sim, lambda: "dc" in sim.nodes["main"].degraded, 5.0)
        sim.advance(sim.t + 1.0)
        sim.crash("main")
        sim.advance(sim.t + 10.0)

    with pytest.raises(Violation, match="without acknowledged writes"):
        stall_then_cut_power()


def test_the_model_catches_a_core_that_lets_the_witness_stand(monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    """Mutation check: a core that treats the witness as a DR site (it may be a
    switchover's target) is caught by the random schedules."""
    monkeypatch.setattr(nodecore.CoreConfig, "holds_data", lambda self, node: True)
    found = []
    for seed in range(60):
        try:
            random_run(seed, faults=16, duration=60.0, topology="witness")
        except Violation as e:
            found.append(str(e).splitlines()[0])
            break
    assert found, "the model did not catch a witness that stands for election"


def test_lease_is_never_handed_to_nbdkit_unless_serving() -> None:
    sim = formed(seed=8)
    sim.isolate("main")
    sim.advance(sim.t + 6.0)
    core = sim.nodes["main"].core
    assert core is not None and core.state.value == "fenced"
    assert sim.nodes["main"].lease_until_local == -math.inf
