"""A switchover asked through etcd (`nbdgw fleet place`: the ``switchover`` key), on the
model of tests/unit/etcd_sim.py: the primary answers the ask by a transaction comparing
the key as read, then drains and hands over as for `nbdgw switchover`; a refusal is
written as the answer and nothing moves.  The model's invariants are checked at every
step throughout."""

from __future__ import annotations

import json

from gateway.etcdcore import Cmp, GroupView, Put, Txn
from gateway.fleet import config_changes, render_place
from tests.unit.etcd_sim import EtcdSim
from tests.unit.test_etcdcore_model import formed, primary, until

G = "/nbdgw/groups/g/"


def ask(sim: EtcdSim, to: str, frm: str = "main", epoch: int | None = None) -> bool:
    """What `fleet place` writes: compare ``primary`` as read, the key absent."""
    p = sim.store.kv[G + "primary"]
    held = json.loads(p.value)["epoch"]
    value = json.dumps({"to": to, "from": frm, "epoch": held if epoch is None else epoch,
                        "timeout": 5, "by": "admin"})
    t = Txn((Cmp(G + "primary", "mod", p.mod_revision), Cmp(G + "switchover", "create", 0)),
            (Put(G + "switchover", value),), G)
    return sim.store.apply(sim.t, {"op": "txn", "txn": t}, 0).succeeded


def answer(sim: EtcdSim) -> str | None:
    kv = sim.store.kv.get(G + "switchover")
    return None if kv is None else json.loads(kv.value).get("answer")


def test_an_ask_in_etcd_switches_the_primary_over() -> None:
    sim = formed(seed=5, topology="dr")
    sim.advance(sim.t + 2.0)
    assert ask(sim, "dc")
    until(sim, lambda: primary(sim) == "dc", 10.0)
    assert answer(sim) == "accepted: main drains"
    until(sim, lambda: sim.converged() is None, 10.0)


def test_an_ask_for_a_witness_is_answered_refused_and_nothing_moves() -> None:
    sim = formed(seed=6, topology="witness")
    assert ask(sim, "wit")
    until(sim, lambda: answer(sim) is not None, 5.0)
    assert answer(sim) == "refused: wit is a witness: it holds no data and can never " \
                          "take over"
    sim.advance(sim.t + 3.0)
    assert primary(sim) == "main"


def test_an_ask_of_a_node_that_is_not_the_primary_is_not_answered() -> None:
    sim = formed(seed=7, topology="dr")
    assert ask(sim, "main", frm="dc")
    sim.advance(sim.t + 5.0)
    assert answer(sim) is None and primary(sim) == "main"


def test_an_ask_of_another_epoch_is_void() -> None:
    """Asked of main on an epoch it no longer holds (it was gone before it answered, and
    primary again later): main must not act on it."""
    sim = formed(seed=8, topology="dr")
    sim.advance(sim.t + 2.0)
    held = json.loads(sim.store.kv[G + "primary"].value)["epoch"]
    assert ask(sim, "dc", epoch=held + 1)
    sim.advance(sim.t + 5.0)
    assert answer(sim) is None and primary(sim) == "main"


def test_config_changes_name_the_nodes_to_add_and_to_remove() -> None:
    view = GroupView(members={"a": {"role": "primary"}, "b": {"role": "secondary"},
                              "w": {"role": "witness"}})
    changes = config_changes(view, "a", ["c"])
    assert changes == {"known": False, "add_to_config": ["c"], "remove_from_config": ["b"]}
    lines = render_place({"group": "g", "placement_revision": 9, "primary": "a",
                          "replicas": ["c"], "switchover": "none: a is the primary already",
                          **changes})
    assert lines[2:] == ["no node runs g: etcd cannot start it",
                         "config needed: add group g to c's config and reload it",
                         "config needed: remove group g from b's config and reload it"]
