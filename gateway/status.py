"""`nbdgw status`: what a node holds and how far each peer trails, read from disk.

It needs no daemon: every number comes from the files the data path and peerlink keep
(state.json, the journal, peers/<peer>.json, dirty sets), so it also works while nbdkit
and the senders run, and after they died.  Schema of ``--json`` (version 1)::

    {"version": 1, "node": str, "data_dir": str,
     "split_brain": null | {"detected", "node", "epoch", "other_node", "other_epoch",
                            "volumes": {name: {"why", "last_write"}}},
     "role": {"configured": str, "effective": str, "epoch": int},
     "health": null | {...}  (gateway/health.py: level, filesystem, arrays, disks,
                             volumes, problems with what to do, notes),
     "failover": null | {"state": "primary"|"standby"|"witness"|"fenced"|"stale"|...,
                         "epoch", "primary", "auto", "age_s", "peers",
                         "vote": null | {"epoch", "for"}, "lease_s": float,
                         "outdated": [node], "degraded": [node], "campaign": int|null,
                         "quorum_exempt": bool, "beats_rejected": {reason: int},
                         "coordinator": null | {"kind": "etcd", "group", "revision",
                                  "lease", "lease_alive_s", "holder", "holder_epoch",
                                  "served", "members": [node]},
                         "quorum": {"sites": int, "heard": int, "majority": bool},
                         "roles": {node: "primary"|"secondary"|"dr"|"witness"}},
     "volumes": [
      {"name", "size", "role": "primary"|"replica", "in_use", "clean", "inconsistent",
       "upstream_seq", "journal_first_seq", "journal_last_seq", "journal_bytes",
       "resync_extents",
       "generation": {"id": "16 hex digits", "start_seq": int, "count": int} | null,
       "clients": {"nbd": int|null, "iscsi": int|null},  (0 on a replica: not served)
       "upstream": null (a primary volume) | {"source": str|null, "state": "waiting"|
                   "streaming"|"resync"|"stopped", "applied_seq": int, "received_seq":
                   int|null, "lag_records": int|null, "since": float|null,
                   "receiver": "running"|"stopped"|"unknown"},
       "snapshots": {"count": int, "latest": null | {"name", "time"}},
       "diverged": [{"snapshot", "kept": bool, "records": int|null, "bytes": int|null,
                     "unknown": str|null, "new_primary", "from_seq", "through_seq",
                     "basis", "at"}],
       "peers": [
         {"name", "mode": "sync"|"async"|null, "state", "degraded": str|null,
          "acked_seq", "lag_records", "lag_bytes", "lag_seconds", "last_ack_age_s",
          "dirty_extents", "progress": null | {"phase": "compare"|"resync", "done",
          "total", "unit"}, "sender": "running"|"stopped"|"unknown",
          "rate_limit": int|null (the cap in bytes/s in effect now, rate_schedule
                        included; 0 unlimited; null while no sender runs),
          "rpo": null (no bound on the link) | {"seconds": float|null, "bytes": int|null,
                  "exceeded": bool (data_loss_window past either bound)},
          "data_loss_window": {"bytes": int, "seconds": float|null},
          "refused": null | {"reason", "by": "this node"|"peer", "side", "split_brain":
                             bool, "settle": null | [{"keeps", "command"}], "since",
                             "attempts"}}],
       "cdp": null | {"window_seconds", "max_bytes", "bytes_held", "bases": int,
                      "oldest_point": null | {"seq", "time"}, "exports": [str],
                      "pins": [{"owner": "clone-NAME", "seq", "base_seq",
                                "journal_bytes"}],
                      "readers": [{"base_seq", "journal_bytes"}]}}],
     "clones": [{"name", "base": "VOLUME@SNAPSHOT"|"VOLUME@POINT", "point_seq": int|null,
                 "size", "allocated_bytes", "clients": {"nbd": int|null,
                 "iscsi": int|null}}]}

Fields are only ever added within a version (scripts must ignore unknown keys); a
change of meaning or a removal bumps ``version``.  ``clients.nbd`` counts open NBD
connections (the iSCSI bridge's FUSE mount included) and is null when no
nbdkit serves here; ``clients.iscsi`` counts iSCSI sessions, null without a running
bridge.  ``generation`` is the volume's current generation (DESIGN.md §5; ``count``: how
many its history holds).  ``data_loss_window`` is what this node's death would lose
for that peer now: nothing for a sync peer that is not degraded (a write is
acknowledged durable only once the peer has it), else the lag.  ``quorum`` counts this
node and the peers the daemon heard in time (``failover.timeout``); ``roles`` are the
installed roles of this node and its peers (a ``witness`` holds no data: on a witness
``volumes`` is empty and ``vote`` and ``outdated`` are what it stores).

``state`` comes from the sender's live file (``peers/<peer>.live.json``, rewritten every
second while it runs): ``streaming``, ``initial-sync``, ``comparing`` (a peer on an older
generation: digests compared before a resync), ``resync``, ``disconnected``,
``degraded`` (a sync peer acknowledged too late and is treated as async until it caught
up); ``in sync`` when streaming with nothing outstanding.  Without a fresh live file (no
sender running) it is ``resync pending`` when dirty extents wait, else ``disconnected``.
A link whose last handshake was refused (``peers/<peer>.refused.json``, kept by either end
until a handshake succeeds) is ``split brain`` (histories with no common generation, or
forked on one epoch: ``refused.settle`` lists the commands that settle it, either way) or
``refused`` (``refused.reason`` says why, e.g. a stale copy) instead of ``disconnected``;
on a replica its upstream appears among the peers that way.
``diverged`` (``volumes/<V>/diverged.json``): writes this node took that the current
primary lacks, kept in a ``diverged-*`` snapshot after a demotion or a lost fork: how
many records and bytes (null and ``unknown`` saying why when that cannot be told), and
whether the snapshot is still there (``kept``).
``lag_records``/``lag_bytes`` are the journal records (and their bytes on disk) the peer
has not acknowledged: for an asynchronous peer, the data-loss window if this node died
now; ``lag_seconds`` is how long the oldest of them has waited.  ``last_ack_age_s`` is
how long ago the peer last acknowledged anything.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from blockstore.cdp import status as cdp_status
from blockstore.errors import BlockstoreError, FormatError
from blockstore.journal import bytes_after, journal_bounds
from blockstore.meta import read_json
from blockstore.node_state import node_epoch
from blockstore.peers import known_peers, read_dirty, read_refused
from blockstore.volume import VolumeInfo, list_volumes, volume_status

from .config import NodeConfig, RpoConfig
from .nodecore import majority_of
from .rejoin import split_brain

STATUS_VERSION = 1
LAG_SCAN_LIMIT = 1 << 20  # records; beyond it lag_bytes is an estimate from segment sizes


def _lag_bytes(info: VolumeInfo, acked: int, last: int) -> int:
    """Bytes of the journal records after ``acked`` (header and payload)."""
    return bytes_after(info.path / "journal", acked, last, LAG_SCAN_LIMIT)


LIVE_FRESH_S = 5.0  # a live file older than this: its sender is not running


def is_fresh(live: dict[str, Any] | None, now: float) -> bool:
    """A live file written by a sender that runs now."""
    return (live is not None and live["state"] != "stopped"
            and now - float(live["updated"]) < LIVE_FRESH_S)


def live_state(info: VolumeInfo, peer: str, now: float) -> dict[str, Any] | None:
    """The live state of this volume's running sender to ``peer`` (None: none runs)."""
    live = _live(info, peer, now)
    return live if is_fresh(live, now) else None


