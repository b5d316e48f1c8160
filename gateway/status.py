"""`nbdgw status`: what a node holds and how far each peer trails, read from disk.

It needs no daemon: every number comes from the files the data path and peerlink keep
(state.json, the journal, peers/<peer>.json, dirty sets), so it also works while nbdkit
and the senders run, and after they died.  Schema of ``--json`` (version 1)::

    {"version": 1, "node": str, "data_dir": str, "volumes": [
      {"name", "size", "role": "primary"|"replica", "in_use", "clean", "inconsistent",
       "upstream_seq", "journal_first_seq", "journal_last_seq", "journal_bytes",
       "resync_extents", "peers": [
         {"name", "acked_seq", "lag_records", "lag_bytes", "last_ack_age_s",
          "dirty_extents", "state": "in sync"|"streaming"|"stalled"|"resync pending"}]}]}

``lag_records``/``lag_bytes`` are the journal records (and their bytes on disk) the peer
has not acknowledged: for an asynchronous peer, the data-loss window if this node died
now.  ``last_ack_age_s`` is how long ago the peer last acknowledged anything.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from blockstore.errors import BlockstoreError, FormatError
from blockstore.journal import record_headers
from blockstore.meta import read_json
from blockstore.peers import known_peers, read_dirty
from blockstore.record import REC_HEADER_SIZE
from blockstore.volume import VolumeInfo, list_volumes, volume_status
from peerlink.sender import journal_bounds

STATUS_VERSION = 1
STALLED_AFTER_S = 5.0
LAG_SCAN_LIMIT = 1 << 20  # records; beyond it lag_bytes is an estimate from segment sizes


def _lag_bytes(info: VolumeInfo, acked: int, last: int) -> int:
    """Bytes of the journal records after ``acked`` (header and payload)."""
    if last <= acked:
        return 0
    jdir = info.path / "journal"
    segs = sorted((int(p.name[4:20], 16), p) for p in jdir.glob("seg-*.jnl"))
    total = 0
    for i, (first, path) in enumerate(segs):
        end = segs[i + 1][0] - 1 if i + 1 < len(segs) else last
        if end <= acked:
            continue
        if last - acked > LAG_SCAN_LIMIT:
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
            continue
        with contextlib.suppress(FileNotFoundError, FormatError):
            for hdr in record_headers(path, first, end):
                if hdr.seq > acked:
                    total += REC_HEADER_SIZE + hdr.payload_len
    return total


def _peer_state(lag: int, age: float | None, dirty: int) -> str:
    if dirty:
        return "resync pending"
    if lag == 0:
        return "in sync"
    if age is not None and age < STALLED_AFTER_S:
        return "streaming"
    return "stalled"


def volume_report(info: VolumeInfo, now: float) -> dict[str, Any]:
    st = volume_status(info)
    try:
        first, last = journal_bounds(info.path / "journal")
    except (BlockstoreError, OSError):
        first, last = 0, st["last_seq"]
    peers = []
    for name, acked in sorted(known_peers(info).items()):
        updated = None
        with contextlib.suppress(FormatError, OSError, KeyError):
            meta = read_json(info.path / "peers" / f"{name}.json", "peer", 1)
            updated = float(meta["updated"])
        dirty = sum(len(d.extents) for d in read_dirty(info, name))
        lag = max(0, last - acked)
        age = None if updated is None else round(max(0.0, now - updated), 1)
        peers.append({"name": name, "acked_seq": acked, "lag_records": lag,
                      "lag_bytes": _lag_bytes(info, acked, last), "last_ack_age_s": age,
                      "dirty_extents": dirty, "state": _peer_state(lag, age, dirty)})
    return {
        "name": info.name, "size": info.size, "role": st["role"], "in_use": st["in_use"],
        "clean": st["clean"], "inconsistent": st["inconsistent"],
        "upstream_seq": st["upstream_seq"], "journal_first_seq": first,
        "journal_last_seq": last, "journal_bytes": st["journal_bytes"],
        "resync_extents": st["resync_extents"], "peers": peers,
    }


def node_report(node: str, data_dir: Path) -> dict[str, Any]:
    now = time.time()
    return {"version": STATUS_VERSION, "node": node, "data_dir": str(data_dir),
            "volumes": [volume_report(v, now) for v in list_volumes(data_dir)]}


def render_text(report: dict[str, Any]) -> list[str]:
    """Plain lines (the CLI adds colour on a terminal)."""
    out = [f"node {report['node']}  data_dir {report['data_dir']}"]
    if not report["volumes"]:
        out.append("  no volumes")
    for v in report["volumes"]:
        role = v["role"]
        if role == "replica":
            role += (" INCONSISTENT" if v["inconsistent"] else " consistent") + \
                f", applied upstream seq {v['upstream_seq']}"
        out.append(f"volume {v['name']}: {v['size']} bytes, {role}, "
                   f"{'in use' if v['in_use'] else 'idle'}, journal seq "
                   f"{v['journal_first_seq']}..{v['journal_last_seq']} "
                   f"({v['journal_bytes']} bytes)")
        for p in v["peers"]:
            age = "never" if p["last_ack_age_s"] is None else f"{p['last_ack_age_s']} s ago"
            line = (f"  peer {p['name']}: {p['state']}, acked seq {p['acked_seq']}, "
                    f"lag {p['lag_records']} records / {p['lag_bytes']} bytes, "
                    f"last ack {age}")
            if p["dirty_extents"]:
                line += f", {p['dirty_extents']} extents to resync"
            out.append(line)
        if role == "primary" and not v["peers"]:
            out.append("  no peer has connected yet")
    return out
