"""The documented schema of `nbdgw status --json` (gateway/status.py) as Python types, and
the checker the unit and integration tests use."""

from __future__ import annotations

from typing import Any

OPT_INT = (int, type(None))
OPT_NUM = (int, float, type(None))
OPT_STR = (str, type(None))
PEER = {"name": str, "mode": OPT_STR, "state": str, "degraded": OPT_STR, "acked_seq": int,
        "lag_records": int, "lag_bytes": int, "lag_seconds": OPT_NUM,
        "last_ack_age_s": OPT_NUM, "dirty_extents": int, "sender": str,
        "rate_limit": OPT_INT,
        "rpo": (type(None), {"seconds": OPT_NUM, "bytes": OPT_INT, "exceeded": bool}),
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
          "diverged": [DIVERGED], "peers": [PEER],
          "cdp": (type(None), {"window_seconds": (int, float), "max_bytes": int,
                               "bytes_held": int, "bases": int,
                               "oldest_point": (type(None), {"seq": int,
                                                             "time": (int, float)}),
                               "exports": [str]})}
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
                       "coordinator": (type(None), dict),
                       "quorum": {"sites": int, "heard": int, "majority": bool},
                       "roles": dict},
          "volumes": [VOLUME],
          "clones": [{"name": str, "base": str, "point_seq": OPT_INT, "size": int,
                      "allocated_bytes": int, "clients": {"nbd": OPT_INT, "iscsi": OPT_INT}}]}


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
