"""Hostile or careless input the config must refuse (issue 20, points 6 and 7), each
message word for word: duplicate YAML keys, numbers that are not finite or out of
range, replication with neither secret nor TLS, referenced files that are missing or
readable by others, CHAP secrets too short.

`parse_config` stays pure (no file is read); the files a config names are checked by
`check_files`, which `nbdgw config check`, `serve`, `replicate` and the daemon (at start
and on reload) run through `load_config(..., files=True)` or `check_config_files`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from gateway.config import check_config_files, load_config, parse_config
from gateway.errors import ConfigError
from tests.unit.conftest import refused, write_config

SECRET = b"0123456789abcdef0123456789abcdef\n"  # 32 bytes + newline
CHAP = "chapsecret0123"  # 14 characters
DC = {"name": "dc", "role": "secondary", "address": "192.0.2.12"}
NUMBER = "expected a number of seconds > 0 and at most 86400 for {}"






def secret_file(path: Path, data: bytes = SECRET, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def files_refused(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as ei:
        check_config_files(parse_config(raw))
    return str(ei.value)


# -- duplicate keys (point 7: "the last one wins") ----------------------------------------

def test_duplicate_top_level_key(tmp_path: Path) -> None:
    p = write_config(tmp_path, "version: 1\nfailover:\n  auto: false\nfailover:\n  auto: true\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(ei.value) == (f"{p}: duplicate key 'failover' at line 4 (first at line 2): "
                             "YAML would silently keep only the last one")


def test_duplicate_nested_key(tmp_path: Path) -> None:
    p = write_config(tmp_path, "version: 1\nfailover:\n  timeout: 10\n  interval: 1\n"
                        "  timeout: 0.1\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(ei.value) == (f"{p}: duplicate key 'timeout' at line 5 (first at line 3): "
                             "YAML would silently keep only the last one")


def test_duplicate_key_in_a_list_item(tmp_path: Path) -> None:
    p = write_config(tmp_path, "version: 1\nvolumes:\n  - name: a\n    size: 1G\n"
                        "  - {name: b, size: 1G, size: 2G}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(ei.value) == (f"{p}: duplicate key 'size' at line 5 (first at line 5): "
                             "YAML would silently keep only the last one")


def test_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    """A YAML merge (``<<: *anchor``) overridden by an explicit key is intended."""
    p = write_config(tmp_path, "version: 1\nvolumes:\n  - &v {name: a, size: 1G}\n"
                        "  - <<: *v\n    name: b\n")
    assert [v.name for v in load_config(p).volumes] == ["a", "b"]


# -- numbers ------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "-1", "0", "86401", "1e300"])
def test_failover_timeout_must_be_finite_and_in_range(tmp_path: Path, value: str) -> None:
    p = write_config(tmp_path, f"version: 1\nfailover:\n  timeout: {value}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(ei.value) == f"{p}: " + NUMBER.format("failover.timeout")


@pytest.mark.parametrize(("section", "key"), [
    ({"failover": {"interval": float("inf")}}, "failover.interval"),
    ({"failover": {"fence_margin": float("nan")}}, "failover.fence_margin"),
    ({"health": {"interval": float("inf")}}, "health.interval"),
    ({"peers": [{**DC, "sync_timeout": float("inf")}], "failover": {"auto": False},
      "peerlink": {"insecure": True}}, "peers[0].sync_timeout"),
])
def test_other_durations_must_be_finite(section: dict[str, Any], key: str) -> None:
    assert refused({"version": 1, **section}) == NUMBER.format(key)


def test_largest_duration_is_accepted() -> None:
    c = parse_config({"version": 1, "failover": {"timeout": 86400}})
    assert c.failover.timeout == 86400.0


# -- replication with neither secret nor TLS (point 6) -----------------------------------

OPEN_PEERLINK = (
    "peerlink has neither secret_file nor tls: any host that reaches this node's "
    "replication port could send it data or ask for its volumes; set "
    "peerlink.secret_file (or peerlink.tls), or peerlink.insecure: true to run "
    "replication unauthenticated")


def test_peers_without_secret_or_tls_are_refused() -> None:
    raw = {"version": 1, "peers": [DC], "failover": {"auto": False}}
    assert refused(raw) == OPEN_PEERLINK
    # Before failover's own check, which names only the heartbeats.
    assert refused({"version": 1, "peers": [DC]}) == OPEN_PEERLINK


def test_insecure_must_be_said_in_so_many_words() -> None:
    raw = {"version": 1, "peers": [DC], "failover": {"auto": False}}
    assert parse_config({**raw, "peerlink": {"insecure": True}}).peerlink.insecure
    assert refused({**raw, "peerlink": {"insecure": "yes"}}) == (
        "expected true or false for peerlink.insecure")
    assert refused({**raw, "peerlink": {"insecure": False}}) == OPEN_PEERLINK


def test_secret_or_tls_is_enough() -> None:
    base = {"version": 1, "peers": [DC], "failover": {"auto": False}}
    parse_config({**base, "peerlink": {"secret_file": "/etc/nbdgw/peer.secret"}})
    parse_config({**base, "peerlink": {"tls": {"cert_file": "/a", "key_file": "/b",
                                               "ca_file": "/c"}}})
    parse_config({"version": 1})  # no peers: nothing to protect


# -- referenced files (point 7) -----------------------------------------------------------

def peerlink_cfg(secret: Path) -> dict[str, Any]:
    return {"version": 1, "peers": [DC], "peerlink": {"secret_file": str(secret)}}


def test_missing_secret_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.secret"
    assert files_refused(peerlink_cfg(p)) == f"peerlink.secret_file {p} does not exist"


def test_secret_file_readable_by_others(tmp_path: Path) -> None:
    p = secret_file(tmp_path / "peer.secret", mode=0o644)
    assert files_refused(peerlink_cfg(p)) == (
        f"peerlink.secret_file {p} is accessible by group or others (mode 0644): "
        f"chmod 600 {p}")
    p.chmod(0o640)
    assert files_refused(peerlink_cfg(p)) == (
        f"peerlink.secret_file {p} is accessible by group or others (mode 0640): "
        f"chmod 600 {p}")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_secret_file_owned_by_someone_else(tmp_path: Path) -> None:
    p = secret_file(tmp_path / "peer.secret")
    os.chown(p, 4242, -1)
    assert files_refused(peerlink_cfg(p)) == (
        f"peerlink.secret_file {p} is owned by uid 4242: it must belong to root or to the "
        f"user running nbdgw (uid {os.geteuid()})")


def test_secret_file_that_is_a_directory(tmp_path: Path) -> None:
    assert files_refused(peerlink_cfg(tmp_path)) == (
        f"peerlink.secret_file {tmp_path} is not a regular file")


def test_short_peer_secret(tmp_path: Path) -> None:
    p = secret_file(tmp_path / "peer.secret", b"short\n")
    assert files_refused(peerlink_cfg(p)) == (
        f"peerlink.secret_file {p}: the secret must be at least 16 bytes, got 5")


def test_good_secret_file_passes(tmp_path: Path) -> None:
    check_config_files(parse_config(peerlink_cfg(secret_file(tmp_path / "peer.secret"))))


# -- peerlink.next_secret_file: the second secret of a rotation (SECURITY.md) -------------

def next_cfg(secret: Path, next_secret: Path) -> dict[str, Any]:
    raw = peerlink_cfg(secret)
    raw["peerlink"]["next_secret_file"] = str(next_secret)
    return raw


def test_next_secret_file_has_the_checks_of_secret_file(tmp_path: Path) -> None:
    cur = secret_file(tmp_path / "peer.secret")
    p = tmp_path / "next.secret"
    assert files_refused(next_cfg(cur, p)) == f"peerlink.next_secret_file {p} does not exist"
    secret_file(p, mode=0o640)
    assert files_refused(next_cfg(cur, p)) == (
        f"peerlink.next_secret_file {p} is accessible by group or others (mode 0640): "
        f"chmod 600 {p}")
    p.chmod(0o600)
    if os.geteuid() == 0:
        os.chown(p, 4242, -1)
        assert files_refused(next_cfg(cur, p)) == (
            f"peerlink.next_secret_file {p} is owned by uid 4242: it must belong to root or "
            f"to the user running nbdgw (uid {os.geteuid()})")
        os.chown(p, 0, -1)
    assert files_refused(next_cfg(cur, tmp_path)) == (
        f"peerlink.next_secret_file {tmp_path} is not a regular file")
    secret_file(p, b"  short  \n")
    assert files_refused(next_cfg(cur, p)) == (
        f"peerlink.next_secret_file {p}: the secret must be at least 16 bytes, got 5")
    secret_file(p, b"another secret of 32 bytes......\n")
    cfg = parse_config(next_cfg(cur, p))
    check_config_files(cfg)
    assert (cfg.peerlink.secret_file, cfg.peerlink.next_secret_file) == (cur, p)


def test_next_secret_file_needs_secret_file() -> None:
    raw = {"version": 1, "peers": [DC], "peerlink": {
        "next_secret_file": "/etc/nbdgw/next.secret", "insecure": True}}
    assert refused(raw) == (
        "peerlink.next_secret_file needs peerlink.secret_file: a node proves itself with "
        "the current secret and accepts the next one besides it (rotating the secret: "
        "SECURITY.md)")


def tls_cfg(tmp_path: Path, **override: str) -> dict[str, Any]:
    files = {"cert_file": tmp_path / "node.crt", "key_file": tmp_path / "node.key",
             "ca_file": tmp_path / "ca.crt"}
    for k, f in files.items():
        if k not in override:
            secret_file(f, b"PEM\n")
    tls = {k: override.get(k, str(f)) for k, f in files.items()}
    return {"version": 1, "peers": [DC], "failover": {"auto": False},
            "peerlink": {"tls": tls}}


def test_peerlink_tls_files(tmp_path: Path) -> None:
    check_config_files(parse_config(tls_cfg(tmp_path)))
    for key in ("cert_file", "key_file", "ca_file"):
        missing = str(tmp_path / f"missing-{key}")
        assert files_refused(tls_cfg(tmp_path, **{key: missing})) == (
            f"peerlink.tls.{key} {missing} does not exist")
    raw = tls_cfg(tmp_path)
    key = tmp_path / "node.key"
    key.chmod(0o644)
    assert files_refused(raw) == (
        f"peerlink.tls.key_file {key} is accessible by group or others (mode 0644): "
        f"chmod 600 {key}")


def test_certificates_may_be_world_readable(tmp_path: Path) -> None:
    raw = tls_cfg(tmp_path)
    (tmp_path / "node.crt").chmod(0o644)
    (tmp_path / "ca.crt").chmod(0o644)
    check_config_files(parse_config(raw))


def test_nbd_psk_file(tmp_path: Path) -> None:
    p = tmp_path / "nbd.psk"
    raw = {"version": 1, "nbd": {"tls": {"mode": "require", "psk_file": str(p)}}}
    assert files_refused(raw) == f"nbd.tls.psk_file {p} does not exist"
    secret_file(p, b"alice:" + os.urandom(32).hex().encode() + b"\n", mode=0o604)
    assert files_refused(raw) == (f"nbd.tls.psk_file {p} is accessible by group or others "
                                  f"(mode 0604): chmod 600 {p}")
    p.chmod(0o600)
    check_config_files(parse_config(raw))


def test_nbd_certificates_dir(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    raw = {"version": 1, "nbd": {"tls": {"mode": "require", "certificates_dir": str(d)}}}
    assert files_refused(raw) == f"nbd.tls.certificates_dir {d} does not exist"
    d.mkdir()
    assert files_refused(raw) == (f"nbd.tls.certificates_dir {d}: {d}/server-cert.pem "
                                  "does not exist")
    secret_file(d / "server-cert.pem", b"PEM\n", mode=0o644)
    assert files_refused(raw) == (f"nbd.tls.certificates_dir {d}: {d}/server-key.pem "
                                  "does not exist")
    secret_file(d / "server-key.pem", b"PEM\n", mode=0o644)
    assert files_refused(raw) == (
        f"nbd.tls.certificates_dir {d}: {d}/server-key.pem is accessible by group or "
        f"others (mode 0644): chmod 600 {d}/server-key.pem")
    (d / "server-key.pem").chmod(0o600)
    check_config_files(parse_config(raw))


def chap_cfg(path: Path, mutual: Path | None = None) -> dict[str, Any]:
    iscsi: dict[str, Any] = {"chap": {"user": "alice", "secret_file": str(path)}}
    if mutual is not None:
        iscsi["mutual_chap"] = {"user": "target", "secret_file": str(mutual)}
    return {"version": 1, "iscsi": iscsi}


def test_chap_secret_file(tmp_path: Path) -> None:
    p = tmp_path / "chap.secret"
    assert files_refused(chap_cfg(p)) == f"iscsi.chap.secret_file {p} does not exist"
    secret_file(p, CHAP.encode() + b"\n", mode=0o644)
    assert files_refused(chap_cfg(p)) == (
        f"iscsi.chap.secret_file {p} is accessible by group or others (mode 0644): "
        f"chmod 600 {p}")
    p.chmod(0o600)
    check_config_files(parse_config(chap_cfg(p)))


def test_three_character_chap_secret(tmp_path: Path) -> None:
    """RFC 3720 §8.2.1: at least 12 bytes (96 bits); tgt and Linux initiators take up
    to 255, Windows 12 to 16."""
    p = secret_file(tmp_path / "chap.secret", b"abc\n")
    assert files_refused(chap_cfg(p)) == (
        f"the CHAP secret in {p} (iscsi.chap.secret_file) must be 12 to 255 characters "
        "without spaces (Windows initiators accept at most 16)")
    secret_file(p, b"x" * 11 + b"\n")
    assert "must be 12 to 255 characters" in files_refused(chap_cfg(p))
    secret_file(p, b"x" * 12 + b"\n")
    check_config_files(parse_config(chap_cfg(p)))


def test_mutual_chap_secret_file(tmp_path: Path) -> None:
    p = secret_file(tmp_path / "chap.secret", CHAP.encode())
    m = tmp_path / "mutual.secret"
    assert files_refused(chap_cfg(p, m)) == f"iscsi.mutual_chap.secret_file {m} does not exist"


# -- through load_config(files=True), as config check, serve and the daemon use it ------

def test_load_config_checks_files_when_asked(tmp_path: Path) -> None:
    missing = tmp_path / "peer.secret"
    p = write_config(tmp_path, f"version: 1\npeers:\n  - {{name: dc, role: secondary, "
                        f"address: 192.0.2.12}}\npeerlink:\n  secret_file: {missing}\n")
    assert load_config(p).peerlink.secret_file == missing  # status, list: no file check
    with pytest.raises(ConfigError) as ei:
        load_config(p, files=True)
    assert str(ei.value) == f"{p}: peerlink.secret_file {missing} does not exist"
