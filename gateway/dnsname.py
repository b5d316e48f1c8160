"""The service name (DESIGN.md §6): across subnets, where no address can move, clients
find the primary by a DNS name that the new primary publishes on promotion with an RFC
2136 dynamic update signed with TSIG, and confirms by asking the server before it
reports ``serving``.

``ServiceName`` has the address hook's ``take()``/``release()`` (gateway/vip.py):

- ``take()`` replaces the name's A (or AAAA) records with this node's address, then asks
  the authoritative server until it answers exactly that address (bounded).  Only a node
  the node core made primary calls it, so the replacement is unconditional: a record
  left by a deposed primary is overwritten.
- ``release()`` deletes the record only if it still holds this node's address (an RFC
  2136 prerequisite, checked by the server in the same transaction): a demoted node that
  comes back late never withdraws the name its successor published.

What it does not promise: clients and resolvers cache the old answer for up to the TTL,
so failover as a client sees it is the failover time plus the TTL; a server that does not
answer leaves the old record in place (``take()`` raises ``DnsError``, the daemon logs it
and retries, status shows it).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.update
import structlog

from nbdgw_common.errors import GatewayError

log = structlog.get_logger(component="dns")

ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224", "hmac-sha1")
_KEY_BLOCK = re.compile(
    r'key\s+"?(?P<name>[^"\s{]+)"?\s*\{(?P<body>[^}]*)\}\s*;', re.S)
_ALGORITHM = re.compile(r"algorithm\s+\"?(?P<v>[A-Za-z0-9-]+)\"?\s*;")
_SECRET = re.compile(r'secret\s+"(?P<v>[^"]+)"\s*;')


class DnsError(GatewayError):
    """A DNS update or check failed; the message says which server said what."""


@dataclass(frozen=True)
class TsigKey:
    name: str
    secret: bytes  # the raw key bytes
    algorithm: str = "hmac-sha256"


def parse_key(text: str, where: str) -> TsigKey:
    """A TSIG key as ``tsig-keygen`` writes it (BIND's ``key "NAME" { algorithm A;
    secret "B64"; };``, the form BIND and Knot both read), exactly one key."""
    blocks = list(_KEY_BLOCK.finditer(text))
    if len(blocks) != 1:
        raise DnsError(f"{where}: expected one key block as tsig-keygen writes it "
                       f"(key \"NAME\" {{ algorithm hmac-sha256; secret \"...\"; }};), "
                       f"found {len(blocks)}")
    body = blocks[0].group("body")
    alg = _ALGORITHM.search(body)
    sec = _SECRET.search(body)
    if sec is None:
        raise DnsError(f"{where}: key {blocks[0].group('name')!r} has no secret")
    algorithm = alg.group("v").lower() if alg else "hmac-sha256"
    if algorithm not in ALGORITHMS:
        raise DnsError(f"{where}: algorithm {algorithm!r} is not one of "
                       f"{', '.join(ALGORITHMS)}")
    try:
        secret = base64.b64decode(sec.group("v"), validate=True)
    except (binascii.Error, ValueError):
        raise DnsError(f"{where}: the secret is not base64") from None
    if len(secret) < 16:
        raise DnsError(f"{where}: the secret is {len(secret)} bytes; at least 16")
    return TsigKey(blocks[0].group("name").rstrip("."), secret, algorithm)


@dataclass(frozen=True)
class Server:
    host: str
    port: int = 53

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_server(text: str) -> Server:
    """``HOST`` or ``HOST:PORT`` or ``[V6]:PORT``; HOST an IP address (the name's own
    resolution must not depend on DNS)."""
    host, port = text, 53
    m = re.fullmatch(r"\[(?P<h>[^]]+)\](?::(?P<p>\d+))?", text)
    if m:
        host, port = m.group("h"), int(m.group("p") or 53)
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        if not p.isdigit():
            raise ValueError(f"bad port in {text!r}")
        port = int(p)
    ipaddress.ip_address(host)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return Server(host, port)


class ServiceName:
    """This node's record under ``name`` in ``zone``, kept by dynamic updates."""

    def __init__(self, name: str, zone: str, servers: list[Server], key: TsigKey,
                 address: str, ttl: int = 30, timeout: float = 2.0,
                 confirm_within: float = 10.0) -> None:
        self.zone = dns.name.from_text(zone)
        self.name = dns.name.from_text(name)
        if not self.name.is_subdomain(self.zone) or self.name == self.zone:
            raise DnsError(f"service name {self.name} is not inside zone {self.zone}")
        if not servers:
            raise DnsError("no DNS server to update")
        self.servers = servers
        self.key = key
        self.address = str(ipaddress.ip_address(address))
        self.rdtype = "AAAA" if ipaddress.ip_address(address).version == 6 else "A"
        self.ttl = ttl
        self.timeout = timeout
        self.confirm_within = confirm_within
        self._keyring = dns.tsig.Key(key.name, base64.b64encode(key.secret).decode(),
                                     key.algorithm)

    def _update(self) -> dns.update.UpdateMessage:
        return dns.update.UpdateMessage(self.zone, keyring=self._keyring)

    def _send(self, upd: dns.update.UpdateMessage, what: str) -> tuple[Server, dns.rcode.Rcode]:
        """Send to the first server that answers; (server, rcode).  An answer that is
        not signed with our key, or a refusal of the key, is an error naming both."""
        errors = []
        for server in self.servers:
            try:
                resp = dns.query.tcp(upd, server.host, port=server.port, timeout=self.timeout)
            except dns.tsig.PeerError as e:
                raise DnsError(f"{what}: {server} refused TSIG key {self.key.name!r} "
                               f"({type(e).__name__}): check the key file against the "
                               f"server's") from None
            except (dns.exception.DNSException, OSError) as e:
                errors.append(f"{server}: {e or type(e).__name__}")
                continue
            return server, resp.rcode()
        raise DnsError(f"{what}: no DNS server answered ({'; '.join(errors)})")

    def published(self) -> set[str]:
        """The addresses the first answering server holds for the name now."""
        q = dns.message.make_query(self.name, self.rdtype)
        errors = []
        for server in self.servers:
            try:
                resp = dns.query.udp(q, server.host, port=server.port, timeout=self.timeout)
            except (dns.exception.DNSException, OSError) as e:
                errors.append(f"{server}: {e or type(e).__name__}")
                continue
            if resp.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                errors.append(f"{server}: {dns.rcode.to_text(resp.rcode())}")
                continue
            out: set[str] = set()
            for rrset in resp.answer:
                if rrset.name == self.name and rrset.rdtype == dns.rdatatype.from_text(
                        self.rdtype):
                    out.update(r.to_text() for r in rrset)
            return out
        raise DnsError(f"query {self.name} {self.rdtype}: no DNS server answered "
                       f"({'; '.join(errors)})")

    def take(self) -> None:
        """Publish this node's address as the only record, then confirm it."""
        upd = self._update()
        upd.replace(self.name, self.ttl, self.rdtype, self.address)
        server, rcode = self._send(upd, f"update {self.name}")
        if rcode != dns.rcode.NOERROR:
            raise DnsError(f"update {self.name} -> {self.address}: {server} answered "
                           f"{dns.rcode.to_text(rcode)}{_hint(rcode)}")
        deadline = time.monotonic() + self.confirm_within
        while True:
            seen = self.published()
            if seen == {self.address}:
                log.info("service_name_published", name=str(self.name),
                         address=self.address, server=str(server), ttl=self.ttl)
                return
            if time.monotonic() >= deadline:
                raise DnsError(f"update {self.name} -> {self.address} accepted by {server}, "
                               f"but the name still resolves to "
                               f"{', '.join(sorted(seen)) or 'nothing'} after "
                               f"{self.confirm_within:g} s")
            time.sleep(0.2)

    def held(self) -> bool:
        return self.published() == {self.address}

    def release(self) -> bool:
        """Withdraw the record if it is still ours; False if another node's address is
        published (nothing is changed then).  Errors are logged, not raised: a demoted
        node that cannot reach DNS has nothing better to do."""
        upd = self._update()
        upd.present(self.name, self.rdtype, self.address)
        upd.delete(self.name, self.rdtype, self.address)
        try:
            server, rcode = self._send(upd, f"withdraw {self.name}")
        except DnsError as e:
            log.error("service_name_release_failed", error=str(e))
            return False
        if rcode == dns.rcode.NOERROR:
            log.info("service_name_withdrawn", name=str(self.name), address=self.address,
                     server=str(server))
            return True
        if rcode in (dns.rcode.NXRRSET, dns.rcode.NXDOMAIN):
            log.info("service_name_not_ours", name=str(self.name), address=self.address)
            return False
        log.error("service_name_release_failed", name=str(self.name),
                  error=f"{server} answered {dns.rcode.to_text(rcode)}{_hint(rcode)}")
        return False


