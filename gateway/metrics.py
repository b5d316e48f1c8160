"""The node's Prometheus endpoint (``metrics.listen``), served by `nbdgw daemon`.

Every scrape is computed fresh, from the same sources as `nbdgw status` (the volumes'
files, the senders' live files, ``run/failover.json``) plus the serving nbdkit's I/O
counters (nbd_plugin/iostats.py, through a volume's control socket, ``stats`` op) and
the daemon's own failover transitions.  Nothing is sampled in the background, so an
idle node costs nothing.  The metric list is in ``deploy/METRICS.md``; an example
Grafana dashboard is ``deploy/grafana/nbdgw.json``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Final

import structlog
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from blockstore.cdp import journal_cap_for
from blockstore.errors import BlockstoreError
from blockstore.volume import list_volumes
from nbd_plugin.iostats import OPS
from nbdgw_common.errors import GatewayError

from .config import NodeConfig
from .live import io_stats
from .status import clones_report, failover_report, rpo_state, volume_report

log = structlog.get_logger(component="metrics")

# Latency buckets: powers of two of nanoseconds, 2^10 ns (1.0 us) .. 2^30 ns (1.07 s);
# iostats counts by bit length, so these bounds are exact, not interpolated.
BUCKET_BITS: Final = range(10, 31)
PEER_STATES: Final = ("in sync", "streaming", "initial-sync", "comparing", "resync",
                      "degraded", "disconnected", "resync pending", "refused", "split brain")

_transitions: dict[tuple[str, str], int] = {}
_transitions_lock = threading.Lock()


def transition(old: str, new: str) -> None:
    """The daemon changed failover state (counted for nbdgw_failover_transitions_total)."""
    if old != new:
        with _transitions_lock:
            _transitions[(old, new)] = _transitions.get((old, new), 0) + 1


def histogram_buckets(hist: list[int]) -> list[tuple[str, float]]:
    """Cumulative Prometheus buckets from iostats' counts by bit length (a duration of
    bit length k is below 2^k ns, so it belongs to every bucket from le=2^k ns on)."""
    out = []
    cum = sum(hist[:BUCKET_BITS.start])
    for k in BUCKET_BITS:
        cum += hist[k]
        out.append((f"{(1 << k) / 1e9:.9g}", float(cum)))
    out.append(("+Inf", float(sum(hist))))
    return out


class NodeCollector(Collector):
    """Builds every metric family at scrape time (prometheus_client custom collector)."""

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg

    def collect(self) -> Iterator[Metric]:  # noqa: PLR0912, PLR0915 - one family after another
        cfg = self.cfg
        now = time.time()
        node = cfg.name
        fo = failover_report(cfg.data_dir, now)
        info = GaugeMetricFamily("nbdgw_node_info", "This node: configured role and "
                                 "failover state (value 1)", labels=["node", "role", "state"])
        info.add_metric([node, cfg.role.value, fo["state"] if fo else "none"], 1)
        yield info
        epoch = GaugeMetricFamily("nbdgw_failover_epoch", "The failover epoch this node "
                                  "knows (one more per promotion)", labels=["node"])
        trans = CounterMetricFamily("nbdgw_failover_transitions", "Failover state changes "
                                    "of this daemon since it started", labels=["old", "new"])
        heard = GaugeMetricFamily("nbdgw_heartbeat_last_heard_seconds", "Seconds since the "
                                  "last valid heartbeat from the peer", labels=["peer"])
        rtt = GaugeMetricFamily("nbdgw_heartbeat_rtt_seconds", "Round-trip time of the "
                                "heartbeats to the peer (its echo of this node's latest "
                                "sequence number)", labels=["peer"])
        rejected = CounterMetricFamily("nbdgw_heartbeats_rejected", "Heartbeats refused "
                                       "since the daemon started, by reason (replay, address, "
                                       "unknown_peer, mac, magic, size, malformed, version)",
                                       labels=["reason"])
        lease = GaugeMetricFamily("nbdgw_write_lease_seconds", "Seconds left on this node's "
                                  "write lease (0 when it does not serve)", labels=["node"])
        outdated = GaugeMetricFamily("nbdgw_peer_outdated", "1 when a peer is marked "
                                     "outdated (it lacks acknowledged writes and cannot be "
                                     "elected until it caught up)", labels=["peer"])
        if fo is not None:
            for reason, n in sorted((fo.get("beats_rejected") or {}).items()):
                rejected.add_metric([reason], float(n))
            lease.add_metric([node], float(fo.get("lease_s") or 0.0))
            for p in fo.get("outdated") or []:
                outdated.add_metric([p], 1.0)
            epoch.add_metric([node], float(fo["epoch"]))
            for p, v in sorted(fo["peers"].items()):
                heard.add_metric([p], float(v["heard_s_ago"]) + float(fo["age_s"]))
                if v.get("rtt_s") is not None:
                    rtt.add_metric([p], float(v["rtt_s"]))
        with _transitions_lock:
            for (old, new), n in sorted(_transitions.items()):
                trans.add_metric([old, new], float(n))
        yield epoch
        yield trans
        yield rejected
        yield lease
        yield outdated
        yield heard
        yield rtt

        io = io_stats(cfg.data_dir) or {}
        vols = list_volumes(cfg.data_dir)
        size = GaugeMetricFamily("nbdgw_volume_size_bytes", "Volume size",
                                 labels=["volume", "role"])
        conns = GaugeMetricFamily("nbdgw_nbd_connections", "NBD connections now open "
                                  "(the iSCSI bridge's FUSE mount included)", labels=["volume"])
        conns_total = CounterMetricFamily("nbdgw_nbd_connections_opened", "NBD connections "
                                          "opened since nbdkit started", labels=["volume"])
        reqs = CounterMetricFamily("nbdgw_io_requests", "Completed NBD requests",
                                   labels=["volume", "op"])
        nbytes = CounterMetricFamily("nbdgw_io_bytes", "Bytes of completed NBD requests",
                                     labels=["volume", "op"])
        lat = HistogramMetricFamily("nbdgw_io_latency_seconds", "Service time of NBD "
                                    "requests in the plugin", labels=["volume", "op"])
        jbytes = GaugeMetricFamily("nbdgw_journal_bytes", "Journal bytes on disk",
                                   labels=["volume"])
        jfill = GaugeMetricFamily("nbdgw_journal_fill_ratio", "Journal bytes / "
                                  "journal.max_bytes (plus the CDP window's max_bytes; "
                                  "past 1 a lagging peer is tracked by dirty extents)",
                                  labels=["volume"])
        jseq = GaugeMetricFamily("nbdgw_journal_last_seq", "Last journal sequence number",
                                 labels=["volume"])
        inconsistent = GaugeMetricFamily("nbdgw_replica_inconsistent", "1 while a replica "
                                         "has not completed its sync", labels=["volume"])
        snaps = GaugeMetricFamily("nbdgw_snapshots", "Snapshots of the volume",
                                  labels=["volume"])
        snap_t = GaugeMetricFamily("nbdgw_snapshot_latest_timestamp_seconds", "Creation "
                                   "time of the newest snapshot", labels=["volume"])
        pstate = GaugeMetricFamily("nbdgw_peer_state", "1 for the peer's current state",
                                   labels=["volume", "peer", "state"])
        plag = GaugeMetricFamily("nbdgw_peer_lag_records", "Journal records the peer has "
                                 "not acknowledged", labels=["volume", "peer"])
        plagb = GaugeMetricFamily("nbdgw_peer_lag_bytes", "Bytes of those records: the "
                                  "data-loss window of an async peer", labels=["volume",
                                                                               "peer"])
        plags = GaugeMetricFamily("nbdgw_peer_lag_seconds", "How long the oldest "
                                  "unacknowledged record has waited", labels=["volume", "peer"])
        pack = GaugeMetricFamily("nbdgw_peer_last_ack_age_seconds", "Seconds since the peer "
                                 "last acknowledged", labels=["volume", "peer"])
        pdirty = GaugeMetricFamily("nbdgw_peer_dirty_extents", "Extents waiting for a "
                                   "resync to the peer", labels=["volume", "peer"])
        rpo_over = GaugeMetricFamily("nbdgw_peer_rpo_exceeded", "1 while the peer's "
                                     "data-loss window is past its link's rpo bound (only "
                                     "links with a bound)", labels=["volume", "peer"])
        rpo_s = GaugeMetricFamily("nbdgw_peer_rpo_bound_seconds", "The link's rpo.seconds",
                                  labels=["volume", "peer"])
        rpo_b = GaugeMetricFamily("nbdgw_peer_rpo_bound_bytes", "The link's rpo.bytes",
                                  labels=["volume", "peer"])
        drecs = GaugeMetricFamily("nbdgw_diverged_records", "Records of this node's "
                                  "acknowledged writes the current primary lacks, kept in "
                                  "the snapshot (absent when their number is unknown)",
                                  labels=["volume", "snapshot", "new_primary"])
        dbytes = GaugeMetricFamily("nbdgw_diverged_bytes", "Bytes those writes covered",
                                   labels=["volume", "snapshot", "new_primary"])
        cdp_held = GaugeMetricFamily("nbdgw_cdp_bytes_held", "Bytes the volume's CDP "
                                     "window holds here (journal from the oldest base on, "
                                     "bases' pre-images)", labels=["volume"])
        cdp_pinned = GaugeMetricFamily("nbdgw_cdp_pinned_journal_bytes", "Journal bytes "
                                       "kept from the base a clone of a point (holder "
                                       "clone-NAME) or an open point reader (holder "
                                       "reader) pins", labels=["volume", "holder"])
        clone_b = GaugeMetricFamily("nbdgw_clone_allocated_bytes", "Bytes a clone's own "
                                    "writes take on disk", labels=["clone", "base"])
        for c in clones_report(cfg.data_dir):
            clone_b.add_metric([c["name"], c["base"]], float(c["allocated_bytes"]))
        for v in vols:
            try:
                rep = volume_report(v, now)
            except (BlockstoreError, OSError) as e:  # one broken volume hides no other
                log.warning("metrics_volume_failed", volume=v.name, error=str(e))
                continue
            name = v.name
            size.add_metric([name, rep["role"]], float(rep["size"]))
            jbytes.add_metric([name], float(rep["journal_bytes"]))
            jfill.add_metric([name], rep["journal_bytes"] / journal_cap_for(
                v.path, cfg.journal.max_bytes))
            jseq.add_metric([name], float(rep["journal_last_seq"]))
            inconsistent.add_metric([name], 1.0 if rep["inconsistent"] else 0.0)
            snaps.add_metric([name], float(rep["snapshots"]["count"]))
            if rep["snapshots"]["latest"] is not None:
                snap_t.add_metric([name], float(rep["snapshots"]["latest"]["time"]))
            if rep["cdp"] is not None:
                cdp_held.add_metric([name], float(rep["cdp"]["bytes_held"]))
                for holder, held in [*((p["owner"], p) for p in rep["cdp"]["pins"]),
                                     *(("reader", r) for r in rep["cdp"]["readers"])]:
                    cdp_pinned.add_metric([name, holder], float(held["journal_bytes"]))
            for d in rep["diverged"]:
                if d["kept"] and d["records"] is not None:
                    dl = [name, d["snapshot"], d["new_primary"]]
                    drecs.add_metric(dl, float(d["records"]))
                    dbytes.add_metric(dl, float(d["bytes"]))
            for p in rep["peers"]:
                labels = [name, p["name"]]
                for st in PEER_STATES:
                    pstate.add_metric([*labels, st], 1.0 if p["state"] == st else 0.0)
                plag.add_metric(labels, float(p["lag_records"]))
                plagb.add_metric(labels, float(p["lag_bytes"]))
                if p["lag_seconds"] is not None:
                    plags.add_metric(labels, float(p["lag_seconds"]))
                if p["last_ack_age_s"] is not None:
                    pack.add_metric(labels, float(p["last_ack_age_s"]))
                pdirty.add_metric(labels, float(p["dirty_extents"]))
                link = cfg.peer(p["name"])
                rpo = rpo_state(p["data_loss_window"], link.rpo if link else None)
                if rpo is not None:
                    rpo_over.add_metric(labels, 1.0 if rpo["exceeded"] else 0.0)
                    if rpo["seconds"] is not None:
                        rpo_s.add_metric(labels, float(rpo["seconds"]))
                    if rpo["bytes"] is not None:
                        rpo_b.add_metric(labels, float(rpo["bytes"]))
        for export, st in sorted(io.items()):
            conns.add_metric([export], float(st["connections"]))
            conns_total.add_metric([export], float(st["connections_total"]))
            for op in OPS:
                c = st["ops"][op]
                reqs.add_metric([export, op], float(c["requests"]))
                nbytes.add_metric([export, op], float(c["bytes"]))
                lat.add_metric([export, op], histogram_buckets(c["hist_log2_ns"]),
                               sum_value=c["ns"] / 1e9)
        yield from (size, conns, conns_total, reqs, nbytes, lat, jbytes, jfill, jseq,
                    inconsistent, snaps, snap_t, pstate, plag, plagb, plags, pack, pdirty,
                    rpo_over, rpo_s, rpo_b, drecs, dbytes, cdp_held, cdp_pinned, clone_b)
        yield from health_families(cfg)


MD_STATES: Final = ("healthy", "degraded", "rebuilding", "resyncing", "checking", "reshaping",
                    "failed", "inactive")


def health_families(cfg: NodeConfig) -> Iterator[Metric]:
    """The store's health (gateway/health.py): file system, MD arrays, disks, and what
    each volume holds.  mdadm and smartctl answers are reused for health.interval."""
    from . import health

    try:
        r = health.check(cfg)
    except (OSError, GatewayError, BlockstoreError) as e:  # a scrape must not fail for it
        log.warning("metrics_health_failed", error=str(e))
        return
    node = cfg.name
    level = GaugeMetricFamily("nbdgw_health_level", "Store health: 0 ok, 1 warning, 2 "
                              "critical (nbdgw health says why)", labels=["node"])
    level.add_metric([node], float(r.level))
    fs_size = GaugeMetricFamily("nbdgw_fs_size_bytes", "Size of the file system of "
                                "data_dir", labels=["path"])
    fs_free = GaugeMetricFamily("nbdgw_fs_free_bytes", "Bytes free on it (for root)",
                                labels=["path"])
    fs_ratio = GaugeMetricFamily("nbdgw_fs_free_ratio", "Free bytes / size", labels=["path"])
    fs_reserve = GaugeMetricFamily("nbdgw_fs_reserve_bytes", "Client writes get ENOSPC once "
                                   "free bytes fall to this (kept for state files)",
                                   labels=["path"])
    if r.filesystem is not None:
        p = [r.filesystem.path]
        fs_size.add_metric(p, float(r.filesystem.size_bytes))
        fs_free.add_metric(p, float(r.filesystem.free_bytes))
        fs_ratio.add_metric(p, r.filesystem.free_ratio)
        fs_reserve.add_metric(p, float(r.filesystem.reserve_bytes))
    md_state = GaugeMetricFamily("nbdgw_md_array_state", "1 for the MD array's current "
                                 "state", labels=["array", "state"])
    md_sync = GaugeMetricFamily("nbdgw_md_array_sync_ratio", "Progress of a rebuild, "
                                "resync, check or reshape (0..1)", labels=["array", "action"])
    md_devs = GaugeMetricFamily("nbdgw_md_array_devices", "Devices of the array by kind: "
                                "raid (slots), active, spare, failed", labels=["array", "kind"])
    for a in r.arrays:
        for st in MD_STATES:
            md_state.add_metric([a.name, st], 1.0 if a.state == st else 0.0)
        if a.sync is not None and a.sync.percent is not None:
            md_sync.add_metric([a.name, a.sync.action], a.sync.percent / 100)
        for kind, n in (("raid", a.raid_devices), ("active", a.active_devices),
                        ("spare", a.spare_devices), ("failed", a.failed_devices)):
            md_devs.add_metric([a.name, kind], float(n))
    smart = GaugeMetricFamily("nbdgw_disk_smart_ok", "1 when the disk passes its SMART "
                              "health check, 0 when it fails (absent: not read)",
                              labels=["disk"])
    realloc = GaugeMetricFamily("nbdgw_disk_reallocated_sectors", "Reallocated sectors "
                                "(ATA attribute 5; SCSI grown defects)", labels=["disk"])
    pending = GaugeMetricFamily("nbdgw_disk_pending_sectors", "Sectors pending "
                                "reallocation (ATA attribute 197)", labels=["disk"])
    media = GaugeMetricFamily("nbdgw_disk_media_errors", "NVMe media errors", labels=["disk"])
    temp = GaugeMetricFamily("nbdgw_disk_temperature_celsius", "Disk temperature",
                             labels=["disk"])
    for d in r.disks:
        for fam, v in ((smart, None if d.smart_passed is None else float(d.smart_passed)),
                       (realloc, d.reallocated_sectors), (pending, d.pending_sectors),
                       (media, d.media_errors), (temp, d.temperature_celsius)):
            if v is not None:
                fam.add_metric([d.device], float(v))
    snap_b = GaugeMetricFamily("nbdgw_snapshot_bytes", "Bytes the volume's snapshots hold "
                               "on disk (pre-images and index)", labels=["volume"])
    j_room = GaugeMetricFamily("nbdgw_journal_may_grow_bytes", "Bytes the journal may still "
                               "take before journal.max_bytes", labels=["volume"])
    alloc = GaugeMetricFamily("nbdgw_volume_allocated_bytes", "Bytes of the sparse store "
                              "allocated on disk", labels=["volume"])
    for vs in r.volumes:
        snap_b.add_metric([vs.name], float(vs.snapshot_bytes))
        j_room.add_metric([vs.name], float(vs.journal_may_grow_bytes))
        alloc.add_metric([vs.name], float(vs.allocated_bytes))
    yield from (level, fs_size, fs_free, fs_ratio, fs_reserve, md_state, md_sync, md_devs,
                smart, realloc, pending, media, temp, snap_b, j_room, alloc)


class MetricsServer:
    """prometheus_client's HTTP server on ``metrics.listen`` with this node's collector."""

    def __init__(self, cfg: NodeConfig) -> None:
        from prometheus_client import start_http_server

        assert cfg.metrics.listen is not None
        host, port = cfg.metrics.listen
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NodeCollector(cfg))
        self.httpd, self.thread = start_http_server(port, host, registry=self.registry)
        self.port = self.httpd.server_address[1]
        log.info("metrics_listening", address=f"{host}:{self.port}")

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def start(cfg: NodeConfig) -> MetricsServer | None:
    """The endpoint if ``metrics.listen`` is set; a bind failure is logged, not fatal
    (the node's data path matters more than its metrics)."""
    if cfg.metrics.listen is None:
        return None
    try:
        return MetricsServer(cfg)
    except OSError as e:
        log.error("metrics_not_started", address="{}:{}".format(*cfg.metrics.listen),
                  error=e.strerror or str(e))
        return None
