"""`nbdgw status` with coordinator.kind etcd: etcd's view replaces the heartbeat
quorum (no beats are exchanged, so "no peer heard" would mislead)."""

from __future__ import annotations

from typing import Any

from gateway.status import failover_lines


def report(coordinator: dict[str, Any] | None, majority: bool) -> dict[str, Any]:
    return {"node": "dc", "failover": {
        "state": "standby", "epoch": 4, "primary": "main", "auto": True, "age_s": 0.2,
        "peers": {}, "roles": {"dc": "secondary", "main": "primary"},
        "coordinator": coordinator,
        "quorum": {"sites": 3, "heard": 3 if coordinator else 1, "majority": majority}}}


def test_etcd_status_names_the_group_the_holder_and_this_nodes_lease() -> None:
    co = {"kind": "etcd", "group": "branch-17", "holder": "main", "holder_epoch": 4,
          "lease_alive_s": 2.1, "members": ["dc", "dr", "main"]}
    assert failover_lines(report(co, True)) == [
        "failover: standby, epoch 4, primary main",
        "etcd: group branch-17, key held by main (epoch 4); this node's lease alive; "
        "3 of 3 sites have a record in etcd"]
    lost = failover_lines(report({**co, "holder": None, "holder_epoch": None}, False))
    assert lost[1].startswith("etcd: group branch-17, key held by nobody (epoch None); "
                              "this node's lease LOST")


def test_heartbeat_status_is_unchanged() -> None:
    assert failover_lines(report(None, False)) == [
        "failover: standby, epoch 4, primary main; heard: no peer heard",
        "quorum: 1 of 3 sites, NO MAJORITY"]
