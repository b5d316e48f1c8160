"""This node's runtime role, which failover changes: ``<data_dir>/node-state.json``
(``kind: node-state``, ``version: 2``: ``role``, ``epoch``, ``primary`` and the rest of
the node core's hard state: the last vote, outdated marks, grants, served epochs; a
version 1 file, which had only the first three and ``quorum_exempt``, is read as one
with no vote cast).  The config's
``node.role`` is the role a node is installed with; once a secondary has been promoted
(epoch + 1) its state file says primary, a demoted primary's says secondary, and
``primary`` names the site this node knows as the current primary.  Every command that
acts on roles (`daemon`, `replicate`, `status`) reads the effective config from here:
the runtime role of this node *and of its peers*, so that a new primary ships to the old
one when it rejoins.  While the primary is not the installed one (after a failover or a
DR promotion) replication fans out from it to both other sites, whatever the installed
topology: a cascade through a site that may be the one that failed would starve DR."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from blockstore.meta import write_json
from blockstore.modes import make_dir
from blockstore.node_state import FILE, KIND, VERSION, load

from .config import NodeConfig, Role, Topology
from .nodecore import HardState


def save(data_dir: Path, role: Role, epoch: int, why: str,
         quorum_exempt: bool = False, primary: str | None = None) -> None:
    """``quorum_exempt``: promoted by an operator without a majority (DR promotion);
    ``primary``: the current primary's name (None: the installed one)."""
    st = load(data_dir) or {}
    save_hard(data_dir, HardState(
        role=role.value, epoch=epoch, primary=primary,
        vote_epoch=int(st.get("vote_epoch", 0)), vote_for=st.get("vote_for"),
        quorum_exempt=quorum_exempt), why)


def save_hard(data_dir: Path, h: HardState, why: str) -> None:
    """Persist the node core's hard state (before any beat or action shows it)."""
    make_dir(data_dir, parents=True, exist_ok=True)
    write_json(data_dir / FILE, {
        "kind": KIND, "version": VERSION, "role": h.role, "epoch": h.epoch,
        "primary": h.primary, "why": why, "since": time.time(),
        "quorum_exempt": h.quorum_exempt, "vote_epoch": h.vote_epoch,
        "vote_for": h.vote_for, "outdated": sorted(h.outdated),
        "granted_epoch": h.granted_epoch, "granted_to": h.granted_to,
        "served_epoch": h.served_epoch, "floor_epoch": h.floor_epoch})


def load_hard(cfg: NodeConfig) -> HardState:
    """The hard state of this node; a node that never ran failover starts from its
    installed role, following the installed primary on epoch 0."""
    st = load(cfg.data_dir)
    if st is None:
        role = "primary" if cfg.role is Role.PRIMARY else cfg.role.value
        return HardState(role=role, primary=installed_primary(cfg))
    primary = st.get("primary")
    if primary is None:
        primary = cfg.name if st["role"] == "primary" else installed_primary(cfg)
    epoch = int(st["epoch"])
    return HardState(
        role=str(st["role"]), epoch=epoch, primary=primary,
        vote_epoch=int(st.get("vote_epoch", epoch)), vote_for=st.get("vote_for"),
        outdated=frozenset(st.get("outdated", [])),
        quorum_exempt=bool(st.get("quorum_exempt", False)),
        granted_epoch=int(st.get("granted_epoch", 0)), granted_to=st.get("granted_to"),
        served_epoch=int(st.get("served_epoch", epoch if st["role"] == "primary" else 0)),
        floor_epoch=int(st.get("floor_epoch", epoch)))


def quorum_exempt(data_dir: Path) -> bool:
    st = load(data_dir)
    return bool(st and st.get("quorum_exempt"))


def installed_primary(cfg: NodeConfig) -> str | None:
    if cfg.role is Role.PRIMARY:
        return cfg.name
    return next((p.name for p in cfg.peers if p.role is Role.PRIMARY), None)


def current_primary(cfg: NodeConfig) -> str | None:
    """The primary this node knows of: the state file's, else the installed one."""
    st = load(cfg.data_dir)
    if st is not None and st.get("primary"):
        return str(st["primary"])
    if st is not None and Role(st["role"]) is Role.PRIMARY:
        return cfg.name
    return installed_primary(cfg)


def effective_config(cfg: NodeConfig) -> NodeConfig:
    """The installed config with the runtime roles (module docstring)."""
    st = load(cfg.data_dir)
    if st is None:
        return cfg
    role = Role(st["role"])
    primary = current_primary(cfg)
    installed = installed_primary(cfg)
    if primary is None or primary == installed:
        return replace(cfg, role=role)
    peers = tuple(replace(p, role=Role.PRIMARY if p.name == primary else (
        Role.SECONDARY if p.role is Role.PRIMARY else p.role)) for p in cfg.peers)
    return replace(cfg, role=role, peers=peers,
                   peerlink=replace(cfg.peerlink, topology=Topology.FANOUT))
