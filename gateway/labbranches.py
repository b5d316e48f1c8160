"""`nbdgw lab up --branches N`: the fan-in shape of volume groups, in namespaces.

Sites: ``branch1`` .. ``branchN``, each in a subnet of its own (``198.18.K.0/24``) and
primary of its own group ``bK`` (volume ``vK``); ``dc``, the data centre, in the core
subnet, secondary of every branch group (it receives from every branch on its one
peerlink port: fan-in); ``dr``, the DR site, also in the core subnet, fed by dc
(cascade) and each group's third voter;
with ``--witness`` a witness ``wit`` votes instead and no DR site is built.  A router
namespace (the lab's bridge namespace) joins the subnets, the clients' subnet
(``198.51.100.0/24``) and the BIND server of zone ``nbdgw.lab``; no address can move
between subnets, so each group's clients find its primary by the name
``bK.nbdgw.lab``, which the group's primary publishes (README, "Service names by DNS").

Every site runs `nbdgw daemon` (`nbdgw witness` on the witness) on one config with
``sites`` and ``groups``, the same on every site but for ``node.name``: each group runs
in processes of its own (README, "Volume groups").  State, process records and the
verbs (`kill`, `start`, `down`) are those of gateway/lab.py; this module plans, builds
and waits for this shape.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Final

import yaml

from nbdgw_common.errors import CommandError
from nbdgw_common.proc import run

from . import labdns
from .lab import (
    BRIDGE,
    CLIENT,
    DNS_CLIENT_SUBNET,
    DNS_TTL,
    DNS_ZONE,
    LAB_KIND,
    LAB_VERSION,
    NBD_PORT,
    NETNS_ETC,
    READY_TIMEOUT,
    Lab,
    LabError,
    alive,
    nbdgw_argv,
)

CORE_SUBNET: Final = "192.0.2.0/24"  # dc, dr, the witness and the name server
BRANCH_SUBNET: Final = "198.18.{k}.0/24"  # RFC 2544's benchmark range: branch K
MAX_BRANCHES: Final = 9
DC: Final = "dc"
DR: Final = "dr"
WIT: Final = "wit"
ROUTER_HOST: Final = -1  # the router takes each subnet's last host address


def group_name(k: int) -> str:
    return f"b{k}"


def group_ports(k: int) -> dict[str, int]:
    """Group bK's ports on every site: distinct per group (groups share dc and dr).  No
    peerlink port: every group's replication arrives at each site's shared port
    (peerlink.listen), whose front routes it to the group (DESIGN §6a)."""
    return {"heartbeat": 7800 + 10 * k + 2, "nbd": NBD_PORT + k}


def plan(lab_dir: Path, branches: int, size: int, mode: str, witness: bool) -> dict[str, Any]:
    """The lab's description before anything exists."""
    if not 1 <= branches <= MAX_BRANCHES:
        raise LabError(f"--branches: expected 1..{MAX_BRANCHES}, got {branches}")
    lab_id = secrets.token_hex(3)
    prefix = f"nbdgw-{lab_id}"
    core = ipaddress.ip_network(CORE_SUBNET)
    core_hosts = list(core.hosts())
    subnets = [{"name": "core", "bridge": BRIDGE, "net": str(core),
                "router": str(core_hosts[ROUTER_HOST])}]
    sites: list[tuple[str, str, str, str]] = []  # name, kind, address, subnet
    for k in range(1, branches + 1):
        net = ipaddress.ip_network(BRANCH_SUBNET.format(k=k))
        hosts = list(net.hosts())
        subnets.append({"name": f"branch{k}", "bridge": f"br-b{k}", "net": str(net),
                        "router": str(hosts[ROUTER_HOST])})
        sites.append((f"branch{k}", "branch", str(hosts[0]), f"branch{k}"))
    sites.append((DC, "dc", str(core_hosts[0]), "core"))
    sites.append((WIT, "witness", str(core_hosts[2]), "core") if witness
                 else (DR, "dr", str(core_hosts[1]), "core"))
    cnet = ipaddress.ip_network(DNS_CLIENT_SUBNET)
    chosts = list(cnet.hosts())
    subnets.append({"name": CLIENT, "bridge": "br-c", "net": str(cnet),
                    "router": str(chosts[0])})
    nbdgw = nbdgw_argv()
    nodes = []
    for name, kind, address, subnet in sites:
        site = lab_dir / name
        cfg = site / "nbdgw.yaml"
        verb = "witness" if kind == "witness" else "daemon"
        nodes.append({
            "name": name, "role": kind, "netns": f"{prefix}-{name}", "address": address,
            "subnet": subnet, "veth": f"v-{name}", "dir": str(site),
            "data_dir": str(site / "data"), "config": str(cfg),
            "secret": str(site / "peer.secret"),
            "procs": [{"name": "daemon", "log": str(site / "daemon.log"),
                       "argv": [*nbdgw, "-c", str(cfg), "--log-format", "json", verb],
                       "pid": None, "start_time": None, "log_offset": 0}]})
    groups = [{"name": group_name(k), "volume": f"v{k}", "primary": f"branch{k}",
               "secondary": DC, **({"witness": WIT} if witness else {"dr": DR}),
               "ports": group_ports(k), "dns_name": f"{group_name(k)}.{DNS_ZONE}"}
              for k in range(1, branches + 1)]
    ddir = lab_dir / "dns"
    return {
        "kind": LAB_KIND, "version": LAB_VERSION, "id": lab_id, "dir": str(lab_dir),
        "shape": "branches", "mode": mode, "size": size, "subnet": str(core),
        "prefixlen": core.prefixlen, "subnets": subnets, "service_address": None,
        "client_netns": f"{prefix}-{CLIENT}", "client_address": str(chosts[1]),
        "bridge_netns": f"{prefix}-br", "secret": str(lab_dir / "peer.secret"),
        "state": "building", "topology": "fanout" if witness else "cascade",
        "iscsi": None, "nodes": nodes, "groups": groups,
        "dns": {"netns": f"{prefix}-dns", "address": str(core_hosts[4]), "zone": DNS_ZONE,
                "name": groups[0]["dns_name"], "ttl": DNS_TTL,
                "server": f"{core_hosts[4]}:53", "dir": str(ddir),
                "key_file": str(ddir / f"{labdns.UPDATE_KEY}.key"),
                "router": str(core_hosts[ROUTER_HOST]), "client_subnet": str(cnet),
                "client_prefixlen": cnet.prefixlen, "client_router": str(chosts[0]),
                "proc": {"name": "named", "log": str(lab_dir / "named.log"), "pid": None,
                         "start_time": None}},
    }


