"""The service name against a real authoritative server (BIND 9 in its own network
namespace, a dynamic zone, TSIG keys): publish and confirm, replace a deposed primary's
record, withdraw only our own record, and clear errors for a wrong key, a key the
policy does not grant, and a server that does not answer.  The nbdgw side runs in a
second namespace, as a node would, through gateway/dnsname.py."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import labdns

pytestmark = pytest.mark.root

ZONE = "nbdgw.test"
SERVER_ADDR = "198.51.100.1"
NODE_ADDR = "198.51.100.2"

CLIENT = r"""
import json, sys, time
from gateway.dnsname import DnsError, ServiceName, load_key, parse_server
op, key_file, address, server = sys.argv[1:5]
name = sys.argv[5] if len(sys.argv) > 5 else "db.nbdgw.test"
sn = ServiceName(name, "nbdgw.test", [parse_server(server)],
                 load_key(__import__("pathlib").Path(key_file)), address, ttl=5,
                 timeout=1.0, confirm_within=3.0)
t0 = time.monotonic()
try:
    if op == "take":
        sn.take(); out = {"ok": True}
    elif op == "release":
        out = {"ok": sn.release()}
    else:
        out = {"ok": True, "published": sorted(sn.published())}
except DnsError as e:
    out = {"ok": False, "error": str(e)}
out["seconds"] = round(time.monotonic() - t0, 2)
print(json.dumps(out))
"""


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@pytest.fixture
def dns(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """named in namespace S, a node's namespace N, one veth between them."""
    tag = secrets.token_hex(3)
    srv, node = f"nbdgw-dns-{tag}", f"nbdgw-dnsn-{tag}"
    made: list[str] = []
    proc = None
    try:
        for ns in (srv, node):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", srv, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
           "netns", node)
        for ns, addr in ((srv, SERVER_ADDR), (node, NODE_ADDR)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        zone = labdns.Zone(tmp_path / "named", ZONE, SERVER_ADDR)
        zone.write(limited=("other",))
        proc = labdns.start(zone, srv, tmp_path / "named.log")
        yield {"zone": zone, "node_ns": node, "server": f"{SERVER_ADDR}:53",
               "proc": proc, "log": tmp_path / "named.log"}
    finally:
        if proc is not None:
            labdns.stop(proc)
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def client(dns: dict[str, Any], op: str, key: Path, address: str = NODE_ADDR,
           server: str | None = None, name: str = f"db.{ZONE}") -> dict[str, Any]:
    p = subprocess.run(
        ["ip", "netns", "exec", dns["node_ns"], sys.executable, "-c", CLIENT, op, str(key),
         address, server or dns["server"], name],
        capture_output=True, text=True, timeout=60, check=False,
        cwd=Path(__file__).resolve().parents[2])
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def test_publish_replace_and_withdraw_only_our_own(dns: dict[str, Any]) -> None:
    key = dns["zone"].key_file
    assert client(dns, "query", key)["published"] == []
    first = client(dns, "take", key, "198.51.100.10")
    assert first["ok"], first
    assert client(dns, "query", key)["published"] == ["198.51.100.10"]
    # A new primary replaces the deposed one's record, whatever it was.
    assert client(dns, "take", key, "198.51.100.20")["ok"]
    assert client(dns, "query", key)["published"] == ["198.51.100.20"]
    # The deposed primary, back late, does not withdraw its successor's record.
    assert client(dns, "release", key, "198.51.100.10")["ok"] is False
    assert client(dns, "query", key)["published"] == ["198.51.100.20"]
    # The holder withdraws its own.
    assert client(dns, "release", key, "198.51.100.20")["ok"] is True
    assert client(dns, "query", key)["published"] == []


def test_a_wrong_secret_is_a_clear_error(dns: dict[str, Any], tmp_path: Path) -> None:
    forged = labdns.write_key(tmp_path / "forged.key", labdns.tsig_key(labdns.UPDATE_KEY))
    out = client(dns, "take", forged)
    assert not out["ok"]
    assert "TSIG" in out["error"] and labdns.UPDATE_KEY in out["error"], out
    assert client(dns, "query", dns["zone"].key_file)["published"] == []


def test_a_key_the_policy_does_not_grant_is_refused(dns: dict[str, Any]) -> None:
    only_other = dns["zone"].name_key_file("other")
    out = client(dns, "take", only_other)  # may change other.nbdgw.test only
    assert not out["ok"]
    assert "REFUSED" in out["error"] and "update-policy" in out["error"], out
    assert client(dns, "take", only_other, name=f"other.{ZONE}")["ok"]


def test_a_server_that_does_not_answer_fails_in_bounded_time(dns: dict[str, Any]) -> None:
    labdns.stop(dns["proc"])
    t0 = time.monotonic()
    out = client(dns, "take", dns["zone"].key_file)
    assert not out["ok"]
    assert "no DNS server answered" in out["error"], out
    assert time.monotonic() - t0 < 20
    # And a withdrawal then changes nothing and reports no success.
    assert client(dns, "release", dns["zone"].key_file)["ok"] is False