def upstream_report(info: VolumeInfo, st: dict[str, Any], now: float
                    ) -> dict[str, Any] | None:
    """A replica's link to its source, from its receiver's live file (None: a primary
    volume).  Without a running receiver: the last applied seq from the volume state."""
    if st["role"] != "replica":
        return None
    try:
        live: dict[str, Any] | None = read_json(info.path / "upstream.live.json",
                                                "upstream-live", 1)
    except (FormatError, OSError):
        live = None
    if live is not None and is_fresh(live, now):
        return {"source": live["source"], "state": live["state"],
                "applied_seq": int(live["applied_seq"]),
                "received_seq": int(live["received_seq"]),
                "lag_records": int(live["lag_records"]),
                "since": float(live["since"]), "receiver": "running"}
    return {"source": None if live is None else live.get("source"), "state": "stopped",
            "applied_seq": int(st["upstream_seq"]), "received_seq": None,
            "lag_records": None, "since": None,
            "receiver": "stopped" if live is not None else "unknown"}


def _live(info: VolumeInfo, peer: str, now: float) -> dict[str, Any] | None:
    """The sender's live state, if it is running (fresh file of this incarnation)."""
    try:
        live = read_json(info.path / "peers" / f"{peer}.live.json", "peer-live", 1)
    except (FormatError, OSError):
        return None
    if live.get("volume_uuid") != info.uuid:
        return None
    return live


