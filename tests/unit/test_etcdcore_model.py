"""Model checking of the etcd node core (gateway/etcdcore.py) against a simulated
linearizable etcd (tests/unit/etcd_sim.py, on the harness of nodecore_sim.py).

Checked at every step of every schedule: never two valid write leases; no node writes
on an epoch below one the store granted (a deposed primary stops before its successor's
epoch exists); a primary cut off from etcd stops within its lease span; every elected
node holds each acknowledged sync write; one promotion per epoch.  After the faults
heal, one primary with the others following it within SETTLE s.

The bounded run takes seconds; ``-m slow`` runs thousands of seeds.  A failing seed is
replayed with ``etcd_run(seed, trace=True)``.
"""

from __future__ import annotations

import math

import pytest

from blockstore.generations import Generation, Relation, decide
from gateway import etcdcore
from tests.unit.etcd_sim import STORE, TTL, EtcdSim, etcd_run
from tests.unit.nodecore_sim import Violation

TOPOLOGIES = ("dr", "witness")
topologies = pytest.mark.parametrize("topology", TOPOLOGIES)


def formed(seed: int = 1, **kw: object) -> EtcdSim:
    sim = EtcdSim(seed, **kw)  # type: ignore[arg-type]
    sim.advance(4.0)
    assert sim.converged() is None, sim.states()
    assert primary(sim) == "main"
    return sim


def primary(sim: EtcdSim) -> str | None:
    prim = [n for n, node in sim.nodes.items() if node.core is not None
            and node.core.state.value == "primary"
            and node.lease_until_local > node.local(sim.t)]
    return prim[0] if len(prim) == 1 else None


def until(sim: EtcdSim, cond: object, limit: float) -> float:
    start = sim.t
    while sim.t - start < limit:
        sim.advance(sim.t + 0.05)
        if cond():  # type: ignore[operator]
            return sim.t - start
    raise AssertionError(f"not within {limit} s: {sim.states()}")


def cut_from_store(sim: EtcdSim, n: str) -> None:
    sim.links[(n, STORE)] = sim.links[(STORE, n)] = False


@topologies
def test_power_cut_of_the_primary_the_secondary_takes_the_key_within_bounds(
        topology: str) -> None:
    sim = formed(topology=topology)
    sim.crash("main")
    took = until(sim, lambda: primary(sim) == "dc", 10.0)
    # TTL, etcd's expiry sweep, a poll, a request round trip, the promotion (<= 1.5 s)
    assert took <= TTL + 0.5 + 0.25 + 0.1 + 1.5 + 0.3
    assert sim.nodes["dc"].hard.epoch == 1
    third = "dr" if topology == "dr" else "wit"
    until(sim, lambda: sim.nodes[third].hard.primary == "dc", 2.0)


@topologies
def test_a_primary_cut_off_from_etcd_stops_before_the_key_is_granted_to_another(
        topology: str) -> None:
    """Not cut from its clients nor its peers: only etcd.  It fences within its lease
    span; dc is granted the key only after that; never both."""
    sim = formed(seed=2, topology=topology)
    cut_from_store(sim, "main")
    t0 = sim.t
    main = sim.nodes["main"]
    stopped = until(sim, lambda: main.lease_until_local <= main.local(sim.t), TTL)
    assert stopped <= TTL * (1 - etcdcore.DRIFT) - etcdcore.MARGIN + 0.1
    until(sim, lambda: primary(sim) == "dc", 10.0)
    granted_at = next(t for t, e in sim.store.granted if e == 1)
    assert granted_at > t0 + stopped
    sim.links[("main", STORE)] = sim.links[(STORE, "main")] = True
    until(sim, lambda: sim.converged() is None, 15.0)
    assert main.hard.primary == "dc"


@topologies
def test_etcd_quorum_lost_no_promotion_the_primary_serves_until_its_lease_then_fences(
        topology: str) -> None:
    sim = formed(seed=3, topology=topology)
    for n in sim.sites:
        cut_from_store(sim, n)
    t0 = sim.t
    main = sim.nodes["main"]
    assert main.serving
    stopped = until(sim, lambda: main.lease_until_local <= main.local(sim.t), TTL)
    assert stopped > 1.0  # it served on for most of its lease span
    sim.advance(sim.t + 10.0)
    assert primary(sim) is None
    assert sim.store.granted[-1][1] == 0 and sim.t - t0 > 10  # nobody took a new epoch
    for n in sim.sites:
        sim.links[(n, STORE)] = sim.links[(STORE, n)] = True
    until(sim, lambda: sim.converged() is None, 15.0)