def build_network(s: dict[str, Any]) -> None:
    """A bridge per subnet in the router namespace (which forwards between them), and a
    namespace per site, the client and the name server, each on its subnet's bridge with
    the router as its default gateway."""
    br = s["bridge_netns"]
    run(["ip", "netns", "add", br])
    run(["ip", "netns", "exec", br, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
    nets = {n["name"]: n for n in s["subnets"]}
    for n in s["subnets"]:
        plen = ipaddress.ip_network(n["net"]).prefixlen
        run(["ip", "-n", br, "link", "add", n["bridge"], "type", "bridge"])
        run(["ip", "-n", br, "link", "set", n["bridge"], "up"])
        run(["ip", "-n", br, "addr", "add", f"{n['router']}/{plen}", "dev", n["bridge"]])
    ends = [(n["netns"], n["veth"], n["address"], n["subnet"]) for n in s["nodes"]]
    ends.append((s["dns"]["netns"], "v-dns", s["dns"]["address"], "core"))
    ends.append((s["client_netns"], f"v-{CLIENT}", s["client_address"], CLIENT))
    for ns, veth, addr, subnet in ends:
        net = nets[subnet]
        plen = ipaddress.ip_network(net["net"]).prefixlen
        run(["ip", "netns", "add", ns])
        run(["ip", "-n", br, "link", "add", veth, "type", "veth", "peer", "name", "eth0",
             "netns", ns])
        run(["ip", "-n", br, "link", "set", veth, "master", net["bridge"], "up"])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        run(["ip", "-n", ns, "addr", "add", f"{addr}/{plen}", "dev", "eth0"])
        run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        run(["ip", "-n", ns, "route", "add", "default", "via", net["router"]])
    etc = NETNS_ETC / s["client_netns"]
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "resolv.conf").write_text(f"nameserver {s['dns']['address']}\n")


def node_config(s: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """The one config of the lab (sites and groups), as ``node`` gets it."""
    mode = s.get("mode", "async")
    dns = s["dns"]
    groups = []
    for g in s["groups"]:
        # Sync is a property of the main-site pair (branch and dc name each other).
        replicas = [{"site": site, "mode": mode} for site in (g["primary"], g["secondary"])]
        groups.append({
            "name": g["name"], "primary": g["primary"], "secondary": g["secondary"],
            **({"witness": g["witness"]} if "witness" in g else {"dr": g["dr"]}),
            "topology": s["topology"], "replicas": replicas, "ports": g["ports"],
            "service": {"dns": {"name": g["dns_name"], "zone": dns["zone"],
                                "servers": [dns["server"]], "ttl": dns["ttl"],
                                "key_file": str(Path(node["dir"]) / "dns.key")}},
            "volumes": [{"name": g["volume"], "size": s["size"]}]})
    return {
        "version": 1,
        "node": {"name": node["name"], "data_dir": node["data_dir"]},
        "peerlink": {"secret_file": node["secret"]},
        "sites": [{"name": n["name"], "address": n["address"]} for n in s["nodes"]],
        "groups": groups,
    }


def write_site(s: dict[str, Any], node: dict[str, Any], secret: bytes) -> None:
    """The site's directory, config, secret, DNS key and its volumes of every group."""
    site = Path(node["dir"])
    Path(node["data_dir"]).mkdir(parents=True)
    (site / "nbdgw.yaml").write_text(
        f"# nbdgw lab {s['id']} (branches): node {node['name']} ({node['role']})\n"
        + yaml.safe_dump(node_config(s, node), sort_keys=False))
    fd = os.open(node["secret"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    labdns.write_key(site / "dns.key", Path(s["dns"]["key_file"]).read_text())
    for g in s["groups"]:
        if node["name"] == g["primary"]:
            replica = []
        elif node["name"] in (g["secondary"], g.get("dr")):
            replica = ["--replica"]
        else:
            continue
        run([*nbdgw_argv(), "-c", node["config"], "--group", g["name"], "volume", "create",
             g["volume"], *replica])


# -- readiness ---------------------------------------------------------------------------


def group_dir(lab: Lab, site: str, group: str) -> Path:
    return Path(lab.node(site)["data_dir"]) / "groups" / group


def group_state(lab: Lab, site: str, group: str) -> dict[str, Any]:
    """What the site's daemon of ``group`` last published ({} if nothing yet)."""
    try:
        return json.loads(  # type: ignore[no-any-return]
            (group_dir(lab, site, group) / "run" / "failover.json").read_text())
    except (OSError, ValueError):
        return {}


def members(g: dict[str, Any]) -> list[str]:
    return [g[k] for k in ("primary", "secondary", "dr", "witness") if k in g]


def link_state(lab: Lab, sender: str, g: dict[str, Any], peer: str) -> str | None:
    """The state of the sender's link to ``peer`` for the group's volume."""
    path = (group_dir(lab, sender, g["name"]) / "volumes" / g["volume"] / "peers"
            / f"{peer}.live.json")
    try:
        return str(json.loads(path.read_text()).get("state"))
    except (OSError, ValueError):
        return None


def serving(lab: Lab, g: dict[str, Any]) -> str | None:
    """The member of ``g`` that serves it now (highest epoch in state primary)."""
    best: tuple[str | None, int] = (None, -1)
    for site in members(g):
        st = group_state(lab, site, g["name"])
        if st.get("state") == "primary" and int(st.get("epoch", 0)) > best[1]:
            best = (site, int(st.get("epoch", 0)))
    return best[0]


def _wait(lab: Lab, what: str, cond: Any, sites: list[str]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while not cond():
        for site in sites:
            p = lab.proc(site, "daemon")
            if not alive(p):
                raise LabError(f"node {site}: its daemon exited; {p['log']}")
        if time.monotonic() > deadline:
            raise LabError(f"{what} within {READY_TIMEOUT:g} s (lab {lab.dir})")
        time.sleep(0.1)


def wait_group(lab: Lab, g: dict[str, Any], since: float = 0.0,
               elected: bool = False) -> None:
    """Every running member of ``g`` has settled its state; with ``elected`` (every site
    up) one of them serves it; the one serving it answers by its name from the clients'
    subnet; its links stream."""
    up = [site for site in members(g) if alive(lab.proc(site, "daemon"))]

    def settled() -> bool:
        return all(group_state(lab, site, g["name"]).get("state") not in (None, "starting")
                   and group_state(lab, site, g["name"]).get("updated", 0) > since
                   for site in up)

    _wait(lab, f"group {g['name']}: not every member settled", settled, up)
    if elected:
        # Members settle as standbys before one is elected; the name is published only
        # then (returning earlier let a client find no name: test_branches in CI).
        _wait(lab, f"group {g['name']}: no member serves it", lambda: serving(lab, g) is not None,
              up)
    primary = serving(lab, g)
    if primary is None:
        return
    wait_answer(lab, g)
    cascade = lab.state["topology"] == "cascade"
    links = [(primary, peer) for peer in (g["secondary"], g.get("dr"))
             if peer and peer != primary and not (cascade and peer == g.get("dr"))]
    if cascade and g.get("dr"):
        src = g["secondary"] if primary != g["secondary"] else primary
        links.append((src, g["dr"]))
    for src, peer in links:
        if alive(lab.proc(peer, "daemon")) and alive(lab.proc(src, "daemon")):
            _wait(lab, f"group {g['name']}: {src} -> {peer} not streaming",
                  lambda s=src, p=peer: link_state(lab, s, g, p) == "streaming", [src])


ANSWER = (
    "import sys, time, nbd\n"
    "deadline = time.monotonic() + float(sys.argv[2]); err = ''\n"
    "while time.monotonic() < deadline:\n"
    "    h = nbd.NBD()\n"
    "    try:\n"
    "        h.connect_uri(sys.argv[1]); print(h.get_size()); h.shutdown(); sys.exit(0)\n"
    "    except nbd.Error as e:\n"
    "        err = str(e)\n"
    "    time.sleep(0.2)\n"
    "sys.exit('no answer: ' + err)\n")


def wait_answer(lab: Lab, g: dict[str, Any]) -> None:
    """Until the group's export answers by its DNS name from the clients' namespace."""
    url = export_uri(g)
    try:
        run(["ip", "netns", "exec", lab.state["client_netns"], sys.executable, "-c", ANSWER, url,
             str(READY_TIMEOUT)], timeout=READY_TIMEOUT + 10)
    except CommandError as e:
        raise LabError(f"group {g['name']}: {url} did not answer from the clients' subnet "
                       f"within {READY_TIMEOUT:g} s ({e})") from None


def export_uri(g: dict[str, Any]) -> str:
    return f"nbd://{g['dns_name']}:{g['ports']['nbd']}/{g['volume']}"


def start_all(lab: Lab) -> None:
    """The replica sites and the witness first, then the branches; wait for every group."""
    t0 = time.time()
    for n in lab.nodes:
        if n["role"] != "branch":
            lab.start_node(n["name"])
    for n in lab.nodes:
        if n["role"] == "branch":
            lab.start_node(n["name"])
    for g in lab.state["groups"]:
        wait_group(lab, g, since=t0, elected=True)


def wait_site(lab: Lab, name: str, since: float) -> None:
    """After `lab start NAME`: every group the site is in has settled again."""
    for g in lab.state["groups"]:
        if name in members(g):
            wait_group(lab, g, since=since)


def summary(lab: Lab) -> dict[str, Any]:
    s = lab.state
    return {
        "id": s["id"], "dir": s["dir"], "shape": "branches", "mode": s["mode"],
        "topology": s["topology"], "client_netns": s["client_netns"],
        "client_address": s["client_address"], "bridge_netns": s["bridge_netns"],
        "dns": {k: s["dns"][k] for k in ("zone", "server", "ttl", "client_subnet", "netns")},
        "subnets": {n["name"]: n["net"] for n in s["subnets"]},
        "groups": [{**{k: g[k] for k in ("name", "volume", "primary", "secondary",
                                         "ports", "dns_name")},
                    **({"witness": g["witness"]} if "witness" in g else {"dr": g["dr"]}),
                    "uri": export_uri(g)} for g in s["groups"]],
        "nodes": [{k: n[k] for k in ("name", "role", "netns", "address", "config",
                                     "data_dir")} for n in s["nodes"]],
    }
