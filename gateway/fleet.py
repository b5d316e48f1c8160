"""`nbdgw fleet status`: every volume group in etcd, from any node or an admin host.

Reads ``<prefix>/groups/`` once (one linearizable range read: a consistent picture at
one revision) and, for each group's holder, how long its lease has left.  Per group: its
primary (node, epoch, lease, seconds left), the epoch last taken and last served, the
outdated marks, a pending handover, and what each member says of itself (state,
consistent, the epoch of its data).  Needs ``coordinator.kind: etcd`` in the config.
"""

from __future__ import annotations

from typing import Any

from .config import NodeConfig
from .errors import ConfigError
from .etcdclient import EtcdClient, EtcdUnavailable, Tls
from .etcdcore import KV, group_prefix, groups_prefix, parse_group


def client_of(cfg: NodeConfig) -> EtcdClient:
    c = cfg.coordinator
    if not c.endpoints:
        raise ConfigError("fleet: the config has no coordinator.endpoints (coordinator.kind "
                          "etcd names the fleet's etcd cluster)")
    return EtcdClient(c.endpoints, Tls(c.ca_file, c.cert_file, c.key_file))


def fleet_status(cfg: NodeConfig) -> dict[str, Any]:
    client = client_of(cfg)
    prefix = cfg.coordinator.prefix
    revision, kvs = client.get_prefix(groups_prefix(prefix))
    by_group: dict[str, list[KV]] = {}
    root = groups_prefix(prefix)
    for kv in kvs:
        name = kv.key[len(root):].split("/", 1)[0]
        by_group.setdefault(name, []).append(kv)
    groups = []
    for name in sorted(by_group):
        v = parse_group(group_prefix(prefix, name), revision, tuple(by_group[name]))
        p = v.primary
        ttl = None
        if p is not None and p.lease:
            try:
                ttl = client.lease_ttl(p.lease)
            except EtcdUnavailable:
                ttl = None
        groups.append({
            "group": name,
            "primary": None if p is None else {
                "node": p.node, "epoch": p.epoch, "lease": f"{p.lease:x}",
                "lease_ttl_s": ttl, "revision": p.mod_revision},
            "epoch": v.state.epoch, "served_epoch": v.state.served,
            "outdated": sorted(v.state.outdated),
            "handover": None if v.handover is None else {"from": v.handover.frm,
                                                         "to": v.handover.to},
            "members": {m: dict(d) for m, d in sorted(v.members.items())},
        })
    return {"kind": "fleet", "version": 1, "revision": revision, "prefix": prefix,
            "endpoints": list(cfg.coordinator.endpoints), "groups": groups}


def render(report: dict[str, Any]) -> str:
    lines = [f"fleet at etcd revision {report['revision']} ({report['prefix']}): "
             f"{len(report['groups'])} group(s)"]
    for g in report["groups"]:
        p = g["primary"]
        prim = ("no primary" if p is None else
                f"primary {p['node']} on epoch {p['epoch']} (lease {p['lease']}, "
                f"{p['lease_ttl_s']} s left, revision {p['revision']})")
        lines.append(f"group {g['group']}: {prim}; served epoch {g['served_epoch']}"
                     + (f"; outdated {', '.join(g['outdated'])}" if g["outdated"] else "")
                     + (f"; handover {g['handover']['from']} -> {g['handover']['to']}"
                        if g["handover"] else ""))
        for m, d in g["members"].items():
            lines.append(f"  {m}: {d.get('state')} ({d.get('role')}), "
                         f"{'consistent' if d.get('consistent') else 'NOT consistent'}, "
                         f"data of epoch {d.get('data_epoch')}")
    return "\n".join(lines)