@topologies
def test_one_node_down_changes_nothing_for_the_others(topology: str) -> None:
    sim = formed(seed=4, topology=topology)
    third = "dr" if topology == "dr" else "wit"
    sim.crash(third)
    sim.advance(sim.t + 3 * TTL)
    assert primary(sim) == "main" and sim.nodes["main"].hard.epoch == 0


@topologies
def test_switchover_hands_the_key_to_the_target_by_transaction(topology: str) -> None:
    sim = formed(seed=5, topology=topology)
    sim.advance(sim.t + 2.0)
    sim.request("main", "switchover", to="dc", timeout=5)
    until(sim, lambda: primary(sim) == "dc", 10.0)
    until(sim, lambda: sim.converged() is None, 10.0)
    replies = sim.nodes["main"].replies
    assert replies and replies[-1].get("ok") and replies[-1]["target_serving"], replies


def test_a_switchover_whose_primary_is_cut_off_in_its_drain_fails_at_once() -> None:
    """As on heartbeats (test_nodecore_model): a primary cut from the store during a
    switchover's drain fences when its key's lease runs out and answers then, truly,
    instead of waiting out the drain's timeout."""
    sim = formed(seed=5)
    sim.advance(sim.t + 2.0)
    main = sim.nodes["main"]
    sim.request("main", "switchover", to="dc", timeout=60)
    sim.isolate("main")
    until(sim, lambda: bool(main.replies), 2 * TTL)
    err = main.replies[-1]["error"]
    assert err.startswith("switchover to dc failed: node main lost its primary role during "
                          "the drain"), err
    assert "client I/O is not resumed here" in err and "nothing changed" not in err, err
    sim.heal()
    until(sim, lambda: sim.converged() is None, 30.0)
    assert len(main.replies) == 1


def test_a_switchover_to_a_witness_is_refused() -> None:
    sim = formed(seed=6, topology="witness")
    sim.request("main", "switchover", to="wit", timeout=5)
    assert "is a witness" in sim.nodes["main"].replies[-1]["error"]


def test_a_dr_site_takes_the_key_only_by_an_operator_and_only_when_free() -> None:
    sim = formed(seed=7, topology="dr")
    sim.request("dr", "promote")
    assert "main holds the key" in sim.nodes["dr"].replies[-1]["error"]
    sim.crash("main")
    sim.crash("dc")
    sim.advance(sim.t + 3 * TTL)
    assert primary(sim) is None  # never automatically
    sim.request("dr", "promote", force=True)
    until(sim, lambda: primary(sim) == "dr", 5.0)


def test_sync_stall_outdates_the_peer_in_etcd_which_then_cannot_take_the_key() -> None:
    sim = formed(seed=8, topology="dr")
    sim.set_link("main", "dc", False)
    sim.set_link("dc", "main", False)
    until(sim, lambda: "dc" in sim.nodes["main"].degraded, 5.0)
    assert "dc" in sim.nodes["main"].core.view.state.outdated  # type: ignore[union-attr]
    sim.crash("main")
    sim.advance(sim.t + 4 * TTL)
    assert primary(sim) is None  # dc lacks acknowledged writes: it may not take the key
    core = sim.nodes["dc"].core
    assert core is not None and "outdated" in str(core.candidate_refusal())  # type: ignore[attr-defined]


@topologies
def test_the_fencing_token_makes_peerlink_refuse_the_deposed_primary(topology: str) -> None:
    """The epoch the successor took is above the deposed primary's, so its generation
    wins peerlink's handshake check: the deposed sender is BEHIND and refused."""
    sim = formed(seed=9, topology=topology)
    cut_from_store(sim, "main")
    until(sim, lambda: primary(sim) == "dc", 10.0)
    old, new = sim.nodes["main"].hard.epoch, sim.nodes["dc"].hard.epoch
    assert new > old
    base = Generation(1, 0, 0)
    deposed = [base] if old == 0 else [base, Generation(2, 5, old)]
    successor = [*deposed, Generation(3, 10, new)]
    assert decide(deposed, successor)[0] is Relation.BEHIND  # the deposed one may not send
    assert decide(successor, deposed)[0] is Relation.AHEAD  # the successor's data wins


@pytest.mark.parametrize("seed", range(1, 13))
@topologies
def test_random_faults_bounded(seed: int, topology: str) -> None:
    etcd_run(seed, faults=12, duration=45.0, topology=topology)