def _peer_state(lag: int, dirty: int, live: dict[str, Any] | None, fresh: bool,
                refused: dict[str, Any] | None) -> str:
    linked = live is not None and fresh and live["state"] != "disconnected"
    if refused is not None and not linked:
        return "split brain" if refused["split_brain"] else "refused"
    if live is not None and fresh:
        state = str(live["state"])
        if state == "streaming" and lag == 0:
            return "in sync"
        return state
    return "resync pending" if dirty else "disconnected"


def _peer_names(info: VolumeInfo, refused: dict[str, dict[str, Any]]) -> list[str]:
    pdir = info.path / "peers"
    names = set(known_peers(info)) | set(refused)
    if pdir.is_dir():
        names |= {p.name[:-len(".live.json")] for p in pdir.glob("*.live.json")}
    return sorted(names)


def _refusal(rec: dict[str, Any] | None) -> dict[str, Any] | None:
    if rec is None:
        return None
    return {k: rec[k] for k in ("reason", "by", "side", "split_brain", "settle", "since",
                                "attempts")}


def _diverged(info: VolumeInfo, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """diverged.json's entries, each saying whether its snapshot is still there."""
    if not entries:
        return []
    from .snapshots import listing

    try:
        names = {r["name"] for r in listing(info.path.parent.parent, info.name)}
    except (BlockstoreError, OSError):
        names = set()
    return [{k: e.get(k) for k in ("snapshot", "records", "bytes", "unknown",
                                   "new_primary", "from_seq", "through_seq", "basis", "at")}
            | {"kept": e["snapshot"] in names} for e in entries]


def _generation(info: VolumeInfo) -> dict[str, Any] | None:
    from peerlink.handshake import replica_history

    try:
        hist = replica_history(info)
    except (BlockstoreError, OSError, ValueError, KeyError):
        return None
    cur = hist.generations[-1]
    return {"id": f"{cur.gen_id:016x}", "start_seq": cur.start_seq,
            "count": len(hist.generations)}


def _snapshots(info: VolumeInfo) -> dict[str, Any]:
    from .snapshots import listing

    try:
        rows = listing(info.path.parent.parent, info.name)
    except (BlockstoreError, OSError):
        rows = []
    latest = max(rows, key=lambda r: (r["time"], r["id"])) if rows else None
    return {"count": len(rows), "latest": None if latest is None else
            {"name": latest["name"], "time": latest["time"]}}


def volume_report(info: VolumeInfo, now: float) -> dict[str, Any]:
    st = volume_status(info)
    try:
        first, last = journal_bounds(info.path / "journal")
    except (BlockstoreError, OSError):
        first, last = 0, st["last_seq"]
    peers = []
    acks = known_peers(info)
    refusals = read_refused(info)
    for name in _peer_names(info, refusals):
        live = _live(info, name, now)
        acked = acks.get(name, 0)
        updated = None
        with contextlib.suppress(FormatError, OSError, KeyError):
            meta = read_json(info.path / "peers" / f"{name}.json", "peer", 1)
            updated = float(meta["updated"])
        fresh = is_fresh(live, now)
        if live is not None and fresh:
            acked = max(acked, int(live["acked_seq"]))
        dirty = sum(len(d.extents) for d in read_dirty(info, name))
        # A peer known only by its refusal is a replica's upstream: it lacks nothing here.
        lag = max(0, last - acked) if name in acks or live is not None else 0
        age = None if updated is None else round(max(0.0, now - updated), 1)
        lag_s = float(live["lag_seconds"]) if live is not None and fresh else (
            None if lag == 0 or updated is None else round(max(0.0, now - updated), 1))
        peers.append({
            "name": name, "mode": live.get("mode") if live else None,
            "state": _peer_state(lag, dirty, live, fresh, refusals.get(name)),
            "degraded": live.get("degraded") if live and fresh else None,
            "acked_seq": acked, "lag_records": lag,
            "lag_bytes": _lag_bytes(info, acked, last) if lag else 0,
            "lag_seconds": 0.0 if lag == 0 else lag_s, "last_ack_age_s": age,
            "dirty_extents": dirty,
            "progress": live.get("progress") if live and fresh else None,
            "sender": "running" if fresh else ("stopped" if live is not None else "unknown"),
            "rate_limit": live.get("rate_limit") if live and fresh else None,
            "refused": _refusal(refusals.get(name))})
        p = peers[-1]
        safe = p["mode"] == "sync" and not p["degraded"] and p["state"] != "disconnected"
        p["data_loss_window"] = {"bytes": 0 if safe else p["lag_bytes"],
                                 "seconds": 0.0 if safe else p["lag_seconds"]}
        p["rpo"] = None  # node_report fills it in from the config's bounds
    return {
        "name": info.name, "size": info.size, "role": st["role"], "in_use": st["in_use"],
        "clean": st["clean"], "inconsistent": st["inconsistent"],
        "upstream_seq": st["upstream_seq"], "journal_first_seq": first,
        "journal_last_seq": last, "journal_bytes": st["journal_bytes"],
        "resync_extents": st["resync_extents"], "generation": _generation(info),
        "clients": ({"nbd": None, "iscsi": None} if st["role"] != "replica"
                    else {"nbd": 0, "iscsi": 0}),  # a replica is not served
        "upstream": upstream_report(info, st, now),
        "snapshots": _snapshots(info),
        "diverged": _diverged(info, st["diverged"]), "peers": peers,
        "cdp": _cdp(info),
    }


def _cdp(info: VolumeInfo) -> dict[str, Any] | None:
    """The volume's CDP window here (blockstore/cdp.py), None without one."""
    try:
        return cdp_status(info.path)
    except (BlockstoreError, OSError):
        return None


def failover_report(data_dir: Path, now: float) -> dict[str, Any] | None:
    """The daemon's failover state (run/failover.json), if a daemon has run here."""
    try:
        st = read_json(data_dir / "run" / "failover.json", "failover", 1)
    except (FormatError, OSError):
        return None
    return {"state": st["state"], "epoch": st["epoch"], "primary": st["primary"],
            "auto": st["auto"], "age_s": round(max(0.0, now - float(st["updated"])), 1),
            "peers": st.get("peers", {}),
            # The node core's view (gateway/nodecore.py): its last vote, the write lease
            # left, sync peers marked outdated (they cannot be elected until caught up),
            # heartbeats refused by reason.
            "vote": st.get("vote"), "lease_s": st.get("lease_s"),
            "outdated": st.get("outdated", []), "degraded": st.get("degraded", []),
            "campaign": st.get("campaign"), "quorum_exempt": st.get("quorum_exempt", False),
            "beats_rejected": st.get("beats_rejected", {}),
            # coordinator.kind etcd (gateway/etcdcore.py): the group, this node's lease,
            # the key's holder; None with heartbeats.
            "coordinator": st.get("coordinator")}


def rpo_state(window: dict[str, Any], bound: RpoConfig | None) -> dict[str, Any] | None:
    """A peer's data-loss window against its link's ``rpo`` bounds (None: no bound)."""
    if bound is None or (bound.seconds is None and bound.bytes is None):
        return None
    over_s = (bound.seconds is not None and window["seconds"] is not None
              and window["seconds"] > bound.seconds)
    over_b = bound.bytes is not None and window["bytes"] > bound.bytes
    return {"seconds": bound.seconds, "bytes": bound.bytes, "exceeded": over_s or over_b}


def node_report(node: str, data_dir: Path, cfg: NodeConfig | None = None,
                live: bool = True) -> dict[str, Any]:
    """The whole report; with ``cfg``, also the roles, the quorum view and (``live``)
    the clients connected, asked from the serving nbdkit and tgtd."""
    now = time.time()
    fo = failover_report(data_dir, now)
    report: dict[str, Any] = {
        "version": STATUS_VERSION, "node": node, "data_dir": str(data_dir), "role": None,
        "health": None,
        "failover": fo, "split_brain": split_brain(data_dir),
        "volumes": [volume_report(v, now) for v in list_volumes(data_dir)],
        "clones": clones_report(data_dir)}
    if cfg is None:
        return report
    from . import nodestate

    for v in report["volumes"]:
        for p in v["peers"]:
            peer = cfg.peer(p["name"])
            p["rpo"] = rpo_state(p["data_loss_window"], peer.rpo if peer else None)
    report["role"] = {"configured": cfg.role.value,
                      "effective": nodestate.effective_config(cfg).role.value,
                      "epoch": node_epoch(data_dir)}
    if fo is not None:
        stale = fo["age_s"] > LIVE_FRESH_S
        heard = 0 if stale else sum(
            1 for v in fo["peers"].values() if v["heard_s_ago"] < cfg.failover.timeout)
        sites = 1 + len(cfg.peers)
        fo["quorum"] = {"sites": sites, "heard": 0 if stale else 1 + heard,
                        "majority": not stale and 1 + heard >= majority_of(sites)}
        co = fo["coordinator"]
        if co is not None:  # etcd's quorum decides: this node's lease is alive in it
            members = len(co.get("members", []))
            fo["quorum"] = {"sites": sites, "heard": 0 if stale else members,
                            "majority": not stale and co.get("lease_alive_s", 0) > 0}
        fo["roles"] = {cfg.name: cfg.role.value,
                       **{p.name: p.role.value for p in cfg.peers}}
    if live:
        from . import health
        from .live import io_stats, iscsi_sessions

        report["health"] = health.check(cfg.with_overrides(data_dir=data_dir)).to_json()

        io = io_stats(data_dir)
        iscsi = iscsi_sessions(cfg.with_overrides(data_dir=data_dir))
        for v in report["volumes"]:
            if io is not None:
                v["clients"]["nbd"] = int(io.get(v["name"], {}).get("connections", 0))
            if iscsi is not None:
                v["clients"]["iscsi"] = iscsi.get(v["name"], 0)
        for c in report["clones"]:
            if io is not None:
                c["clients"]["nbd"] = int(io.get(c["name"], {}).get("connections", 0))
            if iscsi is not None:
                c["clients"]["iscsi"] = iscsi.get(c["name"], 0)
    return report


def clones_report(data_dir: Path) -> list[dict[str, Any]]:
    """This node's clones (blockstore/clone.py): base, the point's seq for a clone of
    a CDP point (its history is pinned: the volume's ``cdp.pins``), space written."""
    from blockstore.clone import allocated_bytes, list_clones

    try:
        clones = list_clones(data_dir)
    except (BlockstoreError, OSError):
        return []
    return [{"name": c.name, "base": f"{c.volume}@{c.snapshot}", "point_seq": c.point_seq,
             "size": c.size, "allocated_bytes": allocated_bytes(c.data),
             "clients": {"nbd": None, "iscsi": None}} for c in clones]


def replica_line(v: dict[str, Any]) -> str:
    """What a replica volume's line adds: consistency and its link to the source."""
    u = v.get("upstream") or {}
    applied = u.get("applied_seq", v["upstream_seq"])
    line = (" INCONSISTENT" if v["inconsistent"] else " consistent") + \
        f", applied upstream seq {applied}"
    if u.get("receiver") == "running":
        return line + (f", from {u['source'] or 'nobody yet'} ({u['state']}, received "
                       f"{u['received_seq']}, lag {u['lag_records']} records)")
    return line + ", receiver not running"


def render_text(report: dict[str, Any]) -> list[str]:
    """Plain lines (the CLI adds colour on a terminal)."""
    out = [f"node {report['node']}  data_dir {report['data_dir']}"]
    role = report.get("role")
    if role:
        out[0] += (f"  role {role['effective']}" + (f" (configured {role['configured']})"
                   if role["configured"] != role["effective"] else "")
                   + f", epoch {role['epoch']}")
    out += failover_lines(report)
    out += health_lines(report)
    sb = report.get("split_brain")
    if sb is not None:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sb["detected"]))
        out.append(f"SPLIT BRAIN since {since}: {sb['other_node']} serves epoch "
                   f"{sb['other_epoch']}, this node (epoch {sb['epoch']}) took writes it "
                   f"lacks; nothing syncs until 'nbdgw resolve --discard NODE'")
        for name, v in sorted(sb["volumes"].items()):
            last = ("" if v.get("last_write") is None else ", last write here " +
                    time.strftime("%H:%M:%S", time.localtime(v["last_write"])))
            out.append(f"  volume {name}: {v['why']}{last}")
    if not report["volumes"]:
        out.append("  no volumes")
    for v in report["volumes"]:
        role = v["role"]
        if role == "replica":
            role += replica_line(v)
        out.append(f"volume {v['name']}: {v['size']} bytes, {role}, "
                   f"{'in use' if v['in_use'] else 'idle'}, journal seq "
                   f"{v['journal_first_seq']}..{v['journal_last_seq']} "
                   f"({v['journal_bytes']} bytes)")
        out.append("  " + volume_extras(v))
        out += [f"  {line}" for line in diverged_lines(v)]
        for p in v["peers"]:
            age = "never" if p["last_ack_age_s"] is None else f"{p['last_ack_age_s']} s ago"
            mode = f" ({p['mode']})" if p["mode"] else ""
            lag_s = "" if p["lag_seconds"] is None else f" / {p['lag_seconds']} s"
            line = (f"  peer {p['name']}{mode}: {p['state']}, acked seq {p['acked_seq']}, "
                    f"lag {p['lag_records']} records / {p['lag_bytes']} bytes{lag_s}, "
                    f"last ack {age}")
            if p["degraded"]:
                line += f", degraded: {p['degraded']}"
            pr = p.get("progress")
            if pr:
                line += (f", {pr['phase']} {pr['done']}/{pr['total']} {pr['unit']} "
                         f"({100 * pr['done'] // max(1, pr['total'])}%)")
            if p["dirty_extents"]:
                line += f", {p['dirty_extents']} extents to resync"
            line += peer_extras(p)
            out.append(line)
            out += [f"    {line}" for line in refusal_lines(p)]
        if role == "primary" and not v["peers"]:
            out.append("  no peer has connected yet")
    return out


