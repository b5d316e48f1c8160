"""`nbdgw fleet status`: every volume group in etcd, from any node or an admin host.

Reads ``<prefix>/groups/`` once (one linearizable range read: a consistent picture at
one revision) and, for each group's holder, how long its lease has left.  Per group: its
primary (node, epoch, lease, seconds left), the epoch last taken and last served, the
outdated marks, a pending handover, and what each member says of itself (state,
consistent, the epoch of its data).  Needs ``coordinator.kind: etcd`` in the config.

`nbdgw fleet events`: what changed, derived from etcd's history (a watch of the groups
from a revision; ``derive_events`` is pure).  `nbdgw fleet place`: the desired placement
recorded in etcd, the primary moved by a switchover asked through etcd (the group's
primary answers it: gateway/etcdcore.py), and the config changes etcd cannot make named.
Every write is one transaction comparing what was read.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from nbdgw_common.errors import GatewayError

from .config import NodeConfig
from .errors import ConfigError
from .etcdclient import EtcdClient, EtcdUnavailable, Tls, b64, prefix_end, unb64
from .etcdcore import KV, Cmp, GroupView, Put, Txn, group_prefix, groups_prefix, parse_group


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


# -- `nbdgw fleet events`: what changed, from etcd's history ---------------------------------


@dataclass(frozen=True)
class Change:
    """One key's change in etcd's history (a watch event): ``value`` is the new value of
    a put, ``prev`` the value before (None: absent, or its revision was compacted)."""

    revision: int
    key: str  # under the groups prefix: "<group>/primary", "<group>/members/<node>" ...
    deleted: bool
    value: str | None = None
    prev: str | None = None


@dataclass(frozen=True)
class FleetEvent:
    revision: int
    group: str
    what: str  # one of WHATS
    node: str | None
    text: str

    def as_dict(self) -> dict[str, Any]:
        return {"revision": self.revision, "group": self.group, "what": self.what,
                "node": self.node, "text": self.text}


WHATS: Final = ("taken", "handed_over", "released", "lost", "rebound", "handover_withdrawn",
                "outdated", "in_sync", "served", "member", "member_gone", "placement",
                "switchover_requested", "switchover_answered")


def _obj(text: str | None) -> dict[str, Any]:
    try:
        v = json.loads(text) if text else {}
    except ValueError:
        return {}
    return v if isinstance(v, dict) else {}


def derive_events(changes: Sequence[Change]) -> list[FleetEvent]:
    """The fleet's events in ``changes`` (in revision order).  The changes of one
    revision are read together: one transaction deletes ``primary`` and writes
    ``handover`` (a switchover), and the expiry of a lease deletes every key bound to
    it at once (``primary`` with ``members/<holder>``: the holder was lost, where its
    own delete alone means it released the key).  Rewrites that change nothing a
    reader cares about (a member's periodic record) are no events."""
    by_rev: dict[tuple[int, str], dict[str, Change]] = {}
    for c in changes:
        group, _, name = c.key.partition("/")
        by_rev.setdefault((c.revision, group), {})[name] = c
    out: list[FleetEvent] = []
    for (rev, group), keys in sorted(by_rev.items()):
        out += _revision_events(rev, group, keys)
    return out


def _revision_events(rev: int, group: str, keys: Mapping[str, Change]) -> list[FleetEvent]:
    out: list[FleetEvent] = []

    def ev(what: str, node: str | None, text: str) -> None:
        out.append(FleetEvent(rev, group, what, node, text))

    p, h = keys.get("primary"), keys.get("handover")
    if p is not None:
        _primary_events(p, h, keys, ev)
    elif h is not None and h.deleted:
        old = _obj(h.prev)
        ev("handover_withdrawn", old.get("from"),
           f"handover from {old.get('from', '?')} to {old.get('to', '?')} withdrawn "
           "(the target did not take over, or the old primary's lease ended)")
    s = keys.get("state")
    if s is not None and not s.deleted:
        _state_events(_obj(s.prev), _obj(s.value), ev)  # prev None: created, or compacted
    for name, c in sorted(keys.items()):
        if name.startswith("members/"):
            _member_events(name[len("members/"):], c, ev)
    pl = keys.get("placement")
    if pl is not None and not pl.deleted:
        v = _obj(pl.value)
        ev("placement", v.get("primary"),
           f"placement recorded: primary {v.get('primary')}, replicas "
           f"{', '.join(v.get('replicas', [])) or 'none'} (by {v.get('by', '?')})")
    sw = keys.get("switchover")
    if sw is not None and not sw.deleted:
        v = _obj(sw.value)
        if "answer" in v:
            ev("switchover_answered", v.get("to"),
               f"switchover to {v.get('to')}: {v['answer']}")
        else:
            ev("switchover_requested", v.get("to"),
               f"switchover to {v.get('to')} requested (by {v.get('by', '?')})")
    return out


def _primary_events(p: Change, h: Change | None, keys: Mapping[str, Change],
                    ev: Callable[[str, str | None, str], None]) -> None:
    if not p.deleted:
        v = _obj(p.value)
        node, epoch = v.get("node", "?"), v.get("epoch", "?")
        if p.prev is not None and _obj(p.prev).get("node") == node:
            ev("rebound", node, f"{node} keeps the primary key on epoch {epoch} "
                                "(rebound to a new lease after a restart)")
        elif h is not None and h.deleted:
            ev("taken", node, f"{node} took the primary key on epoch {epoch} (switchover "
                              f"from {_obj(h.prev).get('from', '?')})")
        else:
            ev("taken", node, f"{node} took the primary key on epoch {epoch}")
        return
    old = _obj(p.prev).get("node", "?")
    if h is not None and not h.deleted:
        ev("handed_over", old, f"{old} handed the group over to {_obj(h.value).get('to')}")
    elif f"members/{old}" in keys and keys[f"members/{old}"].deleted:
        ev("lost", old, f"{old} lost the primary key (its etcd lease ended)")
    else:
        ev("released", old, f"{old} released the primary key")


def _state_events(old: Mapping[str, Any], new: Mapping[str, Any],
                  ev: Callable[[str, str | None, str], None]) -> None:
    was, now = set(old.get("outdated", [])), set(new.get("outdated", []))
    for node in sorted(now - was):
        ev("outdated", node, f"{node} marked outdated (the primary went on without it)")
    for node in sorted(was - now):
        ev("in_sync", node, f"{node} caught up: outdated mark cleared")
    if old and new.get("served") != old.get("served"):  # (old unknown: not a change)
        ev("served", None, f"epoch {new.get('served')} served (a primary held a write "
                           "lease on it)")


def _member_events(node: str, c: Change, ev: Callable[[str, str | None, str], None]) -> None:
    if c.deleted:
        ev("member_gone", node, f"{node}'s record is gone (its lease ended)")
        return
    old, new = _obj(c.prev), _obj(c.value)
    said = ("state", "consistent", "data_epoch")
    if c.prev is not None and all(old.get(k) == new.get(k) for k in said):
        return
    ev("member", node, f"{node}: {old.get('state', 'absent')} -> {new.get('state')}"
                       f"{'' if new.get('consistent') else ', NOT consistent'}, data of "
                       f"epoch {new.get('data_epoch')}")


QUIET: Final = 1.0  # s without a watch answer: the history up to now has been sent


@dataclass(frozen=True)
class Compacted:
    """etcd no longer has the history before ``revision`` (compacted): the watch goes
    on from there."""

    revision: int


def watch_changes(client: EtcdClient, root: str, since: int, follow: bool,
                  quiet: float = QUIET) -> Iterator[list[Change] | Compacted]:
    """The changes under ``root`` from revision ``since`` on, through the JSON
    gateway's watch (a stream of JSON lines), one list per answer of etcd (an answer
    holds whole revisions).  Without ``follow`` it ends at the
    revision current when the watch was created, or when etcd sent nothing for
    ``quiet`` seconds (etcd sends the stored history at once; the keys of the groups
    may have last changed before that revision).  A compacted ``since`` yields
    ``Compacted`` and goes on from the oldest revision etcd keeps."""
    while True:
        end = 0
        compacted = 0
        for line in _watch_lines(client, root, since, None if follow else quiet):
            r = line.get("result", {})
            if r.get("created"):
                end = int(r.get("header", {}).get("revision", 0))
                continue
            if r.get("compact_revision"):
                compacted = int(r["compact_revision"])
                break
            batch = [change(e, root) for e in r.get("events", [])]
            if batch:
                yield batch
            if not follow and batch and batch[-1].revision >= end:
                return
        if not compacted:
            return
        yield Compacted(compacted)
        since = compacted


def change(e: Mapping[str, Any], root: str) -> Change:
    """A watch event of etcd's JSON gateway as a ``Change`` (a put has no ``type``)."""
    kv, prev = e.get("kv", {}), e.get("prev_kv")
    deleted = e.get("type") == "DELETE"
    return Change(int(kv.get("mod_revision", 0)), unb64(kv.get("key", ""))[len(root):],
                  deleted, None if deleted else unb64(kv.get("value", "")),
                  None if prev is None else unb64(prev.get("value", "")))


def _watch_lines(client: EtcdClient, root: str, since: int,
                 quiet: float | None) -> Iterator[dict[str, Any]]:
    """The watch's answers, one JSON object each, from the first endpoint that takes
    it; ends quietly after ``quiet`` seconds without one (None: never)."""
    body = {"create_request": {"key": b64(root), "range_end": prefix_end(root),
                               "start_revision": str(since), "prev_kv": True}}
    errors = []
    for url, c in zip(client.endpoints, client.clients, strict=True):
        try:
            resp = c.session.post(c.get_url("watch"), json=body, stream=True,
                                  timeout=(c.timeout, quiet))
        except OSError as e:  # requests' errors are OSErrors (requests is etcd3gw's)
            errors.append(f"{url}: {type(e).__name__}")
            continue
        with resp:
            try:
                for raw in resp.iter_lines():
                    if raw:
                        yield json.loads(raw)
            except OSError as e:  # requests' ConnectionError: a read timed out, or etcd left
                if quiet is None:
                    raise EtcdUnavailable(f"{url}: the watch ended ({type(e).__name__})") \
                        from None
                return
        return
    raise EtcdUnavailable("no etcd endpoint answered: " + "; ".join(errors))


def fleet_events(cfg: NodeConfig, since: int | None,
                 follow: bool) -> Iterator[FleetEvent | Compacted]:
    """The fleet's events from revision ``since`` (default: the oldest etcd keeps, or
    with ``follow`` the next one), each answer of etcd's as it comes."""
    client = client_of(cfg)
    root = groups_prefix(cfg.coordinator.prefix)
    if since is None:
        since = client.get_prefix(root)[0] + 1 if follow else 1
    for c in watch_changes(client, root, since, follow):
        if isinstance(c, Compacted):
            yield c
        else:
            yield from derive_events(c)


def render_event(e: FleetEvent | Compacted) -> str:
    if isinstance(e, Compacted):
        return (f"etcd compacted its history before revision {e.revision}: older events "
                "are gone; from there on")
    return f"revision {e.revision} group {e.group}: {e.text}"


# -- `nbdgw fleet place`: where a group runs ---------------------------------------------

PLACE_POLL: Final = 0.5  # s between reads while the switchover is under way


class PlaceError(GatewayError):
    """The placement was not recorded, or the switchover was refused or did not end."""


def place(cfg: NodeConfig, group: str, primary: str, replicas: Sequence[str],
          timeout: float) -> dict[str, Any]:
    """Record the desired placement (``placement``, compared on the revision read),
    move the primary by a switchover asked through etcd, and say which node configs
    must change: etcd cannot start or stop a group on a node (its config does)."""
    client = client_of(cfg)
    keys = group_prefix(cfg.coordinator.prefix, group)
    revision, kvs = client.get_prefix(keys)
    view = parse_group(keys, revision, kvs)
    value = json.dumps({"primary": primary, "replicas": sorted(replicas),
                        "by": socket.gethostname(), "at": int(time.time())}, sort_keys=True)
    ok, rev, _ = client.txn(Txn((compare_as_read(keys + "placement", kvs),),
                                (Put(keys + "placement", value),), keys), 0)
    if not ok:
        raise PlaceError(f"the placement of {group} changed since revision {revision}: "
                         "run again")
    report: dict[str, Any] = {"group": group, "placement_revision": rev,
                              "primary": primary, "replicas": sorted(replicas),
                              **config_changes(view, primary, replicas)}
    report["switchover"] = switch_primary(client, keys, kvs, view, primary, timeout)
    report["placed"] = not report["switchover"].startswith("none: no")
    return report


def compare_as_read(key: str, kvs: Sequence[KV]) -> Cmp:
    """``key`` is as read: the same mod_revision, or still absent."""
    kv = next((kv for kv in kvs if kv.key == key), None)
    return Cmp(key, "create", 0) if kv is None else Cmp(key, "mod", kv.mod_revision)


def config_changes(view: GroupView, primary: str, replicas: Sequence[str]) -> dict[str, Any]:
    """Which nodes must get the group in their config, and which must drop it, from the
    members that run it now (their live records; a witness holds no data: left out)."""
    running = {m for m, d in view.members.items() if d.get("role") != "witness"}
    wanted = {primary, *replicas}
    return {"known": view.state.mod_revision != 0,
            "add_to_config": sorted(wanted - running),
            "remove_from_config": sorted(running - wanted)}


def switch_primary(client: EtcdClient, keys: str, kvs: Sequence[KV], view: GroupView,
                   to: str, timeout: float) -> str:
    """Ask the group's primary, through etcd, to switch over to ``to``, and wait until
    ``to`` holds ``primary`` (or the ask is refused, or ``timeout`` + 60 s pass).  What
    it did, "none: no ..." when there was no primary to move."""
    p = view.primary
    if p is None:
        return ("none: the group has no primary now" if view.state.mod_revision else
                "none: no node runs the group yet")
    if p.node == to:
        return f"none: {to} is the primary already"
    a = view.ask
    if a is not None and a.answer is None and (a.frm, a.epoch) == (p.node, p.epoch):
        raise PlaceError(f"a switchover to {a.to} is asked of {a.frm} and not answered yet")
    ask = json.dumps({"to": to, "from": p.node, "epoch": p.epoch, "timeout": timeout,
                      "by": socket.gethostname()}, sort_keys=True)
    ok, _, _ = client.txn(Txn((Cmp(keys + "primary", "mod", p.mod_revision),
                               compare_as_read(keys + "switchover", kvs)),
                              (Put(keys + "switchover", ask),), keys), 0)
    if not ok:
        raise PlaceError(f"the group changed since revision {view.revision} (its primary "
                         "or a switchover): run again")
    deadline = time.monotonic() + timeout + 60
    while time.monotonic() < deadline:
        time.sleep(PLACE_POLL)
        now = parse_group(keys, *client.get_prefix(keys))
        if now.primary is not None and now.primary.node == to:
            return f"{p.node} -> {to} on epoch {now.primary.epoch}"
        answer = now.ask.answer if now.ask is not None else None
        if answer is not None and answer.startswith("refused"):
            raise PlaceError(f"switchover {p.node} -> {to} {answer}")
    raise PlaceError(f"switchover {p.node} -> {to}: {to} did not take the primary key "
                     f"within {timeout + 60:.0f} s (see 'nbdgw fleet events')")


def render_place(r: dict[str, Any]) -> list[str]:
    lines = [f"placement of {r['group']} recorded at revision {r['placement_revision']}: "
             f"primary {r['primary']}, replicas {', '.join(r['replicas']) or 'none'}",
             f"switchover: {r['switchover']}"]
    if not r["known"]:
        lines.append(f"no node runs {r['group']}: etcd cannot start it")
    for node in r["add_to_config"]:
        lines.append(f"config needed: add group {r['group']} to {node}'s config and reload "
                     "it")
    for node in r["remove_from_config"]:
        lines.append(f"config needed: remove group {r['group']} from {node}'s config and "
                     "reload it")
    return lines
