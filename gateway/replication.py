"""`nbdgw replicate`: the node's peerlink process, built from the node config.

One process (asyncio + uvloop) per node runs every replication link the config asks for:

- a ``ReceiverServer`` on ``peerlink.listen`` for the node's replica volumes (any role:
  one node may hold replicas of several primaries' volumes);
- one ``Sender`` per (volume, peer) for the peers ``NodeConfig.send_to()`` names: the
  primary's own volumes, and with ``topology: cascade`` the secondary's replicas to DR;
- the control socket, ``<data_dir>/run/peerlink.sock`` (`nbdgw verify` asks it to
  verify a volume against a peer), which is also the **sync gate** (PROTOCOL.md, "Sync
  mode"): the nbdkit plugin says after every write ``{"op": "written", "volume": V,
  "seq": S}`` (no reply of its own: the senders of V wake and ship at once), and gets
  ``{"op": "durable", "volume": V, "through": T, "degraded": [peer...]}`` whenever every
  sync peer of V that holds waiters has acknowledged, durably, a seq T past what that
  connection was last told.  Writes in flight therefore wait together: one batch, one
  replica fdatasync, one line releases every waiter it covers.  A sync peer overdue for
  its ``sync_timeout`` is *stalled* and keeps holding the waiters until the daemon
  permits degrading it (``outdated.json``, below); a node without a failover core
  degrades it on its own (peerlink/syncstate.py).

``outdated.json`` (``<data_dir>/run/``): the peers the daemon has had the cluster's
witness record as outdated, so that they can no longer be promoted; only those may be
degraded.  ``blockstore.node_state.write_outdated``/``read_outdated`` are its one
definition (the nbdkit plugin reads it too).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog

from blockstore.modes import make_dir
from blockstore.node_state import read_outdated
from blockstore.volume import VolumeInfo, is_replica, list_volumes
from nbd_plugin.control import bind_private
from nbdgw_common.errors import GatewayError
from peerlink import admin
from peerlink.__main__ import read_secret
from peerlink.front import HandoffReceiver, handoff_path
from peerlink.ratelimit import RateSchedule
from peerlink.receiver import Receiver, ReceiverServer
from peerlink.sender import Sender, SenderConfig, VerifyError
from peerlink.tls import client_context, server_context

from .config import Compression, NodeConfig, PeerMode, Role

log = structlog.get_logger(component="replication")

GATE_NAME: Final = "peerlink.sock"
GATE_LINE_MAX: Final = 4096
GATE_BACKLOG: Final = 100  # asyncio.start_unix_server's default


def gate_path(data_dir: Path) -> Path:
    return data_dir / "run" / GATE_NAME


def has_failover_core(cfg: NodeConfig) -> bool:
    """Does the daemon run failover here (and so outdate stalled sync peers)?  Without
    it, a stalled sync peer degrades on its own after sync_timeout."""
    return cfg.failover.auto and bool(cfg.peers)


def sync_timeout(cfg: NodeConfig) -> float | None:
    """The longest sync_timeout among the sync peers this node sends to (None: none)."""
    timeouts = [p.sync_timeout for p in cfg.send_to() if p.mode is PeerMode.SYNC]
    return max(timeouts) if timeouts else None


def selected_volumes(cfg: NodeConfig) -> list[VolumeInfo]:
    """The volumes the config names (all of data_dir when it names none)."""
    vols = list_volumes(cfg.data_dir)
    if cfg.volumes:
        wanted = {v.name for v in cfg.volumes}
        missing = wanted - {v.name for v in vols}
        if missing:
            raise GatewayError(f"volume(s) {', '.join(sorted(missing))} named in the config "
                               f"do not exist in {cfg.data_dir} (create them with "
                               f"'nbdgw volume create NAME' or '... --replica')")
        vols = [v for v in vols if v.name in wanted]
    return vols


@dataclass
class Plan:
    """Which links this node runs: (volume, peer) senders and replica volumes."""

    senders: list[tuple[str, str]] = field(default_factory=list)
    receivers: list[str] = field(default_factory=list)


def plan(cfg: NodeConfig) -> Plan:
    out = Plan()
    for info in selected_volumes(cfg):
        replica = is_replica(info)
        if replica:
            out.receivers.append(info.name)
        # A primary ships its own volumes; a cascading secondary forwards its replicas.
        ships = (not replica and cfg.role is Role.PRIMARY) or (
            replica and cfg.role is Role.SECONDARY)
        if ships:
            out.senders += [(info.name, p.name) for p in cfg.send_to()]
    return out


def peer_secret(cfg: NodeConfig) -> bytes | None:
    """The shared secret of peerlink.secret_file (None without one): links and heartbeats."""
    f = cfg.peerlink.secret_file
    return read_secret(f) if f is not None else None


def next_peer_secret(cfg: NodeConfig) -> bytes | None:
    """The secret of peerlink.next_secret_file (None without one): while the shared secret
    is rotated, peers' proofs and beats are accepted under it too (SECURITY.md)."""
    f = cfg.peerlink.next_secret_file
    return read_secret(f) if f is not None else None