def _hint(rcode: dns.rcode.Rcode) -> str:
    return {
        dns.rcode.REFUSED: " (the server's update policy does not let this key change "
                           "the name: allow-update / update-policy)",
        dns.rcode.NOTAUTH: " (the server is not authoritative for the zone, or refused "
                           "the TSIG signature)",
        dns.rcode.NOTZONE: " (the name is not in the zone)",
        dns.rcode.SERVFAIL: " (the server failed; see its log)",
    }.get(rcode, "")


def load_key(path: Path) -> TsigKey:
    return parse_key(path.read_text(), str(path))


class DnsSettings(Protocol):
    """What ``service.dns`` holds (gateway/config.py ServiceDnsConfig)."""

    @property
    def name(self) -> str: ...
    @property
    def zone(self) -> str: ...
    @property
    def servers(self) -> tuple[str, ...]: ...
    @property
    def key_file(self) -> Path: ...
    @property
    def address(self) -> str: ...
    @property
    def ttl(self) -> int: ...


def service_name(cfg: DnsSettings) -> ServiceName:
    """The hook for a node config's ``service.dns`` (checked when the config loaded)."""
    return ServiceName(cfg.name, cfg.zone, [parse_server(s) for s in cfg.servers],
                       load_key(cfg.key_file), cfg.address, cfg.ttl)


def keep_publishing(name: ServiceName, still_wanted: Callable[[], bool],
                    retry: float = 2.0) -> bool:
    """``take()`` until it is confirmed (True) or this node no longer wants the name
    (False): a server that is down now must not leave the name pointing at the old
    primary once it is back."""
    while still_wanted():
        try:
            name.take()
            return True
        except DnsError as e:
            log.error("service_name_failed", name=str(name.name), error=str(e),
                      retry_in=retry)
        time.sleep(retry)
    return False