@pytest.mark.parametrize("seed", range(100, 106))
@topologies
def test_random_faults_with_clock_skew_bounded(seed: int, topology: str) -> None:
    etcd_run(seed, faults=16, duration=60.0, topology=topology, skew=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("block", range(10))
@topologies
def test_random_faults_soak(block: int, topology: str) -> None:
    for seed in range(1000 + block * 100, 1000 + (block + 1) * 100):
        etcd_run(seed, faults=24, duration=90.0, topology=topology, skew=0.02)


# -- the model catches broken cores ---------------------------------------------------------


def runs(seeds: range, **kw: object) -> None:
    for seed in seeds:
        etcd_run(seed, faults=16, duration=60.0, **kw)  # type: ignore[arg-type]


def test_the_model_catches_a_write_lease_longer_than_etcds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A write lease that outlasts etcd's (no allowance for drift or in-flight writes,
    and then some) lets a deposed primary write after its successor took the key."""
    monkeypatch.setattr(etcdcore, "DRIFT", -0.3)  # a lease 30 % longer than etcd's
    monkeypatch.setattr(EtcdSim, "cut_stop", math.inf)  # only the safety property itself
    with pytest.raises(Violation, match=r"a deposed primary still writes|two valid"):
        runs(range(1, 120), skew=0.02)


def test_the_model_catches_a_core_that_ignores_outdated_marks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = etcdcore.EtcdCore.candidate_refusal

    def forgetful(self: etcdcore.EtcdCore) -> str | None:
        why = real(self)
        return None if why is not None and "outdated" in why else why

    monkeypatch.setattr(etcdcore.EtcdCore, "candidate_refusal", forgetful)
    with pytest.raises(Violation, match="without acknowledged writes"):
        runs(range(1, 80))


def test_the_write_lease_is_never_handed_to_nbdkit_unless_primary() -> None:
    sim = formed(seed=10)
    for _ in range(200):
        sim.advance(sim.t + 0.05)
        for node in sim.nodes.values():
            if node.core is not None and node.core.state.value != "primary":
                assert node.lease_until_local == float("-inf")


def test_a_switchover_whose_target_dies_is_withdrawn_and_the_group_gets_a_primary() -> None:
    """The handover names dc, which dies before it takes the key: the old primary
    withdraws the word after HANDOVER_WAIT and a candidate (itself, a replica now) takes
    the key."""
    sim = formed(seed=11, topology="dr")
    sim.advance(sim.t + 2.0)
    sim.request("main", "switchover", to="dc", timeout=5)
    until(sim, lambda: sim.store.kv.get("/nbdgw/groups/g/handover") is not None, 8.0)
    sim.crash("dc")
    assert primary(sim) is None
    took = until(sim, lambda: primary(sim) == "main", etcdcore.HANDOVER_WAIT + 3 * TTL)
    assert took > etcdcore.HANDOVER_WAIT - 1.0  # nobody but dc while the word stood
    assert sim.nodes["main"].hard.epoch == 1


def test_a_take_whose_answer_is_lost_is_given_back() -> None:
    """dc's take succeeds in etcd but the answer never arrives: dc does not act on it, so
    it releases the key (delete-if-mine) instead of holding the group for ever."""
    sim = formed(seed=12, topology="dr", trace=True)
    sim.crash("main")
    dc = sim.nodes["dc"]
    lost = {"done": False}
    real = sim._deliver

    def drop_take_answer(m: object) -> None:
        payload = getattr(m, "payload", None)
        core = dc.core
        if not lost["done"] and getattr(m, "dst", None) == "dc" and payload is not None \
                and core is not None and payload[1].succeeded \
                and core.inflight.get(payload[1].req_id, ("",))[0] == "txn:take":  # type: ignore[attr-defined]
            lost["done"] = True
            return
        real(m)  # type: ignore[arg-type]

    sim._deliver = drop_take_answer  # type: ignore[method-assign]
    until(sim, lambda: primary(sim) is not None, 30.0)
    assert lost["done"]
    assert any("dc: etcd_release " in line for line in sim.log), sim.log[-20:]


def test_the_coordinator_factory_builds_the_core_the_config_names() -> None:
    from gateway.config import parse_config
    from gateway.coordinator import make_core
    from gateway.daemon import core_config
    from gateway.nodecore import HardState, NodeCore

    base = {"version": 1, "node": {"name": "a"},
            "peerlink": {"secret_file": "/etc/nbdgw/peer.secret"},
            "peers": [{"name": "b", "role": "secondary", "address": "192.0.2.2"}]}
    hb = parse_config(base)
    et = parse_config({**base, "coordinator": {"kind": "etcd", "group": "g7",
                                               "endpoints": ["http://192.0.2.9:2379"]}})
    hard = HardState(role="primary", primary="a")
    assert isinstance(make_core(hb, core_config(hb, hb), hard, 0.0, b"x", False), NodeCore)
    core = make_core(et, core_config(et, et), hard, 0.0, b"x", False)
    assert isinstance(core, etcdcore.EtcdCore)
    assert core.cfg.keys == "/nbdgw/groups/g7/" and core.cfg.peers == {"b": "secondary"}
    ready = core.step(etcdcore.Tick(0.0))
    assert [o.args["op"] for o in ready.actions if o.kind == "etcd"] == ["grant", "txn"]


def test_after_a_power_cut_the_new_primary_need_not_wait_for_its_dead_sync_peer() -> None:
    """The take outdates the primary it replaces (a sync peer): its first writes are
    acknowledged at once, not after a sync timeout (nodecore_sim.SYNC_TIMEOUT, 1 s)."""
    sim = formed(seed=13, topology="dr")
    sim.crash("main")
    until(sim, lambda: primary(sim) == "dc", 10.0)
    before = set(sim.acked)
    took = until(sim, lambda: bool(set(sim.acked) - before), 2.0)
    assert took < 0.5, took
    assert sim.nodes["dc"].core.view.state.outdated == {"main"}  # type: ignore[union-attr]


# -- one lease per node, kept by the groups parent (shared) ---------------------------------


def etcd_requests(sim: EtcdSim, seconds: float) -> dict[str, int]:
    """The etcd requests each node's core sends in ``seconds`` of steady state."""
    counts = dict.fromkeys(sim.sites, 0)
    real = sim._request

    def count(node: object, args: dict[str, object]) -> None:
        counts[node.name] += 1  # type: ignore[attr-defined]
        real(node, args)  # type: ignore[arg-type]

    sim._request = count  # type: ignore[method-assign]
    sim.advance(sim.t + seconds)
    sim._request = real  # type: ignore[method-assign]
    return counts


