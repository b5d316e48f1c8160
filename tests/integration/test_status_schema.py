"""`nbdgw status --json` against its documented schema (gateway/status.py), on a node
whose daemon serves a volume with a client connected, a snapshot and a peer away."""

from __future__ import annotations

import json
import os
from typing import Any

from tests.conftest import run_nbdgw
from tests.integration.test_metrics import daemon  # noqa: F401 - the fixture

OPT_INT = (int, type(None))
OPT_NUM = (int, float, type(None))
OPT_STR = (str, type(None))
PEER = {"name": str, "mode": OPT_STR, "state": str, "degraded": OPT_STR, "acked_seq": int,
        "lag_records": int, "lag_bytes": int, "lag_seconds": OPT_NUM,
        "last_ack_age_s": OPT_NUM, "dirty_extents": int, "sender": str,
        "data_loss_window": {"bytes": int, "seconds": OPT_NUM},
        "progress": (type(None), dict),
        "refused": (type(None), {"reason": str, "by": str, "side": str, "split_brain": bool,
                                 "settle": (type(None), list), "since": (int, float),
                                 "attempts": int})}
DIVERGED = {"snapshot": str, "kept": bool, "records": OPT_INT, "bytes": OPT_INT,
            "unknown": OPT_STR, "new_primary": str, "from_seq": OPT_INT, "through_seq": int,
            "basis": str, "at": (int, float)}
VOLUME = {"name": str, "size": int, "role": str, "in_use": bool, "clean": bool,
          "inconsistent": bool, "upstream_seq": int, "journal_first_seq": int,
          "journal_last_seq": int, "journal_bytes": int, "resync_extents": int,
          "generation": {"id": str, "start_seq": int, "count": int},
          "clients": {"nbd": OPT_INT, "iscsi": OPT_INT},
          "upstream": (type(None), {"source": OPT_STR, "state": str, "applied_seq": int,
                                    "received_seq": OPT_INT, "lag_records": OPT_INT,
                                    "since": (type(None), int, float), "receiver": str}),
          "snapshots": {"count": int, "latest": (type(None), {"name": str,
                                                              "time": (int, float)})},
          "diverged": [DIVERGED], "peers": [PEER]}
HEALTH = {"level": str, "checked": (int, float),
          "filesystem": (type(None), {"path": str, "mount": str, "source": str,
                                      "fstype": str, "size_bytes": int, "free_bytes": int,
                                      "free_ratio": (int, float), "reserve_bytes": int}),
          "arrays": [{"name": str, "level": str, "state": str, "detail_state": OPT_STR,
                      "raid_devices": int, "active_devices": int, "spare_devices": int,
                      "failed_devices": int,
                      "sync": (type(None), {"action": str, "percent": OPT_NUM,
                                            "finish_minutes": OPT_NUM}),
                      "members": [{"device": str, "state": str}]}],
          "disks": [{"device": str, "model": OPT_STR, "serial": OPT_STR,
                     "smart_passed": (bool, type(None)), "reallocated_sectors": OPT_INT,
                     "pending_sectors": OPT_INT, "temperature_celsius": OPT_INT,
                     "media_errors": OPT_INT, "critical_warning": OPT_INT,
                     "error": OPT_STR}],
          "volumes": [{"name": str, "size": int, "allocated_bytes": int, "journal_bytes": int,
                       "journal_max_bytes": int, "journal_may_grow_bytes": int,
                       "snapshots": int, "snapshot_bytes": int}],
          "problems": [{"key": str, "level": str, "message": str, "action": str}],
          "notes": [str]}
SCHEMA = {"version": int, "node": str, "data_dir": str, "split_brain": (type(None), dict),
          "health": (type(None), HEALTH),
          "role": {"configured": str, "effective": str, "epoch": int},
          "failover": {"state": str, "epoch": int, "primary": OPT_STR, "auto": bool,
                       "age_s": (int, float), "peers": dict,
                       "vote": (type(None), {"epoch": int, "for": OPT_STR}),
                       "lease_s": (int, float), "outdated": [str], "degraded": [str],
                       "campaign": OPT_INT, "quorum_exempt": bool, "beats_rejected": dict,
                       "quorum": {"sites": int, "heard": int, "majority": bool}},
          "volumes": [VOLUME]}


def check(value: Any, schema: Any, where: str = "$") -> None:
    """Exactly the documented keys, each of the documented type."""
    if isinstance(schema, dict):
        assert isinstance(value, dict), f"{where}: expected an object, got {value!r}"
        assert set(value) == set(schema), f"{where}: keys {sorted(value)} != {sorted(schema)}"
        for k, sub in schema.items():
            check(value[k], sub, f"{where}.{k}")
    elif isinstance(schema, list):
        assert isinstance(value, list), f"{where}: expected a list"
        for i, item in enumerate(value):
            check(item, schema[0], f"{where}[{i}]")
    elif isinstance(schema, tuple) and any(isinstance(s, dict) for s in schema):
        if value is None and type(None) in schema:
            return
        check(value, next(s for s in schema if isinstance(s, dict)), where)
    else:
        assert isinstance(value, schema), f"{where}: {value!r} is not {schema}"
        assert not (isinstance(value, bool) and schema in (int, (int, float))), where


def test_status_json_schema(daemon: dict[str, Any]) -> None:  # noqa: F811
    import nbd

    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///v1?socket={daemon['sock']}")
    h.pwrite(os.urandom(65536), 0)
    h.flush()
    cfg = str(daemon["config"])
    run_nbdgw("-c", cfg, "snapshot", "create", "v1", "--name", "s1")
    report = json.loads(run_nbdgw("-c", cfg, "status", "--json").stdout)
    check(report, SCHEMA)
    assert report["version"] == 1
    assert [v["name"] for v in report["health"]["volumes"]] == ["v1"]
    assert report["role"] == {"configured": "primary", "effective": "primary", "epoch": 0}
    (v,) = report["volumes"]
    assert v["clients"] == {"nbd": 1, "iscsi": None}
    assert v["snapshots"]["count"] == 1 and v["snapshots"]["latest"]["name"] == "s1"
    assert len(v["generation"]["id"]) == 16 and v["generation"]["count"] == 1
    (p,) = v["peers"]
    assert p["name"] == "dc" and p["state"] == "disconnected"
    assert p["data_loss_window"]["bytes"] == p["lag_bytes"] >= 65536  # async: the lag
    assert report["failover"]["state"] == "primary"
    text = run_nbdgw("-c", cfg, "status").stdout  # not a terminal: plain text
    assert "\x1b[" not in text
    assert "  clients: 1 NBD; snapshots: 1, latest s1 at " in text
    assert f", data-loss window {p['lag_bytes']} bytes" in text
    h.shutdown()
