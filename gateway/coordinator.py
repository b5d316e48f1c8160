"""The coordinator interface under the daemon: which node core decides roles
(``coordinator.kind``), built from the config, and what it needs running.

- ``heartbeat`` (the default): gateway/nodecore.py, the sites' own majority, fed by
  authenticated heartbeats (gateway/heartbeat.py, started by the daemon).
- ``etcd``: gateway/etcdcore.py, one lease per node and a key per group in an etcd v3
  cluster; its requests are performed by an ``EtcdShell`` (gateway/etcdclient.py), whose
  answers come back to the daemon's queue as ``EtcdReply`` events.  A group's daemon run
  by the groups parent (``NODE_LEASE_ENV`` set) uses the node's lease, kept by the parent
  (``NodeLease``), and the parent's read of the keys: ``shared_lease_file``.

Both cores have the same outward interface (``Core``): the daemon feeds them events and
performs the ``Ready`` they return, whichever decides.  One config is one volume group
(``coordinator.group``); a node running several groups runs one core per group.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from .config import CoordinatorKind, NodeConfig
from .etcdcore import EtcdCore, EtcdCoreConfig, EtcdReply
from .failover import State
from .nodecore import CoreConfig, HardState, NodeCore, Ready


class Core(Protocol):
    """What the daemon uses of a node core."""

    state: State
    hard: HardState
    boot: bytes
    seq: int
    handover_to: str | None

    @property
    def peers(self) -> Mapping[str, Any]: ...

    def step(self, ev: Any) -> Ready: ...

    def status(self) -> dict[str, Any]: ...


def uses_etcd(cfg: NodeConfig) -> bool:
    return cfg.coordinator.kind is CoordinatorKind.ETCD


def shared_lease_file(installed: NodeConfig) -> Path | None:
    """Where this group's daemon reads the node's lease, when the groups parent keeps
    it (None: the daemon keeps a lease of its own, as a config without groups does)."""
    from .etcdclient import NODE_LEASE_ENV, NODE_LEASE_FILE

    if not uses_etcd(installed) or os.environ.get(NODE_LEASE_ENV) != "1":
        return None
    return installed.data_dir / "run" / NODE_LEASE_FILE


def etcd_core_config(installed: NodeConfig, heartbeat: CoreConfig) -> EtcdCoreConfig:
    """The etcd core's view: the heartbeat core's topology and sync peers, the group and
    timings of ``coordinator:``, and whether the node's lease is the parent's."""
    c = installed.coordinator
    return EtcdCoreConfig(me=heartbeat.me, role=heartbeat.role, peers=heartbeat.peers,
                          group=c.group, prefix=c.prefix, lease_ttl=c.lease_ttl,
                          poll=c.poll_interval, sync_peers=heartbeat.sync_peers,
                          auto=installed.failover.auto,
                          shared=shared_lease_file(installed) is not None)


def make_core(installed: NodeConfig, heartbeat: CoreConfig, hard: HardState, now: float,
              boot: bytes, split_brain: bool) -> Core:
    """The node core ``coordinator.kind`` names (``heartbeat``: the daemon's CoreConfig)."""
    if uses_etcd(installed):
        return EtcdCore(etcd_core_config(installed, heartbeat), hard, now, boot,
                        split_brain=split_brain)
    return NodeCore(heartbeat, hard, now, boot, split_brain=split_brain)


def etcd_client(cfg: NodeConfig) -> Any:
    """A client of ``coordinator:``'s cluster."""
    from .etcdclient import EtcdClient, Tls

    c = cfg.coordinator
    return EtcdClient(c.endpoints, Tls(c.ca_file, c.cert_file, c.key_file))


def start_etcd(installed: NodeConfig, post: Callable[[Any], None]) -> Any:
    """The etcd shell of ``coordinator:`` (its answers go to ``post``)."""
    from .etcdclient import EtcdShell

    return EtcdShell(etcd_client(installed), post)


def start_node_lease(node: NodeConfig, files: Mapping[str, Path]) -> Any:
    """The groups parent's ``NodeLease`` (``coordinator:`` of the node's config),
    publishing to each group's file in ``files``."""
    from .etcdclient import NodeLease

    c = node.coordinator
    return NodeLease(etcd_client(node), c.lease_ttl, c.poll_interval, c.prefix, files)


CORE_EVENTS = (EtcdReply,)  # events of a coordinator the daemon routes to the core