def test_at_steady_state_a_shared_core_sends_no_request_of_its_own() -> None:
    """The node's keeper sends the keepalives and the one read for all its groups: a
    group's core sends nothing while nothing changes, so etcd's load does not grow with
    the groups of a node.  A core of its own lease sends keepalives and polls."""
    own = etcd_requests(formed(seed=20), 10.0)
    assert all(n >= 10 / (TTL / 4) for n in own.values()), own
    shared = etcd_requests(formed(seed=20, shared=True), 10.0)
    assert shared == dict.fromkeys(shared, 0), shared


@topologies
def test_shared_lease_power_cut_of_the_primary_the_secondary_takes_the_key(
        topology: str) -> None:
    sim = formed(seed=21, topology=topology, shared=True)
    sim.crash("main")
    took = until(sim, lambda: primary(sim) == "dc", 10.0)
    assert took <= TTL + 0.5 + 0.25 + 0.1 + 1.5 + 0.3 + 0.1  # + a read of the file


def test_a_frozen_keeper_fences_its_primary_at_the_published_deadline() -> None:
    """The groups parent frozen (SIGSTOP), its children running: nothing extends the
    node's lease, so the primary's core fences by its own clock at the deadline the
    keeper published, before etcd can expire the lease; dc takes the key after."""
    sim = formed(seed=22, shared=True)
    main = sim.nodes["main"]
    published = sim.keepers["main"].published
    assert published is not None
    sim.keeper_freeze("main", 20.0)
    t0 = sim.t
    stopped = until(sim, lambda: main.lease_until_local <= main.local(sim.t), TTL)
    assert stopped <= TTL * (1 - etcdcore.DRIFT) - etcdcore.MARGIN + 0.1
    until(sim, lambda: primary(sim) == "dc", 10.0)
    granted_at = next(t for t, e in sim.store.granted if e == 1)
    assert granted_at > t0 + stopped


def test_a_restarted_keeper_adopts_the_nodes_lease_and_the_primary_serves_on() -> None:
    """The parent dies and is back within the lease span: it keeps the published lease
    alive (etcd still has it), so the group's key stays its primary's: no new epoch."""
    sim = formed(seed=23, shared=True)
    lease = sim.keepers["main"].published.lease  # type: ignore[union-attr]
    sim.keeper_crash("main")
    sim.advance(sim.t + 1.0)
    sim.keeper_restart("main")
    for _ in range(100):
        sim.advance(sim.t + 0.05)
        assert primary(sim) == "main", sim.states()
    assert sim.keepers["main"].published.lease == lease  # type: ignore[union-attr]
    assert sim.nodes["main"].hard.epoch == 0


