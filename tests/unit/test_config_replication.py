"""Roles, service address, peerlink and peers in the node config; messages word for word."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import (
    Compression,
    FailoverConfig,
    PeerConfig,
    PeerlinkConfig,
    PeerlinkTlsConfig,
    PeerMode,
    Role,
    ServiceConfig,
    Topology,
    parse_config,
)
from tests.unit.conftest import refused

DC = {"name": "dc", "role": "secondary", "address": "192.0.2.12"}
DR = {"name": "dr", "role": "dr", "address": "192.0.2.13"}


def cfg(**sections: Any) -> dict[str, Any]:
    return {"version": 1, "node": {"name": "main", "role": "primary"}, **sections}




def test_full_replication_config() -> None:
    c = parse_config(cfg(
        service={"address": "192.0.2.10/24", "interface": "eth0"},
        peerlink={"listen": "192.0.2.11:7790", "topology": "cascade",
                  "secret_file": "/etc/nbdgw/peer.secret",
                  "tls": {"cert_file": "/etc/nbdgw/pl.crt", "key_file": "/etc/nbdgw/pl.key",
                          "ca_file": "/etc/nbdgw/ca.crt"}},
        peers=[{**DC, "port": 7790, "mode": "sync", "sync_timeout": 2.5, "rate_limit": "100M",
                "compression": "none"}, {**DR, "rate_limit": 1000}]))
    assert c.role is Role.PRIMARY
    assert c.service == ServiceConfig("192.0.2.10/24", "eth0")
    assert c.peerlink == PeerlinkConfig(
        "192.0.2.11", 7790, Topology.CASCADE, Path("/etc/nbdgw/peer.secret"),
        PeerlinkTlsConfig(Path("/etc/nbdgw/pl.crt"), Path("/etc/nbdgw/pl.key"),
                          Path("/etc/nbdgw/ca.crt")))
    assert c.peers == (
        PeerConfig("dc", Role.SECONDARY, "192.0.2.12", 7790, (), PeerMode.SYNC, 2.5,
                   100 << 20, Compression.NONE),
        PeerConfig("dr", Role.DR, "192.0.2.13", 7789, (), PeerMode.ASYNC, 5.0, 1000,
                   Compression.ZSTD))
    assert c.peer("dr") == c.peers[1] and c.peer("x") is None


def test_failover_defaults_and_values() -> None:
    c = parse_config(cfg(failover={"auto": False, "heartbeat_port": 7800, "interval": 0.2,
                                   "timeout": 1, "fence_margin": 0.5},
                         peerlink={"secret_file": "/etc/nbdgw/s"},
                         peers=[{**DC, "heartbeat_addresses": ["10.9.0.2"]}]))
    assert c.failover == FailoverConfig(False, 7800, 0.2, 1.0, 0.5)
    assert c.peers[0].heartbeat_addresses == ("10.9.0.2",)
    assert parse_config({"version": 1}).failover == FailoverConfig(True, 7790, 0.5, 2.0, 1.0)


def test_defaults_without_peers() -> None:
    c = parse_config({"version": 1})
    assert c.role is Role.PRIMARY and c.peers == () and c.send_to() == ()
    assert c.peerlink == PeerlinkConfig() and c.service == ServiceConfig()
    assert not c.receives()


@pytest.mark.parametrize(("role", "topology", "sends", "receives"), [
    ("primary", "fanout", ["dc", "dr"], False),
    ("primary", "cascade", ["dc"], False),
    ("secondary", "fanout", [], True),
    ("secondary", "cascade", ["dr"], True),
    ("dr", "fanout", [], True),
    ("dr", "cascade", [], True),
])
def test_who_sends_to_whom(role: str, topology: str, sends: list[str], receives: bool) -> None:
    me = {"primary": "main", "secondary": "dc", "dr": "dr"}[role]
    sites = [{"name": "main", "role": "primary", "address": "192.0.2.11"}, DC, DR]
    c = parse_config({"version": 1, "node": {"name": me, "role": role},
                      "peerlink": {"topology": topology, "secret_file": "/etc/nbdgw/s"},
                      "peers": [s for s in sites if s["name"] != me]})
    assert [p.name for p in c.send_to()] == sends
    assert c.receives() is receives


def test_cascade_without_secondary_sends_to_dr() -> None:
    c = parse_config(cfg(peerlink={"topology": "cascade", "secret_file": "/etc/nbdgw/s"},
                         peers=[DR]))
    assert [p.name for p in c.send_to()] == ["dr"]


@pytest.mark.parametrize(("raw", "msg"), [
    (cfg(peers=[DC, {**DC, "address": "192.0.2.14"}]), "peer dc is listed twice in peers"),
    (cfg(peers=[{**DC, "name": "main"}]), "peer main in peers[0] is this node (node.name)"),
    (cfg(peers=[{**DC, "role": "primary"}]),
     "two primaries: main (node.role) and dc (peers[0].role); a volume has one primary site"),
    ({"version": 1, "node": {"name": "dr", "role": "dr"}, "peers": [DC]},
     "no primary: neither node.role nor any peers[].role is primary"),
    (cfg(peers=[{"name": "dc", "role": "secondary"}]), "missing key 'address' in peers[0]"),
    (cfg(peers=[{"role": "secondary", "address": "192.0.2.12"}]),
     "missing key 'name' in peers[0]"),
    (cfg(peers=[{**DC, "address": "dc.example.com"}]),
     "expected an IP address for peers[0].address, got 'dc.example.com'"),
    (cfg(peers=[{**DC, "port": 0}]), "expected integer between 1 and 65535 for peers[0].port"),
    (cfg(peers=[{**DC, "mode": "semi"}]), "expected one of async, sync for peers[0].mode"),
    (cfg(peers=[{**DC, "role": "judge"}]),
     "expected one of primary, secondary, dr, witness for peers[0].role"),
    (cfg(peers=[{**DC, "sync_timeout": 0}]),
     "expected a number of seconds > 0 and at most 86400 for peers[0].sync_timeout"),
    (cfg(peers=[{**DC, "rate_limit": "fast"}]),
     "expected a rate such as 100M (bytes/s) or 0 for peers[0].rate_limit, got 'fast'"),
    (cfg(peers=[{**DC, "compression": "lz4"}]),
     "expected one of zstd, none for peers[0].compression"),
    (cfg(peers=[{**DC, "colour": "red"}]),
     "unknown key 'colour' in peers[0] (known: address, compression, heartbeat_addresses, "
     "mode, name, port, rate_limit, rate_schedule, role, rpo, sync_timeout)"),
    (cfg(peers=[{**DC, "heartbeat_addresses": ["10.9.0.2", "x"]}]),
     "expected an IP address for peers[0].heartbeat_addresses[1], got 'x'"),
    (cfg(failover={"interval": 1, "timeout": 2}),
     "failover.timeout must be at least 3 x failover.interval (a single lost heartbeat "
     "must not look like a dead node)"),
    (cfg(failover={"timeout": "soon"}),
     "expected a number of seconds > 0 and at most 86400 for failover.timeout"),
    (cfg(failover={"auto": "yes"}), "expected true or false for failover.auto"),
    (cfg(node={"name": "main", "role": "boss"}),
     "expected one of primary, secondary, dr, witness for node.role"),
    (cfg(service={"address": "192.0.2.10"}),
     "expected an address with a prefix length such as 192.0.2.10/24 for service.address, "
     "got '192.0.2.10'"),
    (cfg(service={"address": "nope/24"}),
     "expected an address with a prefix length such as 192.0.2.10/24 for service.address, "
     "got 'nope/24'"),
    (cfg(peerlink={"listen": "localhost:7789"}),
     "expected 'HOST:PORT' with an IP address and a port 1..65535 for peerlink.listen, "
     "got 'localhost:7789'"),
    (cfg(peerlink={"listen": "0.0.0.0:70000"}),
     "expected 'HOST:PORT' with an IP address and a port 1..65535 for peerlink.listen, "
     "got '0.0.0.0:70000'"),
    (cfg(peerlink={"topology": "ring"}), "expected one of fanout, cascade for peerlink.topology"),
    (cfg(peerlink={"tls": {"cert_file": "/a", "key_file": "/b"}}),
     "missing key 'ca_file' in peerlink.tls (mutual TLS needs cert_file, key_file and "
     "ca_file)"),
    (cfg(peerlink={"secret_file": "peer.secret"}),
     "expected an absolute path for peerlink.secret_file"),
    (cfg(peers={"dc": DC}), "expected a list for peers"),
])
def test_refused(raw: dict[str, Any], msg: str) -> None:
    assert refused(raw) == msg


def test_automatic_failover_needs_the_secret() -> None:
    """Beats MACed with an empty key let anyone on the cluster network forge them (24
    forged beats fenced a secondary for a primary that did not exist): no secret, no
    automatic failover; TLS-only peerlink is refused too."""
    tls = {"cert_file": "/etc/nbdgw/pl.crt", "key_file": "/etc/nbdgw/pl.key",
           "ca_file": "/etc/nbdgw/ca.crt"}
    for peerlink in ({"insecure": True}, {"tls": tls}):
        assert refused(cfg(peerlink=peerlink, peers=[DC, DR])) == (
            "failover.auto needs peerlink.secret_file: heartbeats are authenticated with "
            "the shared secret (TLS protects only the replication links); set "
            "peerlink.secret_file, or failover.auto: false")
    parse_config(cfg(peerlink={"tls": tls}, peers=[DC, DR], failover={"auto": False}))
    parse_config(cfg())  # no peers: nothing to fail over


# -- the witness: a third voter without data --------------------------------------------------

WIT = {"name": "wit", "role": "witness", "address": "192.0.2.14"}
MAIN = {"name": "main", "role": "primary", "address": "192.0.2.11"}
SECRET = {"secret_file": "/etc/nbdgw/s"}


@pytest.mark.parametrize(("me", "role", "peers", "sends", "receives"), [
    ("main", "primary", [DC, WIT], ["dc"], False),
    ("dc", "secondary", [MAIN, WIT], [], True),
    ("wit", "witness", [MAIN, DC], [], False),
])
def test_a_witness_is_never_shipped_to_and_receives_nothing(
        me: str, role: str, peers: list[dict[str, Any]], sends: list[str],
        receives: bool) -> None:
    for topology in ("fanout", "cascade"):
        c = parse_config({"version": 1, "node": {"name": me, "role": role},
                          "peerlink": {**SECRET, "topology": topology}, "peers": peers})
        assert [p.name for p in c.send_to()] == sends
        assert c.receives() is receives


def test_a_witness_takes_the_dr_sites_place() -> None:
    c = parse_config(cfg(peerlink=SECRET, peers=[DC, WIT]))
    assert [p.role for p in c.peers] == [Role.SECONDARY, Role.WITNESS]
    w = parse_config({"version": 1, "node": {"name": "wit", "role": "witness"},
                      "peerlink": SECRET, "peers": [MAIN, DC]})
    assert w.role is Role.WITNESS and w.volumes == ()
    parse_config(cfg(peerlink=SECRET, peers=[DC, DR]))  # today's three sites still load


@pytest.mark.parametrize(("raw", "msg"), [
    (cfg(peerlink=SECRET, peers=[DC, DR, WIT]),
     "a witness (wit (peers[2].role)) and a DR site (dr (peers[1].role)) together: the "
     "third voter is one or the other, not both"),
    (cfg(peerlink=SECRET, peers=[DC, WIT, {**WIT, "name": "wit2", "address": "192.0.2.15"}]),
     "two witnesses: wit (peers[1].role) and wit2 (peers[2].role); one witness votes for a "
     "pair"),
    (cfg(peerlink=SECRET, peers=[WIT]),
     "a witness (wit (peers[0].role)) without a secondary: it votes for a pair of data "
     "sites (primary and secondary)"),
    (cfg(peerlink=SECRET, peers=[DC, {**WIT, "mode": "sync"}]),
     "mode: sync is allowed only between the two main-site nodes (primary and secondary): "
     "peers[1] (wit) is a witness (it holds no data)"),
    ({"version": 1, "node": {"name": "wit", "role": "witness"}, "peerlink": SECRET,
      "peers": [{**MAIN, "mode": "sync"}, DC]},
     "mode: sync is allowed only between the two main-site nodes (primary and secondary): "
     "this node (wit) is a witness (it holds no data), so peers[0] (main) cannot be sync"),
    ({"version": 1, "node": {"name": "wit", "role": "witness"}, "peerlink": SECRET,
      "peers": [MAIN, DC], "volumes": [{"name": "v1", "size": "1G"}]},
     "volumes: node wit is a witness: it holds no volume (remove the list)"),
    ({"version": 1, "node": {"name": "wit", "role": "witness"}, "peerlink": SECRET,
      "peers": [MAIN, DC], "failover": {"auto": False}},
     "failover.auto: node wit is a witness: it only votes, so failover.auto must be true"),
])
def test_witness_refusals(raw: dict[str, Any], msg: str) -> None:
    assert refused(raw) == msg
