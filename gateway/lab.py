"""`nbdgw lab`: a three-site lab on one machine, in network namespaces.

Sites: primary ``main``, secondary ``dc`` and DR ``dr`` (or, with ``--witness``, a
witness ``wit`` that holds no data in dr's place: the lab's *shape*), plus a ``client`` namespace,
each with one veth on a bridge that lives in a namespace of its own (nothing touches
the host's interfaces).  Every namespace is named ``nbdgw-<id>-<site>`` so that two labs
coexist.  Each site runs ``nbdgw daemon`` from its own node config (role, peers, the
shared peer secret), exactly as a deployed node does; replicated volume ``v1`` is fanned
out from the primary to both replicas, or cascaded (main -> dc -> dr) with
``--topology cascade``; whichever site is primary holds the service address.  With
``--iscsi`` every site runs the iSCSI bridge too: one target IQN, the portal on the
service address, a tgtd control port and run directory of its own per site.

With ``--dns`` the clients live in another subnet (``DNS_CLIENT_SUBNET``), behind the
bridge namespace acting as a router, where no address can move: a BIND server in a
namespace of its own serves the dynamic zone ``nbdgw.lab``, every site's config has
``service.dns`` (its own address, the lab's TSIG key) instead of the service address, and
clients reach the primary as ``db.nbdgw.lab`` through the server (``/etc/netns/<client
namespace>/resolv.conf``, which ``ip netns exec`` mounts over /etc/resolv.conf).

Everything the other verbs need (namespaces, argv, pids with their start times so that a
recycled pid is never killed) is in ``DIR/lab.json``; processes run detached in their own
sessions, so ``kill`` can take down a whole site (a power cut) from another process.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import yaml

from blockstore.meta import read_json, write_json
from blockstore.volume import parse_size
from nbdgw_common.errors import CommandError, GatewayError
from nbdgw_common.proc import run

from . import labdns, labetcd

LAB_KIND: Final = "lab"
LAB_VERSION: Final = 1
MAIN_SITE: Final = frozenset({"primary", "secondary"})
DEFAULT_SUBNET: Final = "192.0.2.0/24"  # TEST-NET-1 (RFC 5737): never a real network
DEFAULT_SIZE: Final = "256M"
NBD_PORT: Final = 10809
PEER_PORT: Final = 7789
METRICS_PORT: Final = 9810  # each site's Prometheus endpoint, on its own address
VOLUME: Final = "v1"
# The lab's shapes: (site, role) each; the primary ships to every other data site
# (fan-out).  A witness runs `nbdgw witness`: no volume, no nbdkit, no peerlink.
SHAPES: Final = {
    "dr": (("main", "primary"), ("dc", "secondary"), ("dr", "dr")),
    "witness": (("main", "primary"), ("dc", "secondary"), ("wit", "witness")),
}
SITES: Final = SHAPES["dr"]
WITNESS: Final = "witness"  # the role of a site without data
PRIMARY: Final = "main"
CLIENT: Final = "client"
BRIDGE: Final = "br0"
CLIENT_BRIDGE: Final = "br1"  # --dns: the clients' subnet
READY_TIMEOUT: Final = 30.0  # each wait of up/start (export, listener, streaming)
STOP_TIMEOUT: Final = 15.0  # down: SIGTERM, then SIGKILL after this
ISCSI_PORT: Final = 3260
ISCSI_IQN: Final = "iqn.2026-11.org.example:nbdgw-lab"  # + "-<id>"; volume v1 is "...:v1"
TGTD_SOCKET_DIR: Final = Path("/var/run/tgtd")  # tgtd's control sockets (host-wide)
TGTD_PORTS: Final = (20000, 32767)  # control ports the lab picks from (tgtd allows 1..32767)
DNS_CLIENT_SUBNET: Final = "198.51.100.0/24"  # TEST-NET-2: the clients' subnet with --dns
DNS_ZONE: Final = "nbdgw.lab"
DNS_NAME: Final = f"db.{DNS_ZONE}"
DNS_TTL: Final = 5
NETNS_ETC: Final = Path("/etc/netns")  # per-namespace /etc files of `ip netns exec`


class LabError(GatewayError):
    """A lab command failed; the message says what and where."""


# -- small helpers ------------------------------------------------------------------------


def nbdgw_argv() -> list[str]:
    """The nbdgw executable next to this interpreter (the venv), else the one on PATH."""
    exe = Path(sys.executable).parent / "nbdgw"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("nbdgw")
    if found is None:
        raise LabError("cannot find the nbdgw executable")
    return [found]


def precheck() -> None:
    """Fail early with one line: the lab needs root and `ip netns`."""
    if os.geteuid() != 0:
        raise LabError("nbdgw lab needs root (it creates network namespaces); run it as root")
    try:
        run(["ip", "netns", "list"], timeout=10)
    except CommandError as e:
        raise LabError(f"'ip netns' is unavailable: {e}") from None


def precheck_dns() -> None:
    """--dns needs BIND's named and tsig-keygen."""
    from .doctor import MissingTool, require

    for tool in ("named", "tsig-keygen"):
        try:
            require(tool)
        except MissingTool as e:
            raise LabError(f"--dns: {e}") from None


