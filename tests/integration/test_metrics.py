"""The daemon's Prometheus endpoint, scraped over HTTP and parsed with prometheus-client's
own parser: I/O counters and latency histograms per volume from a real nbdkit, journal
fill, snapshots, per-peer state and lag (a peer that is away), the failover state."""

from __future__ import annotations

import itertools
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import run_nbdgw


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_scraped_and_parsed(daemon: dict[str, Any]) -> None:
    import nbd

    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///v1?socket={daemon['sock']}")
    for i in range(64):
        h.pwrite(os.urandom(4096), i * 4096)
    for i in range(8):
        h.pread(65536, i * 65536)
    h.flush()
    run_nbdgw("-c", str(daemon["config"]), "snapshot", "create", "v1", "--name", "s1")
    m = scrape(daemon["port"])
    v, w, r = (("volume", "v1"),), (("op", "write"), ("volume", "v1")), \
        (("op", "read"), ("volume", "v1"))
    assert m[("nbdgw_io_requests_total", w)] == 64
    assert m[("nbdgw_io_bytes_total", w)] == 64 * 4096
    assert m[("nbdgw_io_requests_total", r)] == 8
    assert m[("nbdgw_io_bytes_total", r)] == 8 * 65536
    assert m[("nbdgw_io_requests_total", (("op", "flush"), ("volume", "v1")))] == 1
    assert m[("nbdgw_io_latency_seconds_count", w)] == 64
    assert 0 < m[("nbdgw_io_latency_seconds_sum", w)] < 64
    buckets = sorted((float(dict(k[1])["le"]), val) for k, val in m.items()
                     if k[0] == "nbdgw_io_latency_seconds_bucket"
                     and dict(k[1])["op"] == "write")
    assert buckets[-1] == (float("inf"), 64)
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(buckets))
    assert m[("nbdgw_nbd_connections", v)] == 1
    assert m[("nbdgw_volume_size_bytes", (("role", "primary"), ("volume", "v1")))] == 32 << 20
    assert m[("nbdgw_snapshots", v)] == 1
    assert abs(m[("nbdgw_snapshot_latest_timestamp_seconds", v)] - time.time()) < 60
    assert 0 < m[("nbdgw_journal_fill_ratio", v)] < 1
    assert m[("nbdgw_journal_last_seq", v)] >= 64
    peer = (("peer", "dc"), ("volume", "v1"))
    assert m[("nbdgw_peer_lag_records", peer)] >= 64
    assert m[("nbdgw_peer_lag_bytes", peer)] >= 64 * 4096
    assert m[("nbdgw_peer_state", (*peer[:1], ("state", "disconnected"), peer[1]))] == 1
    assert m[("nbdgw_peer_state", (*peer[:1], ("state", "in sync"), peer[1]))] == 0
    assert m[("nbdgw_node_info", (("node", "main"), ("role", "primary"),
                                  ("state", "primary")))] == 1
    assert m[("nbdgw_failover_epoch", (("node", "main"),))] >= 0
    h.shutdown()
    deadline = time.monotonic() + 10
    while scrape(daemon["port"])[("nbdgw_nbd_connections", v)] != 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_writes_lost_to_a_failover_are_exported(tmp_path: Path) -> None:
    """A former primary demoted after an async failover: the records (and bytes) of its
    acknowledged writes the new primary lacks, per volume and snapshot."""
    from blockstore.roles import demote_volume
    from blockstore.volume import Volume, create_volume, find_volume
    from gateway.config import parse_config
    from gateway.metrics import NodeCollector

    data = tmp_path / "data"
    create_volume(data, "v1", 4 << 20)
    vol = Volume.open(data, "v1")
    try:
        for i in range(5):
            vol.write(b"\x01" * 8192, i * 65536)
        acked = vol.last_seq - 2  # dc acknowledged all but the last two
    finally:
        vol.close()
    info = find_volume(data, "v1")
    (info.path / "peers").mkdir()
    (info.path / "peers" / "dc.json").write_text(
        f'{{"kind": "peer", "version": 1, "peer": "dc", "volume": "v1", '
        f'"volume_uuid": "{info.uuid}", "acked_seq": {acked}, "updated": 0}}')
    snap = demote_volume(data, "v1", "dc")
    cfg = parse_config({"version": 1, "node": {"name": "main", "data_dir": str(data),
                                               "role": "primary"}})
    m = {(s.name, tuple(sorted(s.labels.items()))): s.value
         for fam in NodeCollector(cfg).collect() for s in fam.samples}
    labels = (("new_primary", "dc"), ("snapshot", snap), ("volume", "v1"))
    assert (m[("nbdgw_diverged_records", labels)], m[("nbdgw_diverged_bytes", labels)]) == (
        2, 2 * 8192)
