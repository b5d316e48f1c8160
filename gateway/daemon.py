"""`nbdgw daemon`: one per node; runs what the node's role needs and runs failover.

Children (supervised: an unexpected exit is restarted with bounded exponential backoff,
reset after ``STABLE_AFTER`` s of running):

- ``nbdkit`` while this node serves (the primary), and the iSCSI bridge in front of it
  when ``iscsi.enabled`` (tgtd + FUSE mounts, reconciled on a thread: ``IscsiRunner``);
- ``peerlink`` (`nbdgw replicate`): senders, receivers and the control socket, for the
  node's *effective* role (``gateway/nodestate.py``: a promoted secondary is primary).

Timed snapshots (the config's ``snapshots.schedules``) run on a thread of their own.

Failover (contract 6) when ``failover.auto`` and peers are configured: a heartbeat thread
(gateway/heartbeat.py) keeps the ``View``; every tick ``failover.decide()`` may produce an
event, ``failover.step()`` gives the new state and the actions, executed here in order:
SERVE (nbdkit, service address with gratuitous ARP, peerlink for the role), FENCE
(service address dropped first, nbdkit killed, peerlink stopped), PROMOTE (peerlink
stopped so the receivers finish their last complete batch and close the replicas, every
Consistent replica promoted to a new generation, epoch + 1 in node-state.json), RECEIVE,
REJOIN (a stale former primary demotes its volumes to replicas of the newer primary,
preserving unshipped writes as a ``diverged-<generation>`` snapshot, unless that is a
split brain: gateway/rejoin.py).  A node that hears of a newer primary while it is a
standby or witness follows it (node-state.json names the current primary, so that the
effective config ships from the new primary to the old one).
The state is published in ``<data_dir>/run/failover.json`` for `nbdgw status`.

Planned switchover (`nbdgw switchover --to NODE`, on the primary): client I/O is held
inside nbdkit (the control socket's ``hold``: requests wait, they do not fail), every
volume made durable, the target's durable ack awaited at each journal's end, then this
node stops serving (nbdkit killed with the I/O still held: those requests are never
answered, so never acknowledged; clients retry on the new primary), demotes itself and
names the target in its heartbeats; the target promotes on that word at once.

SIGTERM/SIGINT become a stop event (never exit inside a handler): nbdkit stops first,
then peerlink, each closing its volumes cleanly; a held service address is released.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from blockstore.errors import BlockstoreError
from blockstore.meta import write_json
from blockstore.peers import set_adopt
from blockstore.volume import (
    demote_volume,
    find_volume,
    is_replica,
    list_volumes,
    promote_volume,
    renew_generation,
    volume_status,
)
from nbd_plugin.control import ControlError, hold

from . import metrics, nodestate, rejoin
from .config import NodeConfig, Role
from .control import ask, grant
from .errors import CommandError, GatewayError
from .failover import Action, Event, State, Timers, View, alive, decide, step
from .heartbeat import Heartbeat
from .replication import _secret, gate_path, plan, selected_volumes
from .serve import NbdServer, lease_path, precheck_volumes
from .status import live_state
from .vip import ServiceAddress

log = structlog.get_logger(component="daemon")

MIN_BACKOFF: Final = 0.5
MAX_BACKOFF: Final = 30.0
STABLE_AFTER: Final = 30.0
STOP_TIMEOUT: Final = 30.0
TICK: Final = 0.1
PROMOTE_RETRY_AFTER: Final = 30.0
CONTROL: Final = "daemon.sock"  # <data_dir>/run/daemon.sock: `nbdgw promote` asks here
CONTROL_TIMEOUT: Final = 120.0


def control_path(data_dir: Path) -> Path:
    return data_dir / "run" / CONTROL


class Control:
    """A unix socket for operator requests (one JSON line in, one out).  Requests are
    handed to the daemon's main loop (which alone changes state) and answered from it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.requests: queue.Queue[tuple[dict[str, Any], queue.Queue[dict[str, Any]]]] = \
            queue.Queue()
        path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o600)
        self.sock.listen(4)
        self.thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(CONTROL_TIMEOUT)
            try:
                req = json.loads(conn.makefile("rb").readline())
                if not isinstance(req, dict):
                    raise TypeError("not an object")
            except (OSError, ValueError, TypeError) as e:
                conn.sendall(json.dumps({"error": f"bad request: {e}"}).encode() + b"\n")
                return
            answer: queue.Queue[dict[str, Any]] = queue.Queue()
            self.requests.put((req, answer))
            try:
                reply = answer.get(timeout=CONTROL_TIMEOUT)
            except queue.Empty:
                reply = {"error": "the daemon did not answer in time"}
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