def health_lines(report: dict[str, Any]) -> list[str]:
    """The store's health in a few lines (gateway/health.py; `nbdgw health` has it all)."""
    from .health import summary_lines

    h = report.get("health")
    return [] if h is None else summary_lines(h)


def volume_extras(v: dict[str, Any]) -> str:
    """Clients, snapshots and generation of one volume, as one line."""
    c = v.get("clients") or {}
    nbd = "?" if c.get("nbd") is None else c["nbd"]
    parts = [f"clients: {nbd} NBD"
             + ("" if c.get("iscsi") is None else f", {c['iscsi']} iSCSI")]
    sn = v.get("snapshots") or {"count": 0, "latest": None}
    latest = sn["latest"]
    parts.append(f"snapshots: {sn['count']}" + ("" if latest is None else
                 f", latest {latest['name']} at "
                 + time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(latest["time"]))))
    g = v.get("generation")
    if g is not None:
        parts.append(f"generation {g['id']} from seq {g['start_seq']}")
    return "; ".join(parts)


def diverged_lines(v: dict[str, Any]) -> list[str]:
    """One line per diverged.json entry: what the current primary lacks, and where it is."""
    out = []
    for d in v.get("diverged") or []:
        where = (f"kept in snapshot {d['snapshot']}" if d["kept"] else
                 f"snapshot {d['snapshot']} deleted since")
        if d["records"] is None:
            out.append(f"an unknown number of acknowledged writes not on {d['new_primary']} "
                       f"({d['unknown']}): {where}")
        else:
            out.append(f"{d['records']} records ({d['bytes']} bytes) of acknowledged writes "
                       f"not on {d['new_primary']}: {where}")
    return out