@pytest.mark.parametrize("seed", range(1, 13))
@topologies
def test_random_faults_shared_lease_bounded(seed: int, topology: str) -> None:
    etcd_run(seed, faults=16, duration=60.0, topology=topology, skew=0.02, shared=True)


@pytest.mark.slow
@pytest.mark.parametrize("block", range(10))
@topologies
def test_random_faults_shared_lease_soak(block: int, topology: str) -> None:
    for seed in range(5000 + block * 100, 5000 + (block + 1) * 100):
        etcd_run(seed, faults=24, duration=90.0, topology=topology, skew=0.02, shared=True)


def test_the_model_catches_a_core_that_outlives_its_keeper(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A core that takes the file's word that the lease exists as the lease being alive
    (its own anchor at each read, not the keeper's) writes on while its keeper is frozen
    or dead and etcd expires the lease."""
    real = etcdcore.EtcdCore._shared

    def trusting(self: etcdcore.EtcdCore, sh: etcdcore.Shared) -> None:
        real(self, sh)
        if self.lease_id:
            self.lease_alive_until = max(self.lease_alive_until,
                                         self.now + self.cfg.lease_span)

    monkeypatch.setattr(etcdcore.EtcdCore, "_shared", trusting)
    monkeypatch.setattr(EtcdSim, "cut_stop", math.inf)  # only the safety property itself
    with pytest.raises(Violation, match=r"a deposed primary still writes|two valid"):
        runs(range(1, 120), skew=0.02, shared=True)


def test_a_groups_child_uses_the_nodes_lease_and_a_config_without_groups_its_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The groups parent starts its children with NBDGW_NODE_LEASE=1: their cores read
    the node's lease from their run dir and ask etcd for none; without it (a config
    without groups, or `nbdgw --group G daemon` run by hand) a core keeps its own."""
    from gateway.config import parse_config
    from gateway.coordinator import make_core, shared_lease_file
    from gateway.daemon import core_config
    from gateway.etcdclient import NODE_LEASE_ENV
    from gateway.nodecore import HardState

    cfg = parse_config({
        "version": 1, "node": {"name": "a", "data_dir": "/srv/x"},
        "peerlink": {"secret_file": "/etc/nbdgw/peer.secret"},
        "peers": [{"name": "b", "role": "secondary", "address": "192.0.2.2"}],
        "coordinator": {"kind": "etcd", "endpoints": ["http://192.0.2.9:2379"]}})
    hard = HardState(role="primary", primary="a")

    def first_requests() -> list[str]:
        core = make_core(cfg, core_config(cfg, cfg), hard, 0.0, b"x", False)
        ready = core.step(etcdcore.Tick(0.0))
        return [o.args["op"] for o in ready.actions if o.kind == "etcd"]

    monkeypatch.delenv(NODE_LEASE_ENV, raising=False)
    assert shared_lease_file(cfg) is None
    assert first_requests() == ["grant", "txn"]
    monkeypatch.setenv(NODE_LEASE_ENV, "1")
    assert str(shared_lease_file(cfg)) == "/srv/x/run/etcd-node-lease.json"
    assert first_requests() == []


def test_a_config_with_groups_reads_its_coordinator_section() -> None:
    """`coordinator:` at the top of a config with groups decides each group (each on its
    own key): it was ignored, and every group fell back to heartbeats."""
    from gateway.config import CoordinatorKind, group_config, parse_config

    cfg = parse_config({
        "version": 1, "node": {"name": "a"},
        "peerlink": {"secret_file": "/etc/nbdgw/peer.secret"},
        "sites": [{"name": n, "address": f"192.0.2.{i + 1}"} for i, n in enumerate("abc")],
        "coordinator": {"kind": "etcd", "endpoints": ["http://192.0.2.9:2379"]},
        "groups": [{"name": "g1", "primary": "a", "secondary": "b", "dr": "c",
                    "ports": {"peerlink": 7801, "heartbeat": 7802, "nbd": 10811},
                    "volumes": [{"name": "v1", "size": "16M"}]}]})
    g1 = group_config(cfg, "g1").coordinator
    assert g1.kind is CoordinatorKind.ETCD and g1.group == "g1"
    assert g1.endpoints == ("http://192.0.2.9:2379",)
