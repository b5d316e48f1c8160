"""This node's runtime role, which failover changes: ``<data_dir>/node-state.json``
(``kind: node-state``, ``version: 1``, ``role``, ``epoch``, ``primary``).  The config's
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
from typing import Any

from blockstore.meta import read_json, write_json

from .config import NodeConfig, Role, Topology

KIND = "node-state"
VERSION = 1
FILE = "node-state.json"


def load(data_dir: Path) -> dict[str, Any] | None:
    path = data_dir / FILE
    return read_json(path, KIND, VERSION) if path.exists() else None


def save(data_dir: Path, role: Role, epoch: int, why: str,
         quorum_exempt: bool = False, primary: str | None = None) -> None:
    """``quorum_exempt``: promoted by an operator without a majority (DR promotion);
    ``primary``: the current primary's name (None: the installed one)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    write_json(data_dir / FILE, {"kind": KIND, "version": VERSION, "role": role.value,
                                 "epoch": epoch, "why": why, "since": time.time(),
                                 "quorum_exempt": quorum_exempt, "primary": primary})


def quorum_exempt(data_dir: Path) -> bool:
    st = load(data_dir)
    return bool(st and st.get("quorum_exempt"))


def epoch(data_dir: Path) -> int:
    st = load(data_dir)
    return int(st["epoch"]) if st else 0


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
