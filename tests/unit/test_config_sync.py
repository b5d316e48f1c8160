"""Sync mode as a property of the main-site pair: config validation (messages word for
word), the effective config after a failover, the lab's configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import lab, nodestate
from gateway.config import PeerMode, Role, parse_config
from gateway.replication import sync_timeout
from tests.unit.conftest import refused

MAIN = {"name": "main", "role": "primary", "address": "192.0.2.11"}
DC = {"name": "dc", "role": "secondary", "address": "192.0.2.12"}
DR = {"name": "dr", "role": "dr", "address": "192.0.2.13"}


def node(name: str, role: str, peers: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    # Automatic failover needs the peers' secret (its heartbeats are signed with it).
    return {"version": 1, "node": {"name": name, "role": role}, "peers": peers,
            "peerlink": {"secret_file": "/etc/nbdgw/peer.secret"}, **extra}




def test_sync_between_the_main_site_nodes_both_ways() -> None:
    main = parse_config(node("main", "primary", [{**DC, "mode": "sync"}, DR]))
    assert [(p.name, p.mode) for p in main.send_to()] == [("dc", PeerMode.SYNC),
                                                         ("dr", PeerMode.ASYNC)]
    # The secondary names the primary sync: "when I am primary I ship sync to it".
    dc = parse_config(node("dc", "secondary", [{**MAIN, "mode": "sync"}, DR]))
    assert dc.peer("main") is not None and dc.peer("main").mode is PeerMode.SYNC  # type: ignore[union-attr]
    assert dc.send_to() == ()  # nothing to ship while it is the secondary


@pytest.mark.parametrize(("raw", "msg"), [
    (node("main", "primary", [DC, {**DR, "mode": "sync"}]),
     "mode: sync is allowed only between the two main-site nodes (primary and secondary): "
     "peers[1] (dr) is a DR site"),
    (node("dc", "secondary", [MAIN, {**DR, "mode": "sync"}]),
     "mode: sync is allowed only between the two main-site nodes (primary and secondary): "
     "peers[1] (dr) is a DR site"),
    (node("dr", "dr", [{**MAIN, "mode": "sync"}, DC]),
     "mode: sync is allowed only between the two main-site nodes (primary and secondary): "
     "this node (dr) is a DR site, so peers[0] (main) cannot be sync"),
    (node("dr", "dr", [MAIN, {**DC, "mode": "sync"}]),
     "mode: sync is allowed only between the two main-site nodes (primary and secondary): "
     "this node (dr) is a DR site, so peers[1] (dc) cannot be sync"),
])
def test_sync_with_a_dr_site_is_refused(raw: dict[str, Any], msg: str) -> None:
    assert refused(raw) == msg


def test_the_promoted_secondary_ships_sync_to_the_old_primary(tmp_path: Path) -> None:
    """effective_config keeps each peer's configured mode when the roles change."""
    dc = parse_config(node("dc", "secondary", [{**MAIN, "mode": "sync", "sync_timeout": 3},
                                               DR])).with_overrides(data_dir=tmp_path)
    assert sync_timeout(nodestate.effective_config(dc)) is None
    nodestate.save(tmp_path, Role.PRIMARY, 1, "promoted", primary="dc")
    eff = nodestate.effective_config(dc)
    assert eff.role is Role.PRIMARY
    assert [(p.name, p.role, p.mode) for p in eff.send_to()] == [
        ("main", Role.SECONDARY, PeerMode.SYNC), ("dr", Role.DR, PeerMode.ASYNC)]
    assert sync_timeout(eff) == 3.0
    # ... and the demoted primary keeps naming dc sync, for when it is primary again.
    main_dir = tmp_path / "main"
    main = parse_config(node("main", "primary", [{**DC, "mode": "sync"}, DR])
                        ).with_overrides(data_dir=main_dir)
    nodestate.save(main_dir, Role.SECONDARY, 1, "demoted", primary="dc")
    eff = nodestate.effective_config(main)
    assert eff.role is Role.SECONDARY and eff.send_to() == ()
    assert eff.peer("dc").role is Role.PRIMARY  # type: ignore[union-attr]
    assert eff.peer("dc").mode is PeerMode.SYNC  # type: ignore[union-attr]


def test_the_lab_names_the_main_site_pair_sync_both_ways(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    monkeypatch.setattr(lab, "run", lambda argv, **kw: None)  # no volume create
    s = lab.plan(tmp_path, lab.DEFAULT_SUBNET, "64M", mode="sync")
    modes = {}
    for n in s["nodes"]:
        lab.write_site(s, n, b"x" * 32)
        cfg = parse_config(yaml.safe_load(Path(n["config"]).read_text()))
        modes[n["name"]] = {p.name: p.mode.value for p in cfg.peers}
    assert modes == {"main": {"dc": "sync", "dr": "async"},
                     "dc": {"main": "sync", "dr": "async"},
                     "dr": {"main": "async", "dc": "async"}}