@dataclass
class Child:
    """One supervised process: how to start it, stop it and tell that it exited."""

    name: str
    start: Callable[[], None]
    stop: Callable[[], int]
    poll: Callable[[], int | None]
    kill: Callable[[], None]
    started_at: float = 0.0
    backoff: float = MIN_BACKOFF
    restart_at: float | None = None
    restarts: int = 0


class PeerlinkProcess:
    """`nbdgw -c CONFIG replicate` as a child process (dies with the daemon)."""

    def __init__(self, config_path: Path | None, log_format: str) -> None:
        self.argv = [sys.executable, "-m", "gateway.cli"]
        if config_path is not None:
            self.argv += ["-c", str(config_path)]
        self.argv += ["--log-format", log_format, "replicate"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, NBDGW_DIE_WITH_PARENT="1")
        self.proc = subprocess.Popen(self.argv, cwd="/", env=env)

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.error("peerlink_kill", reason=f"no exit {STOP_TIMEOUT:g} s after SIGTERM")
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def initial_state(cfg: NodeConfig) -> State:
    if cfg.role is Role.PRIMARY:
        return State.STARTING
    return State.STANDBY if cfg.role is Role.SECONDARY else State.WITNESS


ISCSI_INTERVAL: Final = 5.0


class IscsiRunner:
    """The iSCSI bridge on a thread of its own (tgtadm calls must not delay failover
    decisions): while ``serving``, reconcile tgtd to the node's exports every
    ISCSI_INTERVAL seconds (a restarted tgtd or a deleted target is repaired); when
    not, withdraw everything (``tgtadm --op delete --mode system``)."""

    def __init__(self, cfg: NodeConfig, nbd_uri: Callable[[str], str]) -> None:
        from iscsi_bridge import Bridge

        self.cfg = cfg
        self.bridge = Bridge(cfg.iscsi, nbd_uri, data_dir=cfg.data_dir)
        self.serving = False
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="iscsi", daemon=True)
        self.thread.start()

    def set_serving(self, serving: bool, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.serving = serving
        self.wake.set()

    def _run(self) -> None:
        from iscsi_bridge import exports_from_config

        running = False
        while not self.stopping:
            try:
                if self.serving:
                    report = self.bridge.reconcile(exports_from_config(self.cfg, primary=True))
                    for name, err in report.failed.items():
                        log.error("iscsi_export_failed", volume=name, error=err)
                    if not running:
                        log.info("iscsi_serving", portal=self.cfg.iscsi.portal)
                    running = True
                elif running:
                    self.bridge.stop()
                    running = False
                    log.info("iscsi_withdrawn")
            except Exception:  # keep the daemon alive; say what failed
                log.exception("iscsi_reconcile_failed")
            self.wake.wait(ISCSI_INTERVAL)
            self.wake.clear()
        if running:
            self.bridge.stop()

    def stop(self) -> None:
        self.serving = False
        self.stopping = True
        self.wake.set()
        self.thread.join(60)


def nbd_uri_for(nbd: NbdServer) -> Callable[[str], str]:
    """How a FUSE server over NBD reaches this node's nbdkit: a unix address if any,
    else loopback TCP (iscsi.fuse nbdgw, nbdfuse)."""
    unix = [a for a in nbd.addresses if a.kind == "unix"]
    if unix:
        path = unix[0].path
        return lambda export: f"nbd+unix:///{export}?socket={path}"
    a = nbd.addresses[0]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(a.host, a.host)
    host = f"[{host}]" if ":" in host else host
    return lambda export: f"nbd://{host}:{a.port}/{export}"


class Daemon:
    def __init__(self, cfg: NodeConfig, config_path: Path | None,
                 log_format: str = "json") -> None:
        self.installed = cfg
        self.cfg = nodestate.effective_config(cfg)
        self.epoch = nodestate.epoch(cfg.data_dir)
        self.config_path = config_path
        self.log_format = log_format
        self.stop_event = threading.Event()
        self.children: dict[str, Child] = {}
        self.nbd: NbdServer | None = None
        self.peerlink = PeerlinkProcess(config_path, log_format)
        svc = cfg.service
        self.vip = (ServiceAddress(svc.address, svc.interface)
                    if svc.address is not None and svc.interface is not None else None)
        self.auto = cfg.failover.auto and bool(cfg.peers)
        self.state = initial_state(self.cfg)
        self.timers = Timers(cfg.failover.timeout, cfg.failover.fence_margin)
        self.view = self._view()
        self.hb: Heartbeat | None = None
        self.control: Control | None = None
        self.operator_promotion = False
        self.served_when_stale = False  # learned of a newer primary while serving
        self.rejoin_pending = False
        self.rejoin_at = 0.0
        self.handover_from: str | None = None  # the primary that handed over to this node
        self.iscsi: IscsiRunner | None = None
        if rejoin.split_brain(cfg.data_dir) is not None:
            self.state = State.STALE  # until `nbdgw resolve`
        self.metrics: metrics.MetricsServer | None = None
        if not list_volumes(cfg.data_dir):
            raise GatewayError(f"nothing to run on node {cfg.name}: no volume in "
                               f"{cfg.data_dir} (create one with 'nbdgw volume create')")

    # -- the view and heartbeats -------------------------------------------------------------

    def _view(self) -> View:
        cfg = self.cfg
        primaries = [p.name for p in cfg.peers if p.role is Role.PRIMARY]
        if cfg.role is Role.PRIMARY:
            primary: str | None = cfg.name
        else:
            primary = primaries[0] if primaries else None
        return View(me=cfg.name, epoch=self.epoch, primary=primary, known_epoch=self.epoch,
                    quorum_exempt=nodestate.quorum_exempt(cfg.data_dir),
                    witnesses=tuple(p.name for p in cfg.peers if p.role is Role.DR),
                    peers=tuple(p.name for p in cfg.peers), started=time.monotonic())

    def _start_heartbeat(self) -> None:
        cfg = self.cfg
        port = cfg.failover.heartbeat_port
        targets = {p.name: [(a, port) for a in (p.address, *p.heartbeat_addresses)]
                   for p in cfg.peers}
        self.hb = Heartbeat(self.view, bind=(cfg.peerlink.listen_host, port), targets=targets,
                            secret=_secret(cfg), interval=cfg.failover.interval,
                            state_fn=lambda: (self.state, self.epoch))
        self.hb.start()
        log.info("heartbeat_started", port=port, interval=cfg.failover.interval,
                 timeout=cfg.failover.timeout, peers=sorted(targets))

    # -- children ------------------------------------------------------------------------------

    def _nbd_child(self) -> Child | None:
        pre = precheck_volumes(self.cfg, None)
        for name, err in pre.failed.items():
            log.error("volume_not_served", volume=name, error=err)
        if not pre.served:
            return None
        nbd = NbdServer(self.cfg, pre.served)
        self.nbd = nbd

        def start_nbd() -> None:
            # Bound and listening at once (the sockets are ours): clients that connect
            # before nbdkit is ready wait in the backlog.  _serve waits for readiness.
            nbd.start()

        def kill_nbd() -> None:
            if nbd.proc is not None and nbd.proc.poll() is None:
                nbd.proc.kill()
                nbd.proc.wait()

        return Child("nbdkit", start_nbd, nbd.stop,
                     lambda: None if nbd.proc is None else nbd.proc.poll(), kill_nbd)

    def _peerlink_child(self) -> Child | None:
        p = plan(self.cfg)
        if not p.senders and not p.receivers:
            return None
        pl = self.peerlink
        return Child("peerlink", pl.start, pl.stop, pl.poll, pl.kill)

    def _run_child(self, c: Child) -> None:
        self.children[c.name] = c
        self._start(c)

    def _drop_child(self, name: str, kill: bool = False) -> None:
        c = self.children.pop(name, None)
        if c is None:
            return
        if kill:
            c.kill()
        rc = c.stop()
        log.info("child_stopped", child=name, status=rc, killed=kill)

    def _start(self, c: Child) -> None:
        try:
            c.start()
        except (GatewayError, OSError) as e:
            log.error("child_start_failed", child=c.name, error=str(e))
            self._schedule(c)
            return
        c.started_at = time.monotonic()
        c.restart_at = None
        log.info("child_started", child=c.name, restarts=c.restarts)

    def _schedule(self, c: Child) -> None:
        c.restart_at = time.monotonic() + c.backoff
        log.warning("child_restart_scheduled", child=c.name, delay_s=c.backoff)
        c.backoff = min(c.backoff * 2, MAX_BACKOFF)

    def _supervise(self, now: float) -> None:
        for c in list(self.children.values()):
            if c.restart_at is not None:
                if now >= c.restart_at:
                    c.restarts += 1
                    self._start(c)
                continue
            rc = c.poll()
            if rc is None:
                if now - c.started_at > STABLE_AFTER:
                    c.backoff = MIN_BACKOFF
                continue
            log.error("child_exited", child=c.name, status=rc,
                      ran_s=round(now - c.started_at, 1))
            c.stop()  # reap, clean up sockets
            self._schedule(c)

    # -- actions -------------------------------------------------------------------------------

    def _serve(self) -> None:
        """Listen first, then take the service address (clients queue in the backlog
        while nbdkit loads), then the links; then wait until nbdkit answers."""
        self.cfg = nodestate.effective_config(self.installed)
        if self.auto:
            self._renew_lease()
        self._drop_child("peerlink")  # its plan follows the role: restart it
        nbd = self._nbd_child()
        if nbd is not None:
            self._run_child(nbd)
        if self.vip is not None:
            try:
                self.vip.take()
            except (CommandError, OSError) as e:
                log.error("service_address_failed", error=str(e))
        pl = self._peerlink_child()
        if pl is not None:
            self._run_child(pl)
        if self.nbd is not None and "nbdkit" in self.children:
            try:
                self.nbd.wait_ready()
                log.info("serving", volumes=self.nbd.volumes)
            except GatewayError as e:
                log.error("nbdkit_not_ready", error=str(e))
            if self.cfg.iscsi.enabled:
                if self.iscsi is None:
                    self.iscsi = IscsiRunner(self.cfg, nbd_uri_for(self.nbd))
                self.iscsi.set_serving(True, self.cfg)

    def _fence(self) -> None:
        why = ("switchover: the target takes over" if self.view.handover_to else
               "a newer primary serves" if self.state is State.STALE else
               "this primary lost the majority of the sites: it stopped serving so that "
               "the secondary may take over")
        lease_path(self.cfg.data_dir).unlink(missing_ok=True)  # writes stop at once
        if self.view.handover_to:
            # Clients hold requests that will never be answered: close their connections
            # while the service address is still here, so that the resets reach them and
            # they reconnect (to the successor) instead of waiting forever.
            self._drop_child("nbdkit", kill=True)
        if self.vip is not None:
            self.vip.release()
        if self.iscsi is not None:
            self.iscsi.set_serving(False, self.cfg)
        self._drop_child("nbdkit", kill=True)
        self._drop_child("peerlink")
        log.error("fenced", reason=why, alive=sorted(self.view.heard))

    def _receive(self) -> None:
        pl = self._peerlink_child()
        if pl is not None and "peerlink" not in self.children:
            self._run_child(pl)

    def _promote(self) -> Event:
        t0 = time.monotonic()
        self._drop_child("peerlink")  # receivers finish the last complete batch and close
        promoted, refused = [], {}
        for info in selected_volumes(self.cfg):
            if not is_replica(info):
                continue
            try:
                gen = promote_volume(self.cfg.data_dir, info.name)
                promoted.append(info.name)
                log.info("volume_promoted", volume=info.name, generation=f"{gen.gen_id:016x}",
                         start_seq=gen.start_seq)
            except (BlockstoreError, OSError) as e:
                refused[info.name] = str(e)
                log.error("volume_not_promoted", volume=info.name, reason=str(e))
        if not promoted:
            self.view.promote_blocked_until = time.monotonic() + PROMOTE_RETRY_AFTER
            return Event.PROMOTION_FAILED
        self.epoch = max(self.epoch, self.view.known_epoch) + 1
        self.view.epoch = self.view.known_epoch = self.epoch
        by_operator = self.state is State.PROMOTING and self.operator_promotion
        nodestate.save(self.cfg.data_dir, Role.PRIMARY, self.epoch,
                       "promoted by an operator" if by_operator else
                       f"switchover from {self.handover_from}" if self.handover_from else
                       f"promoted: primary {self.view.primary} gone",
                       quorum_exempt=by_operator, primary=self.cfg.name)
        self.view.quorum_exempt = by_operator
        self.view.primary = self.cfg.name
        self.handover_from = None
        log.warning("promoted", epoch=self.epoch, volumes=promoted, refused=sorted(refused),
                    seconds=round(time.monotonic() - t0, 3))
        return Event.PROMOTED

    def _feed(self, event: Event) -> None:
        old = self.state
        if event is Event.NEWER_PRIMARY and old is State.PRIMARY:
            # Serving means holding a live write lease: a primary whose daemon was frozen
            # could not take a write after its lease ran out (before any promotion).
            try:
                age = time.time() - lease_path(self.cfg.data_dir).stat().st_mtime
            except OSError:
                age = float("inf")
            self.served_when_stale = age < self.timers.timeout
        if event is Event.HANDOVER:
            with self._hb_lock():
                self.handover_from = next(
                    (p for p, r in self.view.reports.items() if r.handover_to == self.cfg.name),
                    None)
        self.state, actions = step(self.state, event)
        metrics.transition(old.value, self.state.value)
        if self.state is not old or actions:
            log.warning("failover_transition", trigger=event.value, old=old.value,
                        new=self.state.value, actions=[a.value for a in actions])
        self._publish()
        for a in actions:
            if a is Action.SERVE:
                self._serve()
            elif a is Action.FENCE:
                self._fence()
            elif a is Action.RECEIVE:
                self._receive()
            elif a is Action.PROMOTE:
                self._feed(self._promote())
            elif a is Action.REJOIN:
                ev = self._rejoin()
                if ev is not None:
                    self._feed(ev)

    def _publish(self) -> None:
        now = time.monotonic()
        try:
            write_json(self.cfg.data_dir / "run" / "failover.json", {
                "kind": "failover", "version": 1, "node": self.cfg.name,
                "state": self.state.value, "epoch": self.epoch, "primary": self.view.primary,
                "auto": self.auto, "updated": time.time(),
                "split_brain": rejoin.split_brain(self.cfg.data_dir),
                "handover_to": self.view.handover_to,
                "peers": {p: {"heard_s_ago": round(now - t, 2),
                              "rtt_s": (None if self.hb is None or p not in self.hb.rtt
                                        else round(self.hb.rtt[p], 6))}
                          for p, t in self.view.heard.items()}})
        except OSError as e:
            log.error("failover_state_not_written", error=str(e))

    # -- the loop ------------------------------------------------------------------------------

    def _boot(self) -> None:
        (self.cfg.data_dir / "run").mkdir(exist_ok=True)
        log.info("daemon_starting", node=self.cfg.name, role=self.cfg.role.value,
                 installed_role=self.installed.role.value, epoch=self.epoch,
                 failover=self.auto, state=self.state.value)
        if self.vip is not None:
            self.vip.release()  # a leftover of a crash: only a serving primary holds it
        if self.state is State.STARTING and not self.auto:
            self.state = State.PRIMARY
            self._serve()
        elif self.state in (State.STANDBY, State.WITNESS):
            self._receive()
        if self.auto:
            self._start_heartbeat()
        self.control = Control(control_path(self.cfg.data_dir))
        grant(self.control.path, self.installed.control.group)  # control.group
        self.metrics = metrics.start(self.installed)  # metrics.listen
        if self.cfg.snapshots.schedules:
            threading.Thread(target=self._snapshot_schedules, name="snapshots",
                             daemon=True).start()
        self._publish()

    def _snapshot_schedules(self) -> None:
        """Timed snapshots (gateway/snapshot_schedule.py): taken on the volumes this node
        serves; replicas are skipped (they take the primary's snapshots from the journal)."""
        from .snapshot_schedule import Scheduler

        while not self.stop_event.is_set():
            try:
                Scheduler(self.installed).run(self.stop_event)
            except Exception:  # logged; the schedules go on
                log.exception("snapshot_scheduler_failed")
                self.stop_event.wait(30)

    def _requests(self) -> None:
        if self.control is None:
            return
        while True:
            try:
                req, answer = self.control.requests.get_nowait()
            except queue.Empty:
                return
            try:
                if req.get("op") == "promote":
                    answer.put(self._operator_promote(bool(req.get("force"))))
                elif req.get("op") == "switchover":
                    answer.put(self._switchover(str(req.get("to")),
                                                float(req.get("timeout", 30))))
                elif req.get("op") == "resolve":
                    answer.put(self._resolve(str(req.get("discard"))))
                else:
                    answer.put({"error": f"unknown request {req.get('op')!r}"})
            except Exception as e:
                log.exception("control_request_failed", request=req)
                answer.put({"error": f"{type(e).__name__}: {e}"})

    def _operator_promote(self, force: bool) -> dict[str, Any]:
        """`nbdgw promote` (DR promotion): refused with the exact reason when unsafe."""
        if self.state not in (State.WITNESS, State.STANDBY):
            return {"error": f"node {self.cfg.name} is {self.state.value}: only a standby or "
                             "witness site can be promoted"}
        for info in list_volumes(self.cfg.data_dir):
            st = volume_status(info)
            if st["role"] == "replica" and st["inconsistent"]:
                return {"error": f"volume {info.name} is Inconsistent (its sync from the "
                                 "primary never completed): it can never be promoted, "
                                 "--force or not"}
        now = time.monotonic()
        main_site = [p.name for p in self.cfg.peers if p.role in (Role.PRIMARY, Role.SECONDARY)]
        if self.hb is not None:
            with self.hb.lock:
                up = alive(self.view, now, self.timers)
                heard = {p: round(now - self.view.heard[p], 1) for p in main_site if p in up}
        else:
            heard = {}
        if heard and not force:
            who = ", ".join(f"{p} (heard {a} s ago)" for p, a in sorted(heard.items()))
            return {"error": f"the main site is alive: {who}; it holds the majority, so "
                             "promoting this site would make two primaries. Refused; "
                             "--force overrides this check"}
        log.warning("operator_promote", forced=force, main_site_heard=heard)
        self.operator_promotion = True
        try:
            self._feed(Event.OPERATOR_PROMOTE)
        finally:
            self.operator_promotion = False
        if not self._serving():
            return {"error": "promotion failed: no replica could be promoted (see the log)"}
        return {"ok": True, "node": self.cfg.name, "epoch": self.epoch, "forced": force,
                "main_site_heard": heard}

    def _serving(self) -> bool:
        return self.state is State.PRIMARY

    # -- rejoin, switchover, split brain ---------------------------------------------------

    def _hb_lock(self) -> Any:
        return self.hb.lock if self.hb is not None else contextlib.nullcontext()

    def _newest_primary(self) -> tuple[str, int] | None:
        """The site reporting PRIMARY on the highest epoch (alive or not)."""
        best: tuple[str, int] | None = None
        with self._hb_lock():
            for p, rep in self.view.reports.items():
                if rep.state is State.PRIMARY and (best is None or rep.epoch > best[1]):
                    best = (p, rep.epoch)
        return best

    def _adopt_role(self, role: Role, primary: str, why: str) -> None:
        self.epoch = max(self.epoch, self.view.known_epoch)
        nodestate.save(self.cfg.data_dir, role, self.epoch, why, primary=primary)
        self.cfg = nodestate.effective_config(self.installed)
        with self._hb_lock():
            self.view.epoch = self.epoch
            self.view.primary = primary
            self.view.quorum_exempt = False
            self.view.witnesses = tuple(p.name for p in self.cfg.peers if p.role is Role.DR
                                        and p.name != primary)

    def _follow(self) -> None:
        """A standby or witness heard of a newer primary: follow it (its peerlink plan may
        change: a cascade ends while the primary is not the installed one)."""
        newest = self._newest_primary()
        if newest is None or newest[1] < self.view.known_epoch or newest[0] == self.cfg.name:
            return
        self._adopt_role(self.cfg.role, newest[0], f"following primary {newest[0]}")
        with self._hb_lock():
            rep = self.view.reports.get(newest[0])
            resolved = rep.discarding if rep is not None else None
        log.warning("following_new_primary", primary=newest[0], epoch=self.epoch,
                    split_brain_resolved_against=resolved)
        self._drop_child("peerlink")
        if resolved is not None:
            # The new primary won a split brain an operator resolved: its history may be
            # unrelated to the one these replicas followed; take its data all the same.
            for info in selected_volumes(self.cfg):
                if is_replica(info):
                    set_adopt(info, newest[0])
        self._receive()

    def _rejoin(self) -> Event | None:
        """REJOIN: demote this former primary's volumes to replicas of the newer primary
        (module docstring), or record a split brain and stay STALE."""
        self.rejoin_pending = False
        handover = self.view.handover_to
        newest = self._newest_primary()
        primary = handover or (newest[0] if newest is not None else None)
        if primary is None or primary == self.cfg.name:
            self.rejoin_pending, self.rejoin_at = True, time.monotonic() + 1.0
            log.info("rejoin_waiting", reason="no newer primary heard yet")
            return None
        if rejoin.split_brain(self.cfg.data_dir) is not None:
            return None
        mine = [i for i in selected_volumes(self.cfg) if not is_replica(i)]
        with self._hb_lock():
            rep = self.view.reports.get(primary)
            discarded = rep is not None and rep.discarding == self.cfg.name
        if self.served_when_stale and handover is None and not discarded:
            lacking = {i.name: why for i in mine if (why := rejoin.unshipped(i, primary))}
            if lacking:
                rec = rejoin.record_split_brain(
                    self.cfg.data_dir, me=self.cfg.name, my_epoch=self.epoch, other=primary,
                    other_epoch=self.view.known_epoch,
                    volumes={n: {"why": why, "last_write": rejoin.last_write(
                        find_volume(self.cfg.data_dir, n))} for n, why in lacking.items()})
                log.error("split_brain", other=primary, volumes=sorted(lacking),
                          detail="both sites took writes since the newer primary was "
                                 "promoted; nothing is synced until 'nbdgw resolve "
                                 "--discard NODE'", record=rec)
                self._publish()
                return None
        preserved: dict[str, str] = {}
        for info in mine:
            try:
                snap = demote_volume(
                    self.cfg.data_dir, info.name, primary, preserve=handover is None,
                    adopt=discarded, changed=lambda i: rejoin.changed_extents(i, primary))
            except (BlockstoreError, OSError) as e:
                log.error("volume_not_demoted", volume=info.name, error=str(e))
                self.rejoin_pending, self.rejoin_at = True, time.monotonic() + 5.0
                return None
            if snap is not None:
                preserved[info.name] = snap
        role = (self.installed.role if self.installed.role is not Role.PRIMARY
                else Role.SECONDARY)
        self._adopt_role(role, primary, f"rejoined as a replica of {primary}")
        self.served_when_stale = False
        log.warning("rejoined", primary=primary, epoch=self.epoch,
                    volumes=[i.name for i in mine], diverged_snapshots=preserved,
                    switchover=handover is not None, discarded_by_operator=discarded)
        return Event.REJOINED_AS_WITNESS if role is Role.DR else Event.REJOINED

    def _switchover_refusal(self, target: str) -> str | None:  # noqa: PLR0911
        """Why this node cannot hand over to ``target`` now (None: it can)."""
        me = self.cfg.name
        if self.state is not State.PRIMARY:
            return (f"node {me} is {self.state.value}, not the serving primary: run "
                    f"switchover on the primary ({self.view.primary or 'unknown'})")
        if target == me:
            return f"node {me} is the primary already"
        if self.cfg.peer(target) is None:
            return (f"{target!r} is not a peer of {me} (peers: "
                    f"{', '.join(p.name for p in self.cfg.peers)})")
        if target not in {p.name for p in self.cfg.send_to()}:
            return (f"{me} does not replicate to {target} directly (topology "
                    f"{self.cfg.peerlink.topology.value}): it cannot take over without a "
                    "resync")
        now = time.monotonic()
        with self._hb_lock():
            up = alive(self.view, now, self.timers)
            rep = self.view.reports.get(target)
        if target not in up or rep is None:
            return f"{target} is not heard: it cannot take over"
        if rep.state not in (State.STANDBY, State.WITNESS):
            return f"{target} is {rep.state.value}, not a standby or witness"
        if self.nbd is None or not self.nbd.volumes:
            return "no volume is served here"
        for vol in self.nbd.volumes:
            st = live_state(find_volume(self.cfg.data_dir, vol), target, time.time())
            state = "not replicated to" if st is None else st["state"]
            if state not in ("streaming", "degraded"):
                return (f"volume {vol}: {target} is {state}, not streaming; switch over "
                        "once it is in sync")
        return None

    def _switchover(self, target: str, timeout: float) -> dict[str, Any]:
        """`nbdgw switchover --to NODE` on the primary (module docstring)."""
        me = self.cfg.name
        why = self._switchover_refusal(target)
        if why is not None:
            return {"error": why}
        assert self.nbd is not None
        t0 = time.monotonic()
        deadline = t0 + timeout
        first = find_volume(self.cfg.data_dir, self.nbd.volumes[0]).path
        try:
            conn, seqs = hold(first, max_s=timeout + 30)
        except (ControlError, OSError) as e:
            return {"error": f"could not hold client I/O: {e}"}
        log.warning("switchover_draining", to=target, seqs=seqs)
        try:
            for vol, seq in seqs.items():
                self._renew_lease()
                left = max(0.1, deadline - time.monotonic())
                r = ask(gate_path(self.cfg.data_dir),
                        {"op": "caught_up", "volume": vol, "peer": target, "seq": seq,
                         "timeout": left}, left + 10, who="peerlink",
                        unreachable_hint="is replication running?",
                        closed_hint="during the drain")
                if not r.get("ok"):
                    return {"error": f"volume {vol}: {target} did not catch up within "
                                     f"{timeout:g} s (acknowledged {r.get('acked')} of {seq}, "
                                     f"{r.get('state') or r.get('error')}); nothing changed, "
                                     "client I/O resumed"}
            drained = time.monotonic() - t0
            old_epoch = self.epoch
            self.view.handover_to = target
            self._feed(Event.HANDED_OVER)  # FENCE (I/O still held), REJOIN
        finally:
            conn.close()
        serving = False
        while time.monotonic() < deadline + 30:
            with self._hb_lock():
                r2 = self.view.reports.get(target)
                if r2 is not None and r2.state is State.PRIMARY and r2.epoch > old_epoch:
                    serving = True
                    break
            time.sleep(0.05)
        out = {"ok": True, "from": me, "to": target, "seqs": seqs,
               "drain_s": round(drained, 3), "target_serving": serving,
               "seconds": round(time.monotonic() - t0, 3), "state": self.state.value}
        log.warning("switchover_done", **out)
        return out

    def _keep_mine(self, other: str) -> dict[str, Any]:
        """`nbdgw resolve --discard OTHER` on the split-brained node: keep this node's
        writes.  Its volumes start a generation newer than both sides' on an epoch above
        OTHER's; it serves again and names OTHER in its beats, which then demotes itself
        (its writes kept as its own diverged snapshot) and takes this node's data."""
        renewed = {}
        for info in selected_volumes(self.cfg):
            if is_replica(info):
                continue
            try:
                renewed[info.name] = f"{renew_generation(self.cfg.data_dir, info.name).gen_id:016x}"
            except (BlockstoreError, OSError) as e:
                return {"error": f"volume {info.name}: {e}; nothing served"}
        rejoin.clear_split_brain(self.cfg.data_dir)
        self.epoch = max(self.epoch, self.view.known_epoch) + 1
        self._adopt_role(Role.PRIMARY, self.cfg.name,
                         f"split brain resolved: the writes of {other} discarded")
        with self._hb_lock():
            self.view.known_epoch = self.epoch
            self.view.discarding = other
        self.served_when_stale = False
        log.warning("split_brain_resolved", kept=self.cfg.name, discarded=other,
                    epoch=self.epoch, generations=renewed)
        self._feed(Event.KEPT)
        return {"ok": True, "discarded": other, "following": self.cfg.name,
                "state": self.state.value, "epoch": self.epoch}

    def _resolve(self, discard: str) -> dict[str, Any]:
        """`nbdgw resolve --discard NODE`: settle a split brain."""
        rec = rejoin.split_brain(self.cfg.data_dir)
        me = self.cfg.name
        if rec is None:
            return {"error": f"node {me} is not in split brain: nothing to resolve"}
        if discard not in (me, rec["other_node"]):
            return {"error": f"the split brain is between {me} and {rec['other_node']}; "
                             f"--discard names one of them, not {discard!r}"}
        if discard != me:
            return self._keep_mine(discard)
        rejoin.clear_split_brain(self.cfg.data_dir)
        self.served_when_stale = False
        ev = self._rejoin()
        if ev is None:
            return {"error": "rejoin did not complete (see the log); the split brain record "
                             "was cleared, the daemon retries"}
        self._feed(ev)
        return {"ok": True, "discarded": me, "following": self.view.primary,
                "state": self.state.value}

    def _renew_lease(self) -> None:
        """Touch the write lease while this node serves as primary (nbd_plugin Lease)."""
        path = lease_path(self.cfg.data_dir)
        try:
            os.utime(path)
        except FileNotFoundError:
            path.touch()
        except OSError as e:
            log.error("lease_not_renewed", error=str(e))

    def _tick(self, now: float) -> None:
        self._requests()
        if not self.auto or self.hb is None:
            return
        with self.hb.lock:
            for p, rep in self.view.reports.items():
                if rep.state is State.PRIMARY and now - rep.received < self.timers.timeout:
                    self.view.primary = p
                    if p == self.view.handover_to and rep.epoch > self.epoch:
                        self.view.handover_to = None  # the successor serves
                if p == self.view.discarding and rep.state in (
                        State.STANDBY, State.WITNESS) and rep.epoch == self.epoch:
                    self.view.discarding = None  # the discarded side follows this one
            event = decide(self.state, self.view, now, self.timers)
        if event is not None and event not in _noop_in(self.state):
            self._feed(event)
        if self.state is State.PRIMARY:
            # After deciding: a daemon that was frozen learns where it stands before its
            # lease (which nbdkit checks on every write) is renewed.
            self._renew_lease()
        if self.state in (State.STANDBY, State.WITNESS) and self.view.known_epoch > self.epoch:
            self._follow()
        if self.state is State.STALE and self.rejoin_pending and now >= self.rejoin_at:
            ev = self._rejoin()
            if ev is not None:
                self._feed(ev)

    def run(self) -> int:
        def on_signal(signum: int, _frame: Any) -> None:
            self.stop_event.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self._boot()
        last_publish = 0.0
        while not self.stop_event.wait(TICK):
            now = time.monotonic()
            self._tick(now)
            self._supervise(now)
            if now - last_publish > 1.0:
                self._publish()
                last_publish = now
        log.info("daemon_stopping", state=self.state.value)
        if self.hb is not None:
            self.hb.stop()
        if self.control is not None:
            self.control.close()
        if self.metrics is not None:
            self.metrics.stop()
        if self.iscsi is not None:
            self.iscsi.stop()  # before nbdkit: tgtd's LUNs sit on NBD exports
        for name in ("nbdkit", "peerlink"):
            self._drop_child(name)
        if self.vip is not None and self.state is State.PRIMARY:
            self.vip.release()
        return 0


def _noop_in(state: State) -> frozenset[Event]:
    """Events that, in this state, change nothing (not worth a log line each tick)."""
    return {
        State.PRIMARY: frozenset({Event.QUORUM_OK}),
        State.FENCED: frozenset({Event.QUORUM_LOST}),
        State.STANDBY: frozenset({Event.NEWER_PRIMARY}),
        State.WITNESS: frozenset({Event.NEWER_PRIMARY}),
        State.STALE: frozenset({Event.NEWER_PRIMARY}),
    }.get(state, frozenset())
