"""`nbdgw replicate`: the node's peerlink process, built from the node config.

One process (asyncio + uvloop) per node runs every replication link the config asks for:

- a ``ReceiverServer`` on ``peerlink.listen`` for the node's replica volumes (any role:
  one node may hold replicas of several primaries' volumes);
- one ``Sender`` per (volume, peer) for the peers ``NodeConfig.send_to()`` names: the
  primary's own volumes, and with ``topology: cascade`` the secondary's replicas to DR;
- the control socket, ``<data_dir>/run/peerlink.sock`` (`nbdgw verify` asks it to
  verify a volume against a peer), which is also the **sync gate**, where the nbdkit
  plugin, after making a FLUSH or FUA write durable locally, asks "is seq S durable on
  every sync peer of volume V?".  The answer waits for those peers' acks; a sync peer
  that stays silent for its ``sync_timeout`` degrades to async (logged, shown in status)
  and the answer comes without it.  Protocol: one JSON object per line each way,
  ``{"volume": V, "seq": S}`` -> ``{"ok": bool, "degraded": [peer...]}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog

from blockstore.volume import VolumeInfo, is_replica, list_volumes
from peerlink.__main__ import read_secret
from peerlink.receiver import Receiver, ReceiverServer
from peerlink.sender import Sender, SenderConfig, VerifyError
from peerlink.tls import client_context, server_context

from .config import Compression, NodeConfig, PeerMode, Role
from .errors import GatewayError

log = structlog.get_logger(component="replication")

GATE_NAME: Final = "peerlink.sock"
GATE_LINE_MAX: Final = 4096


def gate_path(data_dir: Path) -> Path:
    return data_dir / "run" / GATE_NAME


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


def _secret(cfg: NodeConfig) -> bytes | None:
    f = cfg.peerlink.secret_file
    return read_secret(f) if f is not None else None


def _tls(cfg: NodeConfig, server: bool) -> ssl.SSLContext | None:
    t = cfg.peerlink.tls
    if t is None:
        return None
    make = server_context if server else client_context
    return make(t.cert_file, t.key_file, t.ca_file)


class Replication:
    """Every link of one node; ``run(stop)`` until stop is set."""

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.plan = plan(cfg)
        self.secret = _secret(cfg)
        self.senders: dict[str, list[Sender]] = {}
        self.server: ReceiverServer | None = None
        self.gate: asyncio.AbstractServer | None = None
        self.bound: tuple[str, int] | None = None

    async def start(self) -> None:
        if self.plan.receivers:
            role = "dr" if self.cfg.role is Role.DR else "secondary"
            receivers: dict[str, Receiver] = {}
            try:
                for name in self.plan.receivers:
                    receivers[name] = Receiver(self.cfg.data_dir, name, node=self.cfg.name,
                                               role=role, secret=self.secret)
            except BaseException:
                await asyncio.gather(*(rx.close() for rx in receivers.values()))
                raise
            self.server = ReceiverServer(receivers, node=self.cfg.name,
                                         tls=_tls(self.cfg, True))
            self.bound = await self.server.start(self.cfg.peerlink.listen_host,
                                                 self.cfg.peerlink.listen_port)
        self._make_senders()
        if self.senders:
            path = gate_path(self.cfg.data_dir)
            path.parent.mkdir(mode=0o750, exist_ok=True)
            path.unlink(missing_ok=True)
            self.gate = await asyncio.start_unix_server(self._gate_client, path,
                                                        limit=GATE_LINE_MAX)
            os.chmod(path, 0o600)
            log.info("sync_gate_listening", path=str(path),
                     sync_peers=sorted({tx.peer for txs in self.senders.values()
                                        for tx in txs if tx.cfg.sync}))

    def _make_senders(self) -> None:
        cfg = self.cfg
        replicas = self.server.receivers if self.server is not None else {}
        for vol, peer_name in self.plan.senders:
            peer = cfg.peer(peer_name)
            assert peer is not None
            sc = SenderConfig(
                rate_limit=peer.rate_limit,
                compress=SenderConfig.compress if peer.compression is Compression.ZSTD else 0,
                sync=peer.mode is PeerMode.SYNC, sync_timeout=peer.sync_timeout,
                max_backoff=2.0)
            rx = replicas.get(vol)
            tx = Sender(cfg.data_dir, vol, node=cfg.name, peer=peer.name, host=peer.address,
                        port=peer.port, secret=self.secret, config=sc, tls=_tls(cfg, False),
                        source=rx.vol if rx is not None else None)
            self.senders.setdefault(vol, []).append(tx)

    async def _gate_client(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        """Answer requests from one connection, in order: durability questions from the
        nbdkit plugin, and ``{"op": "verify", ...}`` from `nbdgw verify`."""
        try:
            while line := await reader.readline():
                try:
                    req = json.loads(line)
                    op = req.get("op", "durable")
                    reply = await (self._verify(req) if op == "verify"
                                   else self._caught_up(req) if op == "caught_up"
                                   else self._durable(req))
                except (ValueError, KeyError, TypeError, AttributeError):
                    log.warning("control_bad_request", request=line[:200].decode(
                        "utf-8", "replace"))
                    return
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass  # the plugin went away (nbdkit stopped); it reconnects when it needs to
        finally:
            writer.close()

    async def _durable(self, req: dict[str, Any]) -> dict[str, Any]:
        volume, seq = str(req["volume"]), int(req["seq"])
        txs = [tx for tx in self.senders.get(volume, []) if tx.cfg.sync]
        results = await asyncio.gather(*(tx.wait_durable(seq) for tx in txs))
        degraded = [tx.peer for tx, ok in zip(txs, results, strict=True) if not ok]
        return {"ok": not degraded, "degraded": degraded}

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
                gate_path(self.cfg.data_dir).unlink(missing_ok=True)
            stop.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            if self.server is not None:
                await self.server.close()
            for r in results:
                if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                    rc = 1
            with contextlib.suppress(OSError):
                gate_path(self.cfg.data_dir).unlink(missing_ok=True)
        return rc
