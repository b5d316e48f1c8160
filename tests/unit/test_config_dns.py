"""service.dns: the keys, their refusals, and the TSIG key file (gateway/dnsname.py)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from gateway.config import NodeConfig, check_files
from gateway.dnsname import DnsError, parse_key, parse_server
from gateway.errors import ConfigError

from .conftest import config_of, refused_top

SECRET = base64.b64encode(bytes(range(32))).decode()
KEY = f'key "nbdgw-update" {{\n\talgorithm hmac-sha256;\n\tsecret "{SECRET}";\n}};\n'


def key_file(tmp_path: Path, text: str = KEY, mode: int = 0o600) -> Path:
    p = tmp_path / "update.key"
    p.write_text(text)
    p.chmod(mode)
    return p


def dns(tmp_path: Path, **over: Any) -> dict[str, Any]:
    raw = {"name": "db.branch1.example.com", "zone": "example.com",
           "servers": ["192.0.2.53", "192.0.2.54:5353"],
           "key_file": str(key_file(tmp_path)), "address": "198.51.100.7", **over}
    return {"dns": {k: v for k, v in raw.items() if v is not None}}


def test_a_complete_section_is_read(tmp_path: Path) -> None:
    cfg = config_of(service=dns(tmp_path, ttl=15)).service.dns
    assert cfg is not None
    assert (cfg.name, cfg.zone, cfg.ttl, cfg.address) == (
        "db.branch1.example.com", "example.com", 15, "198.51.100.7")
    assert cfg.servers == ("192.0.2.53:53", "192.0.2.54:5353")
    assert config_of(service=dns(tmp_path)).service.dns.ttl == 30  # type: ignore[union-attr]
    # DNS names are case-insensitive: DB.Branch1.Example.COM is inside example.com.
    assert config_of(service=dns(tmp_path, name="DB.Branch1.Example.COM")).service.dns
    assert config_of().service.dns is None


@pytest.mark.parametrize(("over", "message"), [
    ({"name": None}, "missing key 'name' in service.dns"),
    ({"name": "db.example.org"}, "service.dns.name 'db.example.org' is not inside "
                                 "service.dns.zone 'example.com'"),
    ({"name": "example.com"}, "is not inside service.dns.zone"),
    ({"servers": ["ns1.example.com"]}, "expected IP or IP:PORT for service.dns.servers[0], "
                                       "got 'ns1.example.com'"),
    ({"servers": []}, "expected at least one server in service.dns.servers"),
    ({"servers": ["192.0.2.1:0"]}, "service.dns.servers[0]"),
    ({"address": "branch1"}, "expected an IP address for service.dns.address"),
    ({"ttl": 0}, "expected integer between 1 and 86400 for service.dns.ttl"),
    ({"colour": "red"}, "unknown key 'colour' in service.dns"),
])
def test_refusals_name_the_key(tmp_path: Path, over: dict[str, Any], message: str) -> None:
    assert message in refused_top(service=dns(tmp_path, **over))


def files_refused(cfg: NodeConfig) -> str:
    with pytest.raises(ConfigError) as ei:
        check_files(cfg)
    return str(ei.value)


def test_the_key_file_must_be_private_and_well_formed(tmp_path: Path) -> None:
    cfg = config_of(service=dns(tmp_path))
    check_files(cfg)
    (tmp_path / "update.key").chmod(0o644)
    msg = files_refused(cfg)
    assert "service.dns.key_file" in msg and "chmod 600" in msg, msg
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    bad.chmod(0o600)
    assert "expected one key block as tsig-keygen writes it" in files_refused(
        config_of(service=dns(tmp_path, key_file=str(bad))))
    gone = str(tmp_path / "gone.key")
    assert "does not exist" in files_refused(config_of(service=dns(tmp_path, key_file=gone)))


def test_key_parsing() -> None:
    k = parse_key(KEY, "k")
    assert (k.name, k.algorithm, k.secret) == ("nbdgw-update", "hmac-sha256", bytes(range(32)))
    with pytest.raises(DnsError, match="algorithm 'hmac-md5' is not one of"):
        parse_key(KEY.replace("hmac-sha256", "hmac-md5"), "k")
    with pytest.raises(DnsError, match="at least 16"):
        parse_key(KEY.replace(SECRET, base64.b64encode(b"short").decode()), "k")
    with pytest.raises(DnsError, match="not base64"):
        parse_key(KEY.replace(SECRET, "***"), "k")
    with pytest.raises(DnsError, match="found 2"):
        parse_key(KEY + KEY, "k")


def test_server_syntax() -> None:
    assert str(parse_server("192.0.2.1")) == "192.0.2.1:53"
    assert str(parse_server("[2001:db8::1]:5353")) == "[2001:db8::1]:5353"
    assert str(parse_server("2001:db8::1")) == "[2001:db8::1]:53"
    for bad in ("ns1", "192.0.2.1:x", "192.0.2.1:70000"):
        with pytest.raises(ValueError, match=r"address|port"):
            parse_server(bad)
