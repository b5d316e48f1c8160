"""`nbdgw status --json` against its documented schema (gateway/status.py), on a node
whose daemon serves a volume with a client connected, a snapshot and a peer away."""

from __future__ import annotations

import json
import os
from typing import Any

from tests.conftest import run_nbdgw
from tests.statusschema import SCHEMA, check


def test_status_json_schema(daemon: dict[str, Any]) -> None:
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