def refusal_lines(p: dict[str, Any]) -> list[str]:
    """Why a link is refused and, for a split brain, the commands that settle it."""
    r = p.get("refused")
    if r is None:
        return []
    who = "refused by the peer" if r["by"] == "peer" else "refused here"
    n = r["attempts"]
    out = [f"{who} ({n} attempt{'' if n == 1 else 's'} since "
           f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r['since']))}): "
           f"{r['reason']}"]
    if r["split_brain"]:
        out.append("SPLIT BRAIN: nothing syncs until one side's writes are discarded (kept "
                   "as its diverged-* snapshot); on either node: " + "; or ".join(
                       f"'{c['command']}' keeps {c['keeps']}'s data"
                       for c in r["settle"] or []))
    return out


def failover_lines(report: dict[str, Any]) -> list[str]:
    """The daemon's failover view: state, peers heard (a witness so named), quorum; on a
    witness, what it stores (its last vote and the outdated marks)."""
    fo = report.get("failover")
    if fo is None:
        return []
    stale = f" (daemon silent for {fo['age_s']} s)" if fo["age_s"] > 5 else ""
    roles = fo.get("roles") or {}
    heard = ", ".join(f"{p}{' (witness)' if roles.get(p) == 'witness' else ''} "
                      f"{v['heard_s_ago']} s ago" for p, v in
                      sorted(fo["peers"].items())) or "no peer heard"
    # With etcd no heartbeats are exchanged: etcd's line (quorum_lines) says instead.
    heard_part = "" if fo.get("coordinator") else f"; heard: {heard}"
    out = [f"failover: {fo['state']}, epoch {fo['epoch']}, primary "
           f"{fo['primary']}{stale}{heard_part}"]
    out += quorum_lines(fo)
    if roles.get(report["node"]) == "witness":
        out += witness_lines(fo)
    return out


def witness_lines(fo: dict[str, Any]) -> list[str]:
    """A witness stores only its votes and the outdated marks it recorded."""
    v = fo.get("vote")
    vote = "none yet" if not v else f"epoch {v['epoch']} for {v['for'] or 'nobody'}"
    marks = ", ".join(fo.get("outdated") or []) or "none"
    return [f"witness: holds no data; last vote {vote}; outdated marks: {marks}"]


def quorum_lines(fo: dict[str, Any]) -> list[str]:
    q = fo.get("quorum")
    if q is None or not fo["auto"]:
        return []
    co = fo.get("coordinator")
    if co is not None:
        return [f"etcd: group {co['group']}, key held by {co['holder'] or 'nobody'} "
                f"(epoch {co['holder_epoch']}); this node's lease "
                + ("alive" if q["majority"] else "LOST") + f"; {q['heard']} of {q['sites']}"
                " sites have a record in etcd"]
    return [f"quorum: {q['heard']} of {q['sites']} sites, "
            + ("majority" if q["majority"] else "NO MAJORITY")]


def peer_extras(p: dict[str, Any]) -> str:
    win = p.get("data_loss_window")
    return "" if win is None else f", data-loss window {win['bytes']} bytes"