def _tls(cfg: NodeConfig, server: bool) -> ssl.SSLContext | None:
    t = cfg.peerlink.tls
    if t is None:
        return None
    make = server_context if server else client_context
    return make(t.cert_file, t.key_file, t.ca_file)


@dataclass(eq=False)  # hashed by identity: kept in a set
class _GateConn:
    """One sync-gate connection (an nbdkit process): per volume, the highest seq it
    waits for and the highest seq it was told is durable on the sync peers."""

    writer: asyncio.StreamWriter
    want: dict[str, int] = field(default_factory=dict)
    told: dict[str, int] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class Replication:
    """Every link of one node; ``run(stop)`` until stop is set."""

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.plan = plan(cfg)
        self.secret = peer_secret(cfg)
        self.next_secret = next_peer_secret(cfg)
        self.senders: dict[str, list[Sender]] = {}
        self.server: ReceiverServer | None = None
        self.gate: asyncio.AbstractServer | None = None
        self.gate_file: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket we bound
        self.gate_conns: set[_GateConn] = set()
        self.bound: tuple[str, int] | None = None
        self.handoff: HandoffReceiver | None = None

    async def start(self) -> None:
        if self.next_secret is not None:
            log.info("peer_secret_rotation", note="peers may prove themselves with "
                     "peerlink.next_secret_file too; this node proves with secret_file")
        if self.plan.receivers:
            role = "dr" if self.cfg.role is Role.DR else "secondary"
            receivers: dict[str, Receiver] = {}
            try:
                for name in self.plan.receivers:
                    receivers[name] = Receiver(self.cfg.data_dir, name, node=self.cfg.name,
                                               role=role, secret=self.secret,
                                               next_secret=self.next_secret)
            except BaseException:
                await asyncio.gather(*(rx.close() for rx in receivers.values()))
                raise
            self.server = ReceiverServer(receivers, node=self.cfg.name,
                                         tls=_tls(self.cfg, True), secret=self.secret,
                                         next_secret=self.next_secret)
            self._listen(self.server)
            if self.handoff is None:
                self.bound = await self.server.start(self.cfg.peerlink.listen_host,
                                                     self.cfg.peerlink.listen_port)
        self._make_senders()
        if self.senders:
            path = gate_path(self.cfg.data_dir)
            make_dir(path.parent, exist_ok=True)
            self.gate = await asyncio.start_unix_server(  # 0600 from bind on: root's only
                self._gate_client, sock=bind_private(path, GATE_BACKLOG), limit=GATE_LINE_MAX)
            st = path.stat()
            self.gate_file = (st.st_dev, st.st_ino)
            sync_peers = sorted({tx.peer for txs in self.senders.values()
                                 for tx in txs if tx.cfg.sync})
            log.info("sync_gate_listening", path=str(path), sync_peers=sync_peers,
                     degrade=("when the daemon has the peer outdated"
                              if has_failover_core(self.cfg) else
                              "on its own after sync_timeout (no failover core: "
                              "failover.auto off or no peers)") if sync_peers else None)

    def _listen(self, server: ReceiverServer) -> None:
        """A group on its node's shared port (peerlink.front) listens on no port of its
        own: the groups parent's front hands it the connections routed to it."""
        group = self.cfg.group
        if not self.cfg.peerlink.front or group is None:
            return
        self.handoff = HandoffReceiver(handoff_path(self.cfg.data_dir),
                                       lambda sock: server.adopt_socket(sock, group))
        self.handoff.start()
        server.begin()

    def _make_senders(self) -> None:
        cfg = self.cfg
        replicas = self.server.receivers if self.server is not None else {}
        data_dir = cfg.data_dir
        outdated = (lambda: read_outdated(data_dir)) if has_failover_core(cfg) else None
        for vol, peer_name in self.plan.senders:
            peer = cfg.peer(peer_name)
            assert peer is not None
            sc = SenderConfig(
                rate_limit=peer.rate_limit,
                rate_schedule=(RateSchedule(peer.rate_schedule, peer.rate_limit)
                               if peer.rate_schedule else None),
                compress=SenderConfig.compress if peer.compression is Compression.ZSTD else 0,
                sync=peer.mode is PeerMode.SYNC, sync_timeout=peer.sync_timeout,
                max_backoff=2.0)
            rx = replicas.get(vol)
            tx = Sender(cfg.data_dir, vol, node=cfg.name, peer=peer.name, host=peer.address,
                        port=peer.port, secret=self.secret, next_secret=self.next_secret,
                        config=sc, tls=_tls(cfg, False),
                        source=rx.vol if rx is not None else None,
                        outdated=outdated, route=peer.route)
            tx.on_change = self._kick
            self.senders.setdefault(vol, []).append(tx)

    async def _gate_client(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        """Serve one connection: ``written`` notices from the nbdkit plugin (answered by
        ``_notify`` as acks arrive, never in line), and requests answered in order:
        ``verify`` from `nbdgw verify`, ``caught_up`` from the daemon's switchover,
        ``peer`` from `nbdgw peer pause|resume|disconnect|connect`."""
        conn = _GateConn(writer)
        self.gate_conns.add(conn)
        notifier = asyncio.get_running_loop().create_task(self._notify(conn))
        try:
            while line := await reader.readline():
                try:
                    req = json.loads(line)
                    op = req.get("op")
                    if op == "written":
                        self._written(conn, str(req["volume"]), int(req["seq"]))
                        continue
                    if op not in ("verify", "caught_up", "peer"):
                        raise ValueError(f"unknown op {op!r}")
                    if op == "peer":
                        reply = self._peer_admin(req)
                    else:
                        reply = await (self._verify(req) if op == "verify"
                                       else self._caught_up(req))
                except (ValueError, KeyError, TypeError, AttributeError):
                    log.warning("control_bad_request", request=line[:200].decode(
                        "utf-8", "replace"))
                    return
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass  # the plugin went away (nbdkit stopped); it reconnects when it needs to
        finally:
            self.gate_conns.discard(conn)
            notifier.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await notifier
            writer.close()

    def _written(self, conn: _GateConn, volume: str, seq: int) -> None:
        """The plugin wrote ``volume`` through ``seq`` and a client waits for it."""
        for tx in self.senders.get(volume, ()):
            tx.want(seq)
        if seq > conn.want.get(volume, 0):
            conn.want[volume] = seq
            self._tell(conn, volume)  # durable already when no sync peer holds waiters

    def _kick(self) -> None:
        """A sync peer's ack or standing moved: every connection is told, right here (the
        ack's own turn of the loop, no task to wake), how far what it waits for is
        durable now."""
        for conn in self.gate_conns:
            for volume in conn.want:
                self._tell(conn, volume)

    def _tell(self, conn: _GateConn, volume: str) -> None:
        """Tell ``conn`` how far ``volume`` is durable, if that moved past what it was
        told and it waits for more (one line can release many waiters).  Written at once
        (a few dozen bytes, sent without waiting while the plugin reads); only a backlog
        wakes ``_notify`` to drain it."""
        want, told = conn.want[volume], conn.told.get(volume, 0)
        if want <= told or conn.writer.is_closing():
            return
        through, degraded = self.durable_through(volume, want)
        if through > told:
            conn.told[volume] = through
            conn.writer.write(json.dumps({
                "op": "durable", "volume": volume, "through": through,
                "degraded": degraded}).encode() + b"\n")
            if conn.writer.transport.get_write_buffer_size():
                conn.changed.set()

    def durable_through(self, volume: str, want: int) -> tuple[int, list[str]]:
        """The seq through which every sync peer of ``volume`` that holds waiters (ok
        or stalled) has acknowledged durably (``want`` when none holds), and the sync
        peers that do not (degraded)."""
        txs = [tx for tx in self.senders.get(volume, ()) if tx.cfg.sync]
        holding = [tx.acked for tx in txs if tx.holds]
        return (min(holding) if holding else want,
                [tx.peer for tx in txs if not tx.holds])

    async def _notify(self, conn: _GateConn) -> None:
        """Drain what ``_tell`` could not send at once.  The backlog is bounded: a line
        is written only when the durable point moves past what the plugin was told and
        it waits for more, i.e. at most one per ``written`` notice it sent."""
        while True:
            await conn.changed.wait()
            conn.changed.clear()
            await conn.writer.drain()

    def _peer_admin(self, req: dict[str, Any]) -> dict[str, Any]:
        """`nbdgw peer pause|resume|disconnect|connect PEER`: record it and apply it to
        every link of this node to that peer, now."""
        peer, action = str(req["peer"]), str(req["action"])
        if self.cfg.peer(peer) is None:
            return {"ok": False, "error": f"{peer!r} is not a peer of {self.cfg.name}"}
        try:
            state = admin.apply(self.cfg.data_dir, peer, action)
        except ValueError as e:
            return {"ok": False, "error": str(e)}
        links = [tx for txs in self.senders.values() for tx in txs if tx.peer == peer]
        for tx in links:
            tx.set_admin(state)
        return {"ok": True, "peer": peer, "state": state,
                "links": sorted(f"{tx.name}->{tx.peer}" for tx in links)}

    async def _caught_up(self, req: dict[str, Any]) -> dict[str, Any]:
        """Switchover drain: wait (up to ``timeout`` s) until ``peer`` has acknowledged,
        durably, every record of ``volume`` through ``seq``."""
        volume, peer, seq = str(req["volume"]), str(req["peer"]), int(req["seq"])
        tx = next((t for t in self.senders.get(volume, []) if t.peer == peer), None)
        if tx is None:
            return {"ok": False, "error": f"this node does not ship volume {volume} to "
                                          f"peer {peer}"}
        deadline = time.monotonic() + float(req.get("timeout", 30))
        while tx.acked < seq and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return {"ok": tx.acked >= seq, "acked": tx.acked, "state": tx.state}

    async def _verify(self, req: dict[str, Any]) -> dict[str, Any]:
        volume, peer = str(req["volume"]), str(req["peer"])
        tx = next((t for t in self.senders.get(volume, []) if t.peer == peer), None)
        if tx is None:
            ships = sorted(f"{t.name}->{t.peer}" for ts in self.senders.values() for t in ts)
            return {"error": f"this node does not ship volume {volume} to peer {peer} "
                             f"(it ships: {', '.join(ships) or 'nothing'})"}
        try:
            return await tx.verify(resync=bool(req.get("resync", True)))
        except VerifyError as e:
            return {"error": str(e)}

    async def run(self, stop: asyncio.Event) -> int:
        """Run until ``stop``; 1 if a sender died of an unexpected error (the daemon
        restarts the process), else 0."""
        await self.start()
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(tx.run(stop)) for txs in self.senders.values() for tx in txs]
        log.info("replication_running", node=self.cfg.name, role=self.cfg.role.value,
                 senders=[f"{v}->{p}" for v, p in self.plan.senders],
                 receivers=self.plan.receivers)
        rc = 0
        try:
            stopper = loop.create_task(stop.wait())
            done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            for t in done:
                if t is not stopper and not t.cancelled() and t.exception() is not None:
                    log.error("sender_failed", error=repr(t.exception()))
                    rc = 1
        finally:
            if self.gate is not None:
                self.gate.close()
                self._unlink_gate()
            stop.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            if self.handoff is not None:
                self.handoff.close()
            if self.server is not None:
                await self.server.close()
            for r in results:
                if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                    rc = 1
            self._unlink_gate()
        return rc

    def _unlink_gate(self) -> None:
        """Remove the sync gate's socket file if it is still the one this process bound:
        another peerlink's must never go with our exit."""
        path = gate_path(self.cfg.data_dir)
        with contextlib.suppress(OSError):
            st = path.stat()
            if (st.st_dev, st.st_ino) == self.gate_file:
                path.unlink()