def precheck_iscsi() -> None:
    """--iscsi needs tgtd on every site and iscsi-inq to see the target answer."""
    from .doctor import MissingTool, require

    for tool in ("tgtd", "iscsi-inq"):
        try:
            require(tool)
        except MissingTool as e:
            raise LabError(f"--iscsi: {e}") from None


def proc_start_time(pid: int) -> int | None:
    """The start time (clock ticks since boot) of a live, non-zombie ``pid``, else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    if fields[0] in ("Z", "X"):  # dead; our detached children are reaped by whoever
        return None
    return int(fields[19])


def alive(p: dict[str, Any]) -> bool:
    """Whether the recorded process still runs (same pid *and* same start time)."""
    pid = p.get("pid")
    return pid is not None and proc_start_time(pid) == p.get("start_time")


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def netns_pids(name: str) -> list[int]:
    if not netns_exists(name):
        return []
    try:
        return [int(x) for x in run(["ip", "netns", "pids", name], timeout=10).split()]
    except CommandError:
        return []


def tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return "(no log)"
    return " / ".join(text[-lines:]) or "(empty log)"


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def log_events(path: Path, offset: int) -> Iterator[dict[str, Any]]:
    """The JSON log lines of ``path`` from byte ``offset`` on (other lines skipped)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return
    for line in data.splitlines():
        if line.startswith(b"{"):
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    yield obj


def log_has_line(path: Path, offset: int, prefix: str) -> bool:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return False
    return any(line.startswith(prefix.encode()) for line in data.splitlines())


