"""This node's runtime role, which failover changes: ``<data_dir>/node-state.json``
(``kind: node-state``, ``version: 1``, ``role``, ``epoch``).  The config's ``node.role`` is
the role a node is installed with; once a secondary has been promoted (epoch + 1) its
state file says primary, and every command that acts on the node's role (`daemon`,
`replicate`, `status`) reads the effective role from here."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from blockstore.meta import read_json, write_json

from .config import NodeConfig, Role

KIND = "node-state"
VERSION = 1
FILE = "node-state.json"


def load(data_dir: Path) -> dict[str, Any] | None:
    path = data_dir / FILE
    return read_json(path, KIND, VERSION) if path.exists() else None


def save(data_dir: Path, role: Role, epoch: int, why: str,
         quorum_exempt: bool = False) -> None:
    """``quorum_exempt``: promoted by an operator without a majority (DR promotion)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    write_json(data_dir / FILE, {"kind": KIND, "version": VERSION, "role": role.value,
                                 "epoch": epoch, "why": why, "since": time.time(),
                                 "quorum_exempt": quorum_exempt})


def quorum_exempt(data_dir: Path) -> bool:
    st = load(data_dir)
    return bool(st and st.get("quorum_exempt"))


def epoch(data_dir: Path) -> int:
    st = load(data_dir)
    return int(st["epoch"]) if st else 0


def effective_config(cfg: NodeConfig) -> NodeConfig:
    """The config with the runtime role (after a promotion) instead of the installed one."""
    st = load(cfg.data_dir)
    if st is None:
        return cfg
    return replace(cfg, role=Role(st["role"]))