@contextlib.contextmanager
def locked(lab_dir: Path) -> Iterator[None]:
    """One lab command at a time per DIR."""
    if not (lab_dir / "lab.json").exists():
        raise LabError(f"no lab in {lab_dir} ({lab_dir / 'lab.json'} not found; create one "
                       f"with 'nbdgw lab up --dir {lab_dir}')")
    fd = os.open(lab_dir / "lab.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- the lab description ------------------------------------------------------------------


class Lab:
    """The lab described by DIR/lab.json; every verb loads it, acts, and saves it."""

    def __init__(self, lab_dir: Path, state: dict[str, Any]) -> None:
        self.dir = lab_dir
        self.state = state

    @classmethod
    def load(cls, lab_dir: Path) -> Lab:
        path = lab_dir / "lab.json"
        if not path.exists():
            raise LabError(f"no lab in {lab_dir} ({path} not found; create one with "
                           f"'nbdgw lab up --dir {lab_dir}')")
        return cls(lab_dir, read_json(path, LAB_KIND, LAB_VERSION))

    def save(self) -> None:
        write_json(self.dir / "lab.json", self.state)

    @property
    def nodes(self) -> list[dict[str, Any]]:
        return list(self.state["nodes"])

    def names(self, *, data: bool | None = None, primary: bool = True) -> list[str]:
        """The sites in order; ``data``: only those with (True) or without (False)
        volumes; ``primary=False``: not the installed primary."""
        return [n["name"] for n in self.state["nodes"]
                if (data is None or (n["role"] != WITNESS) is data)
                and (primary or n["name"] != PRIMARY)]

    def is_witness(self, name: str) -> bool:
        return bool(self.node(name)["role"] == WITNESS)

    @property
    def etcd_members(self) -> list[dict[str, Any]]:
        """With --coordinator etcd: the etcd members (shaped like sites; gateway/labetcd.py)."""
        etcd = self.state.get("etcd")
        return list(etcd["members"]) if etcd else []

    def node(self, name: str) -> dict[str, Any]:
        for n in (*self.state["nodes"], *self.etcd_members):
            if n["name"] == name:
                return dict(n)
        raise LabError(f"no node {name!r} in the lab (nodes: "
                       + ", ".join(n["name"] for n in (*self.state["nodes"],
                                                       *self.etcd_members)) + ")")

    def all_netns(self) -> list[str]:
        dns = self.state.get("dns")
        return [n["netns"] for n in (*self.state["nodes"], *self.etcd_members)] + [
            self.state["client_netns"], self.state["bridge_netns"],
            *([dns["netns"]] if dns else [])]

    def summary(self) -> dict[str, Any]:
        """The JSON that `lab up` prints (the shape scripts rely on)."""
        s = self.state
        if s.get("shape") == "branches":
            from . import labbranches

            return labbranches.summary(self)
        return {
            "id": s["id"],
            "dir": s["dir"],
            "subnet": s["subnet"],
            "service_address": s["service_address"],
            "nbd_port": NBD_PORT,
            "client_netns": s["client_netns"],
            "client_address": s["client_address"],
            "bridge_netns": s["bridge_netns"],
            "volumes": [VOLUME],
            "topology": s.get("topology", "fanout"), "mode": s.get("mode", "async"),
            "shape": s.get("shape", "dr"),
            "iscsi": s.get("iscsi"),
            "dns": ({k: s["dns"][k] for k in ("name", "zone", "server", "ttl",
                                               "client_subnet", "netns")}
                    if s.get("dns") else None),
            "nodes": [{k: n[k] for k in ("name", "role", "netns", "address", "config",
                                         "data_dir")} for n in s["nodes"]],
            "etcd": ({"endpoints": s["etcd"]["endpoints"], "group": s["etcd"]["group"],
                      "members": [{k: m[k] for k in ("name", "netns", "address")}
                                  for m in s["etcd"]["members"]]}
                     if s.get("etcd") else None),
        }

    # -- processes ----------------------------------------------------------------------

    def start_proc(self, node: dict[str, Any], p: dict[str, Any]) -> None:
        """Start one recorded process detached in its node's namespace; record its pid."""
        log = Path(p["log"])
        p["log_offset"] = log_size(log)
        with log.open("ab") as out:
            child = subprocess.Popen(  # an argv list, never a shell string
                ["ip", "netns", "exec", node["netns"], *p["argv"]],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=node["dir"],
                start_new_session=True)
        # `ip netns exec` execs the command: the pid is the command's own.
        start = proc_start_time(child.pid)
        child.returncode = 0  # detached: not ours to reap (silences Popen.__del__)
        p["pid"] = child.pid
        p["start_time"] = start

    def start_node(self, name: str) -> None:
        node = self.node(name)
        running = [p["name"] for p in node["procs"] if alive(p)]
        if running:
            raise LabError(f"node {name} is running ({', '.join(running)}); "
                           f"'nbdgw lab kill {name}' first")
        for p in node["procs"]:
            self.start_proc(node, p)
        self._replace_node(node)
        self.save()

    def _replace_node(self, node: dict[str, Any]) -> None:
        self.state["nodes"] = [node if n["name"] == node["name"] else n
                               for n in self.state["nodes"]]
        if self.state.get("etcd"):
            self.state["etcd"]["members"] = [node if n["name"] == node["name"] else n
                                             for n in self.state["etcd"]["members"]]

    def start_etcd(self) -> None:
        """With --coordinator etcd: start every member, then wait until each is healthy."""
        for m in self.etcd_members:
            self.start_node(m["name"])
        for m in self.etcd_members:
            labetcd.wait_healthy(self.node(m["name"]), alive, tail)

    def kill_node(self, name: str) -> list[str]:
        """SIGKILL every process of the site at once: the recorded process groups, then
        anything else still in its namespace.  Returns the names of what was running."""
        node = self.node(name)
        killed = []
        for p in node["procs"]:
            if alive(p):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p["pid"], signal.SIGKILL)
                killed.append(p["name"])
        for pid in netns_pids(node["netns"]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._wait_dead(node, 10.0)
        return killed

    def _wait_dead(self, node: dict[str, Any], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(alive(p) for p in node["procs"]) or any(
                proc_start_time(pid) is not None for pid in netns_pids(node["netns"])):
            if time.monotonic() > deadline:
                left = [p["name"] for p in node["procs"] if alive(p)]
                raise LabError(f"node {node['name']}: processes still alive after "
                               f"{timeout:g} s: {left or netns_pids(node['netns'])}")
            time.sleep(0.05)

    # -- readiness ------------------------------------------------------------------------

    def proc(self, node: str, pname: str) -> dict[str, Any]:
        """The record of process ``pname`` of ``node`` (its argv, log, pid)."""
        return next(p for p in self.node(node)["procs"] if p["name"] == pname)

    def _check_running(self, node: str, p: dict[str, Any]) -> None:
        if not alive(p):
            raise LabError(f"node {node}: {p['name']} exited; {p['log']}: {tail(Path(p['log']))}")

    def _wait_event(self, node: str, offset: int, what: str,
                    match: Any) -> None:
        p = self.proc(node, "daemon")
        deadline = time.monotonic() + READY_TIMEOUT
        while not any(match(e) for e in log_events(Path(p["log"]), offset)):
            self._check_running(node, p)
            if time.monotonic() > deadline:
                raise LabError(f"node {node}: {what} within {READY_TIMEOUT:g} s; "
                               f"{p['log']}: {tail(Path(p['log']))}")
            time.sleep(0.05)

    def wait_heartbeats(self, node: str) -> None:
        """A witness runs no receiver: until its daemon beats and has published its
        failover state."""
        self._wait_event(node, self.proc(node, "daemon")["log_offset"],
                         "the daemon did not start its heartbeats",
                         lambda e: e.get("event") == "heartbeat_started")
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.failover_state(node).get("state"):
            self._check_running(node, self.proc(node, "daemon"))
            if time.monotonic() > deadline:
                raise LabError(f"node {node}: no failover state published within "
                               f"{READY_TIMEOUT:g} s")
            time.sleep(0.05)

    def wait_listening(self, node: str) -> None:
        self._wait_event(node, self.proc(node, "daemon")["log_offset"],
                         "the peerlink receiver did not listen",
                         lambda e: e.get("event") == "listening" and e.get("side") == "receiver")

    def failover_state(self, name: str) -> dict[str, Any]:
        """What the site's daemon last published (state, epoch), or {} if nothing yet."""
        path = Path(self.node(name)["data_dir"]) / "run" / "failover.json"
        try:
            return json.loads(path.read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return {}

    def current_primary(self) -> str:
        """The site serving now (the highest epoch among those in state primary)."""
        best = (PRIMARY, -1)
        for n in self.nodes:
            st = self.failover_state(n["name"])
            if st.get("state") == "primary" and int(st.get("epoch", 0)) > best[1]:
                best = (n["name"], int(st.get("epoch", 0)))
        return best[0]

    def sender_of(self, peer: str) -> str:
        """The site that ships to ``peer``: the primary, or dc for dr under cascade."""
        if peer == "dr" and self.state.get("topology") == "cascade":
            return "dc"
        return self.current_primary()

    def wait_streaming(self, peer: str, offset: int | None = None,
                       events: tuple[str, ...] = ("streaming",)) -> None:
        """Until the sender to ``peer`` logs one of ``events`` past ``offset``."""
        node = self.sender_of(peer)
        start = self.proc(node, "daemon")["log_offset"] if offset is None else offset
        self._wait_event(node, start, f"the sender to {peer} did not report "
                         f"{' or '.join(events)}",
                         lambda e: e.get("event") in events and e.get("side") == "sender"
                         and e.get("peer") == peer)

    def wait_export(self) -> None:
        """Until the export answers an NBD handshake from the client namespace."""
        host = self.state["dns"]["name"] if self.state.get("dns") else self.state[
            "service_address"]
        uri = f"nbd://{host}:{NBD_PORT}/{VOLUME}"
        script = (
            "import sys, time, nbd\n"
            "deadline = time.monotonic() + float(sys.argv[2]); err = ''\n"
            "while time.monotonic() < deadline:\n"
            "    h = nbd.NBD()\n"
            "    try:\n"
            "        h.connect_uri(sys.argv[1]); print(h.get_size()); h.shutdown(); "
            "sys.exit(0)\n"
            "    except nbd.Error as e:\n"
            "        err = str(e)\n"
            "    time.sleep(0.1)\n"
            "sys.exit('no answer: ' + err)\n")
        serve = self.proc(self.current_primary(), "daemon")
        try:
            run(["ip", "netns", "exec", self.state["client_netns"], sys.executable, "-c",
                 script, uri, str(READY_TIMEOUT)], timeout=READY_TIMEOUT + 10)
        except CommandError as e:
            raise LabError(f"export {uri} did not answer from {self.state['client_netns']} "
                           f"within {READY_TIMEOUT:g} s ({e.stderr.strip()}); "
                           f"{serve['log']}: {tail(Path(serve['log']))}") from None

    def iscsi_url(self) -> str | None:
        """The iSCSI URL of v1's LUN at the service address (None without --iscsi)."""
        i = self.state.get("iscsi")
        return None if not i else f"iscsi://{i['portal']}/{i['iqn']}:{VOLUME}/1"

    def wait_iscsi(self) -> None:
        """With --iscsi: until the target answers an INQUIRY from the client namespace."""
        url = self.iscsi_url()
        if url is None:
            return
        deadline = time.monotonic() + READY_TIMEOUT
        argv = ["ip", "netns", "exec", self.state["client_netns"], "iscsi-inq", url]
        while True:
            try:
                run(argv, timeout=30)
                return
            except CommandError as e:
                if time.monotonic() > deadline:
                    serve = self.proc(self.current_primary(), "daemon")
                    raise LabError(f"iSCSI target {url} did not answer from "
                                   f"{self.state['client_netns']} within "
                                   f"{READY_TIMEOUT:g} s ({e.stderr.strip()}); "
                                   f"{serve['log']}: {tail(Path(serve['log']))}") from None
            time.sleep(0.2)

    def remove_tgtd_sockets(self) -> list[str]:
        """The control sockets the sites' tgtd left (killed tgtds do not remove them)."""
        removed = []
        for n in self.state["nodes"]:
            port = n.get("tgtd_control_port")
            for suffix in ("", ".lock"):
                path = TGTD_SOCKET_DIR / f"socket.{port}{suffix}"
                if port and path.exists():
                    path.unlink()
                    removed.append(str(path))
        return removed

    def wait_node_ready(self, name: str, sender_offsets: dict[str, int] | None = None,
                        since: float = 0.0) -> None:
        """What `start` waits for: the site's daemon has decided its failover state;
        then the export (if it serves) or its receiver, and the links into it."""
        deadline = time.monotonic() + READY_TIMEOUT
        booted = since  # what the daemon published before this start is stale

        def settled() -> bool:
            st = self.failover_state(name)
            return st.get("state") not in (None, "starting") and st.get("updated", 0) > booted

        while not settled():
            self._check_running(name, self.proc(name, "daemon"))
            if time.monotonic() > deadline:
                raise LabError(f"node {name}: the daemon did not settle its failover state "
                               f"within {READY_TIMEOUT:g} s")
            time.sleep(0.05)
        state = self.failover_state(name).get("state")
        if state in ("stale", "fenced") or self.is_witness(name):
            return  # a former primary serves nothing until it rejoins; a witness, never
        if state == "primary":
            self.wait_export()
            self.wait_iscsi()
        else:
            self.wait_listening(name)
        for peer in self.names(data=True):
            if peer == self.current_primary() or self.failover_state(peer).get(
                    "state") in ("stale", "fenced"):
                continue
            src = self.sender_of(peer)
            if name not in (src, peer) or not alive(self.proc(src, "daemon")):
                continue
            offset = None if src == name or sender_offsets is None else sender_offsets[src]
            self.wait_streaming(peer, offset, events=("streaming", "resync_started"))

    # -- teardown -------------------------------------------------------------------------

    def stop_all(self, graceful: bool) -> list[str]:
        """SIGTERM every process (volumes close cleanly), then SIGKILL what is left.

        Returns ``node/process`` for each process that was running."""
        running = [(n["name"], p) for n in self.state["nodes"] for p in n["procs"]
                   if alive(p)]
        if graceful:
            for _, p in running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p["pid"], signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            while any(alive(p) for _, p in running) and time.monotonic() < deadline:
                time.sleep(0.05)
        for n in self.state["nodes"]:
            self.kill_node(n["name"])
        for m in self.etcd_members:  # after the sites: they must not see etcd go first
            self.kill_node(m["name"])
        dns = self.state.get("dns")
        if dns and alive(dns["proc"]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(dns["proc"]["pid"], signal.SIGTERM)
        for ns in (self.state["client_netns"], self.state["bridge_netns"],
                   *([dns["netns"]] if dns else [])):
            for pid in netns_pids(ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return [f"{name}/{p['name']}" for name, p in running]

    def start_dns(self) -> None:
        """With --dns: the zone's files and named in its namespace."""
        dns = self.state.get("dns")
        if not dns:
            return
        zone = labdns.Zone(Path(dns["dir"]), dns["zone"], dns["address"])
        zone.write()
        p = dns["proc"]
        child = labdns.start(zone, dns["netns"], Path(p["log"]))
        assert child.proc is not None
        pid = child.proc.pid
        p["pid"], p["start_time"] = pid, proc_start_time(pid)
        child.proc.returncode = 0  # detached (its own session): not ours to reap
        self.save()

    def _dns(self) -> dict[str, Any]:
        dns = self.state.get("dns")
        if not dns or self.state["state"] != "up":
            raise LabError(f"the lab in {self.state['dir']} has no name server running "
                           "(it was not built with --dns, or is not up)")
        return dict(dns)

    def kill_dns(self) -> list[str]:
        """SIGKILL the name server (its zone and journal stay: a restart keeps the
        records the sites published)."""
        p = self._dns()["proc"]
        if not alive(p):
            return []
        with contextlib.suppress(ProcessLookupError):
            os.kill(p["pid"], signal.SIGKILL)
        deadline = time.monotonic() + STOP_TIMEOUT
        while alive(p) and time.monotonic() < deadline:
            time.sleep(0.05)
        return ["named"]

    def restart_dns(self) -> int:
        """Start the name server again on its files as they are; its new pid."""
        dns = self._dns()
        if alive(dns["proc"]):
            raise LabError("the name server is running; 'nbdgw lab kill dns' first")
        zone = labdns.Zone(Path(dns["dir"]), dns["zone"], dns["address"])
        child = labdns.start(zone, dns["netns"], Path(dns["proc"]["log"]))
        assert child.proc is not None
        pid = child.proc.pid
        self.state["dns"]["proc"].update(pid=pid, start_time=proc_start_time(pid))
        child.proc.returncode = 0  # detached (its own session): not ours to reap
        self.save()
        return pid

    def remove_netns_etc(self) -> None:
        """The resolv.conf files `ip netns exec` mounts for the lab's namespaces."""
        for ns in self.all_netns():
            d = NETNS_ETC / ns
            if d.is_dir():
                shutil.rmtree(d)

    def delete_netns(self) -> list[str]:
        removed = []
        for ns in self.all_netns():
            if netns_exists(ns):
                run(["ip", "netns", "delete", ns], timeout=30)
                removed.append(ns)
        return removed


# -- building -----------------------------------------------------------------------------


def tgtd_control_ports(lab_id: str, count: int) -> list[int]:
    """``count`` tgtd control ports that no tgtd on this host uses (no socket file):
    tgtd's control socket lives in the file system, which every namespace shares."""
    lo, hi = TGTD_PORTS
    span = hi - lo + 1
    start = int(lab_id, 16) % span
    ports: list[int] = []
    for i in range(span):
        port = lo + (start + i) % span
        if not (TGTD_SOCKET_DIR / f"socket.{port}").exists():
            ports.append(port)
            if len(ports) == count:
                return ports
    raise LabError(f"no free tgtd control port in {lo}..{hi} ({TGTD_SOCKET_DIR})")


def plan(lab_dir: Path, subnet: str, size: str, topology: str = "fanout",
         mode: str = "async", iscsi: bool = False, dns: bool = False,
         shape: str = "dr", coordinator: str = "heartbeat") -> dict[str, Any]:
    """The lab's description before anything exists: names, addresses, paths, argv."""
    if shape not in SHAPES:
        raise LabError(f"unknown lab shape {shape!r} (known: {', '.join(SHAPES)})")
    if coordinator not in ("heartbeat", "etcd"):
        raise LabError(f"--coordinator: heartbeat or etcd, not {coordinator!r}")
    if coordinator == "etcd" and (shape == WITNESS or dns):
        raise LabError("--coordinator etcd: not with --witness (etcd decides, a witness "
                       "has nothing to do) nor --dns")
    if shape == WITNESS and topology == "cascade":
        raise LabError("--witness with --topology cascade: a cascade ships through dc to "
                       "a DR site, and a witness holds no data")
    sites = SHAPES[shape]
    try:
        net = ipaddress.ip_network(subnet, strict=False)
    except ValueError:
        raise LabError(f"--subnet: expected an IPv4 network such as {DEFAULT_SUBNET}, "
                       f"got {subnet!r}") from None
    if net.version != 4 or net.num_addresses < 8:
        raise LabError(f"--subnet: expected an IPv4 network of at least 8 addresses (/29), "
                       f"got {subnet}")
    nbytes = parse_size(size)
    if dns and (net.num_addresses < 16
                or net.overlaps(ipaddress.ip_network(DNS_CLIENT_SUBNET))):
        raise LabError(f"--subnet with --dns: expected an IPv4 network of at least 16 "
                       f"addresses (/28) apart from the clients' {DNS_CLIENT_SUBNET}, "
                       f"got {subnet}")
    if coordinator == "etcd" and net.num_addresses < 16:
        raise LabError(f"--subnet with --coordinator etcd: expected an IPv4 network of at "
                       f"least 16 addresses (/28), got {subnet}")
    # three sites, client, the service address; with --dns the server and the router;
    # with etcd its three members
    hosts = list(net.hosts())[:10]
    lab_id = secrets.token_hex(3)
    prefix = f"nbdgw-{lab_id}"
    nbdgw = nbdgw_argv()
    secret = lab_dir / "peer.secret"
    ports = tgtd_control_ports(lab_id, len(sites)) if iscsi else [0] * len(sites)
    nodes = []
    for (name, role), addr, port in zip(sites, hosts, ports, strict=False):
        site = lab_dir / name
        data = site / "data"
        cfg = site / "nbdgw.yaml"
        node_secret = site / "peer.secret"
        verb = "witness" if role == WITNESS else "daemon"  # the same daemon, checked role
        procs: list[dict[str, Any]] = [
            {"name": "daemon", "log": str(site / "daemon.log"),
             "argv": [*nbdgw, "-c", str(cfg), "--log-format", "json", verb]}]
        for p in procs:
            p.update(pid=None, start_time=None, log_offset=0)
        nodes.append({"name": name, "role": role, "netns": f"{prefix}-{name}",
                      "address": str(addr), "veth": f"v-{name}", "dir": str(site),
                      "data_dir": str(data), "config": str(cfg), "secret": str(node_secret),
                      "procs": procs,
                      **({"tgtd_control_port": port, "iscsi_run_dir": str(site / "iscsi")}
                         if iscsi and role != WITNESS else {})})
    dns_plan = None
    client_address = str(hosts[3])
    if dns:
        cnet = ipaddress.ip_network(DNS_CLIENT_SUBNET)
        router_b, client_b = list(cnet.hosts())[:2]
        client_address = str(client_b)
        ddir = lab_dir / "dns"
        dns_plan = {
            "netns": f"{prefix}-dns", "address": str(hosts[5]), "zone": DNS_ZONE,
            "name": DNS_NAME, "ttl": DNS_TTL, "server": f"{hosts[5]}:53",
            "dir": str(ddir), "key_file": str(ddir / f"{labdns.UPDATE_KEY}.key"),
            "router": str(hosts[6]), "client_subnet": str(cnet),
            "client_prefixlen": cnet.prefixlen, "client_router": str(router_b),
            "proc": {"name": "named", "log": str(lab_dir / "named.log"), "pid": None,
                     "start_time": None}}
    etcd = (labetcd.plan(prefix, lab_dir, lab_id, [str(h) for h in hosts[7:10]])
            if coordinator == "etcd" else None)
    return {
        "kind": LAB_KIND, "version": LAB_VERSION, "id": lab_id, "dir": str(lab_dir),
        "etcd": etcd,
        "subnet": str(net), "prefixlen": net.prefixlen, "size": nbytes,
        "service_address": str(hosts[4]),  # held by whichever site is primary
        "client_netns": f"{prefix}-{CLIENT}", "client_address": client_address,
        "dns": dns_plan,
        "bridge_netns": f"{prefix}-br", "secret": str(secret), "state": "building",
        "topology": topology, "mode": mode, "shape": shape,
        "iscsi": ({"portal": f"{hosts[4]}:{ISCSI_PORT}", "iqn": f"{ISCSI_IQN}-{lab_id}"}
                  if iscsi else None),
        "nodes": nodes,
    }


def build_network(s: dict[str, Any]) -> None:
    """Namespaces, the bridge (in its own namespace), veths and addresses."""
    br = s["bridge_netns"]
    run(["ip", "netns", "add", br])
    run(["ip", "-n", br, "link", "add", BRIDGE, "type", "bridge"])
    run(["ip", "-n", br, "link", "set", BRIDGE, "up"])
    dns = s.get("dns")
    ends = [(n["netns"], n["veth"], n["address"], BRIDGE, s["prefixlen"])
            for n in (*s["nodes"], *(s["etcd"]["members"] if s.get("etcd") else ()))]
    if dns:
        # The clients' subnet on a second bridge; the bridge namespace routes between.
        run(["ip", "-n", br, "link", "add", CLIENT_BRIDGE, "type", "bridge"])
        run(["ip", "-n", br, "link", "set", CLIENT_BRIDGE, "up"])
        run(["ip", "-n", br, "addr", "add", f"{dns['router']}/{s['prefixlen']}", "dev",
             BRIDGE])
        run(["ip", "-n", br, "addr", "add",
             f"{dns['client_router']}/{dns['client_prefixlen']}", "dev", CLIENT_BRIDGE])
        run(["ip", "netns", "exec", br, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        ends.append((dns["netns"], "v-dns", dns["address"], BRIDGE, s["prefixlen"]))
        ends.append((s["client_netns"], f"v-{CLIENT}", s["client_address"], CLIENT_BRIDGE,
                     dns["client_prefixlen"]))
    else:
        ends.append((s["client_netns"], f"v-{CLIENT}", s["client_address"], BRIDGE,
                     s["prefixlen"]))
    for ns, veth, addr, bridge, prefixlen in ends:
        run(["ip", "netns", "add", ns])
        run(["ip", "-n", br, "link", "add", veth, "type", "veth", "peer", "name", "eth0",
             "netns", ns])
        run(["ip", "-n", br, "link", "set", veth, "master", bridge, "up"])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        run(["ip", "-n", ns, "addr", "add", f"{addr}/{prefixlen}", "dev", "eth0"])
        run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        if dns:
            gw = dns["client_router"] if bridge == CLIENT_BRIDGE else dns["router"]
            run(["ip", "-n", ns, "route", "add", "default", "via", gw])
    if dns:
        etc = NETNS_ETC / s["client_netns"]
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"nameserver {dns['address']}\n")


def write_site(s: dict[str, Any], node: dict[str, Any], secret: bytes) -> None:
    """The site's directory, node config, secret and volume (replica on dc and dr; a
    witness has none: its config names no volume, NBD, service or iSCSI)."""
    site = Path(node["dir"])
    Path(node["data_dir"]).mkdir(parents=True)
    cfg = {
        "version": 1,
        "node": {"name": node["name"], "data_dir": node["data_dir"], "role": node["role"]},
        "nbd": {"listen": [f"tcp:0.0.0.0:{NBD_PORT}"]},
        "service": ({"dns": {"name": s["dns"]["name"], "zone": s["dns"]["zone"],
                             "servers": [s["dns"]["server"]], "ttl": s["dns"]["ttl"],
                             "key_file": str(site / "dns.key"), "address": node["address"]}}
                    if s.get("dns") else
                    {"address": f"{s['service_address']}/{s['prefixlen']}",
                     "interface": "eth0"}),
        "peerlink": {"listen": f"{node['address']}:{PEER_PORT}",
                     "topology": s.get("topology", "fanout"), "secret_file": node["secret"]},
        # Sync is a property of the main-site pair: each names the other with the
        # lab's mode (whichever is primary ships sync to the other); DR never is.
        "peers": [{"name": n["name"], "role": n["role"], "address": n["address"],
                   "port": PEER_PORT,
                   "mode": s.get("mode", "async") if {n["role"], node["role"]} <= MAIN_SITE
                   else "async"}
                  for n in s["nodes"] if n["name"] != node["name"]],
        "volumes": [{"name": VOLUME, "size": s["size"]}],
        "metrics": {"listen": f"{node['address']}:{METRICS_PORT}"},
    }
    if s.get("etcd"):
        cfg["coordinator"] = labetcd.coordinator_config(s["etcd"])
    witness = node["role"] == WITNESS
    if witness:
        for key in ("nbd", "service", "volumes"):
            del cfg[key]
    if s.get("iscsi") and not witness:
        # The FUSE file is served inside nbdkit; the mounts live in the daemon's mount
        # namespace (`ip netns exec` makes one), so they die with the site.
        cfg["iscsi"] = {"enabled": True, "portal": s["iscsi"]["portal"],
                        "iqn": s["iscsi"]["iqn"], "control_port": node["tgtd_control_port"],
                        "run_dir": node["iscsi_run_dir"], "fuse": "nbdkit"}
    (site / "nbdgw.yaml").write_text(
        f"# nbdgw lab {s['id']}: node {node['name']} ({node['role']})\n"
        + yaml.safe_dump(cfg, sort_keys=False))
    fd = os.open(node["secret"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    if s.get("dns"):
        labdns.write_key(site / "dns.key", Path(s["dns"]["key_file"]).read_text())
    if witness:
        return
    replica = ["--replica"] if node["role"] != "primary" else []
    run([*nbdgw_argv(), "-c", node["config"], "volume", "create", VOLUME, *replica])


def start_sites(lab: Lab) -> None:
    """The replicas and the witness first, then the primary; wait for its export and
    for every link to stream."""
    for name in lab.names(primary=False):
        lab.start_node(name)
    for name in lab.names(data=True, primary=False):
        lab.wait_listening(name)
    for name in lab.names(data=False):
        lab.wait_heartbeats(name)
    lab.start_node(PRIMARY)
    lab.wait_export()
    lab.wait_iscsi()
    for name in lab.names(data=True, primary=False):
        lab.wait_streaming(name)


def up(lab_dir: Path, subnet: str = DEFAULT_SUBNET, size: str = DEFAULT_SIZE,
       topology: str = "fanout", mode: str = "async", iscsi: bool = False,
       dns: bool = False, witness: bool = False, branches: int = 0,
       coordinator: str = "heartbeat") -> dict[str, Any]:
    """Build and start the lab; return the summary JSON.  On failure, undo it.
    ``branches``: the fan-in shape of volume groups instead (gateway/labbranches.py)."""
    from . import labbranches

    precheck()
    if branches and coordinator != "heartbeat":
        raise LabError("--branches with --coordinator etcd: not built yet (the branches "
                       "lab starts no etcd cluster; its groups decide by heartbeats)")
    if branches and (iscsi or topology != "fanout" or subnet != DEFAULT_SUBNET):
        raise LabError("--branches builds its own subnets, topology (each branch group "
                       "cascades through dc to dr) and DNS names; it takes --size, --mode "
                       "and --witness only (no --iscsi, --topology or --subnet)")
    dns = dns or bool(branches)  # across subnets, clients follow names
    lab_dir = lab_dir.resolve()
    if (lab_dir / "lab.json").exists():
        raise LabError(f"{lab_dir} already holds a lab (lab.json); 'nbdgw lab down --dir "
                       f"{lab_dir}' keeps its data: use another --dir")
    lab_dir.mkdir(parents=True, exist_ok=True)
    if any(p.name != "lab.lock" for p in lab_dir.iterdir()):
        raise LabError(f"{lab_dir} is not empty; give an empty or new --dir")
    if iscsi:
        precheck_iscsi()
    if dns:
        precheck_dns()
        if iscsi:
            raise LabError("--dns with --iscsi: not supported (the lab's iSCSI portal is "
                           "the service address, which --dns replaces)")
    lab = Lab(lab_dir, labbranches.plan(lab_dir, branches, parse_size(size), mode, witness)
              if branches else plan(lab_dir, subnet, size, topology, mode, iscsi, dns,
                                    shape=WITNESS if witness else "dr",
                                    coordinator=coordinator))
    lab.save()  # first, so that `down` can clean up whatever a failed `up` left
    with locked(lab_dir):
        try:
            (labbranches.build_network if branches else build_network)(lab.state)
            secret = secrets.token_hex(32).encode() + b"\n"
            fd = os.open(lab.state["secret"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secret)
            lab.start_dns()
            for m in lab.etcd_members:
                Path(m["dir"]).mkdir(parents=True)
            lab.start_etcd()
            for node in lab.nodes:
                (labbranches.write_site if branches else write_site)(lab.state, node, secret)
            (labbranches.start_all if branches else start_sites)(lab)
        except BaseException:
            with contextlib.suppress(Exception):
                lab.stop_all(graceful=False)
            with contextlib.suppress(Exception):
                lab.delete_netns()
            with contextlib.suppress(Exception):
                lab.remove_tgtd_sockets()
            with contextlib.suppress(Exception):
                lab.remove_netns_etc()
            lab.state["state"] = "failed"
            lab.save()
            raise
        lab.state["state"] = "up"
        lab.save()
        return lab.summary()


DNS_SERVER: Final = "dns"  # `lab kill dns` / `lab start dns`: the name server (--dns)


def kill(lab_dir: Path, name: str) -> dict[str, Any]:
    """A power cut of one site (SIGKILL all its processes at once), or with ``dns`` of
    the lab's name server."""
    precheck()
    lab_dir = lab_dir.resolve()
    with locked(lab_dir):
        lab = Lab.load(lab_dir)
        at = time.time()
        killed = lab.kill_dns() if name == DNS_SERVER else lab.kill_node(name)
        return {"node": name, "killed": killed, "at": round(at, 3)}


def start(lab_dir: Path, name: str) -> dict[str, Any]:
    """Boot one site again with the same argv; wait as `up` does for that site."""
    precheck()
    lab_dir = lab_dir.resolve()
    with locked(lab_dir):
        lab = Lab.load(lab_dir)
        if name == DNS_SERVER:
            return {"node": name, "started": {"named": lab.restart_dns()}}
        if lab.state["state"] != "up" or not netns_exists(lab.node(name)["netns"]):
            raise LabError(f"the lab in {lab_dir} is {lab.state['state']}, not up")
        offsets = {n["name"]: log_size(Path(lab.proc(n["name"], "daemon")["log"]))
                   for n in lab.nodes}
        since = time.time()
        lab.start_node(name)
        if lab.state.get("shape") == "branches":
            from . import labbranches

            labbranches.wait_site(lab, name, since)
        elif name in {m["name"] for m in lab.etcd_members}:
            labetcd.wait_healthy(lab.node(name), alive, tail)
        else:
            lab.wait_node_ready(name, offsets, since)
        node = lab.node(name)
        return {"node": name, "started": {p["name"]: p["pid"] for p in node["procs"]}}


def down(lab_dir: Path) -> dict[str, Any]:
    """Stop everything and delete the namespaces and bridge; keep DIR's data.  Idempotent."""
    precheck()
    lab_dir = lab_dir.resolve()
    with locked(lab_dir):
        lab = Lab.load(lab_dir)
        stopped = lab.stop_all(graceful=True)
        lab.remove_tgtd_sockets()  # every process of the lab is gone: they are stale
        removed = lab.delete_netns()
        lab.remove_netns_etc()
        lab.state["state"] = "down"
        lab.save()
        return {"id": lab.state["id"], "stopped": stopped, "removed_netns": removed,
                "data_left_in": str(lab_dir)}
