"""The node config: a full config, the defaults, and every error message word for word.

Operators see these messages as the only explanation of a refused config, so each one
is pinned exactly (ceph-iscsi's test_settings.py style).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import (
    DEFAULT_DATA_DIR,
    JournalConfig,
    Listen,
    NbdConfig,
    NodeConfig,
    TlsConfig,
    TlsMode,
    VolumeConfig,
    check_tls,
    default_config,
    load_config,
    parse_cidr,
    parse_config,
    parse_listen,
)
from gateway.errors import ConfigError
from nbdgw_common.errors import GatewayError
from tests.unit.conftest import refused, write_config

ROOT = Path(__file__).resolve().parents[2]
TOP = ("activity_log, cdp, control, coordinator, failover, groups, health, iscsi, journal, "
       "metrics, nbd, node, peerlink, peers, service, sites, snapshots, version, volumes")
NAME_RULE = "use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
TLS_ONE_OF = ("nbd.tls.mode is on or require: set exactly one of nbd.tls.psk_file and "
              "nbd.tls.certificates_dir")

FULL_YAML = """\
version: 1
node:
  name: alpha
  data_dir: /srv/nbdgw
nbd:
  listen:
    - tcp:127.0.0.1:10809
    - tcp:[::1]:10810
    - unix:/run/nbdgw/nbd.sock
  allow:
    - 192.168.1.7/24
    - 127.0.0.1
    - ::1
  tls:
    mode: require
    certificates_dir: /etc/nbdgw/pki
    verify_peer: true
journal:
  max_bytes: 2G
  segment_bytes: 32M
activity_log:
  extents: 4096
volumes:
  - name: sql-data
    size: 100G
  - name: sql.log_2
    size: 512MiB
    read_only: true
  - name: raw
    size: 1048576
"""


def minimal(**sections: Any) -> dict[str, Any]:
    """{"version": 1} plus the given top-level sections."""
    return {"version": 1, **sections}






# -- valid configs -------------------------------------------------------------------

def test_full_config(tmp_path: Path) -> None:
    path = write_config(tmp_path, FULL_YAML)
    cfg = load_config(path)
    assert cfg == NodeConfig(
        name="alpha",
        data_dir=Path("/srv/nbdgw"),
        nbd=NbdConfig(
            listen=(Listen("tcp", host="127.0.0.1", port=10809),
                    Listen("tcp", host="::1", port=10810),
                    Listen("unix", path="/run/nbdgw/nbd.sock")),
            tls=TlsConfig(TlsMode.REQUIRE, None, Path("/etc/nbdgw/pki"), True),
            allow=("192.168.1.0/24", "127.0.0.1/32", "::1/128"),
        ),
        journal=JournalConfig(max_bytes=2 << 30, segment_bytes=32 << 20),
        al_extents=4096,
        volumes=(VolumeConfig("sql-data", 100 << 30),
                 VolumeConfig("sql.log_2", 512 << 20, read_only=True),
                 VolumeConfig("raw", 1 << 20)),
        source=path,
    )
    assert [str(x) for x in cfg.nbd.listen] == [
        "tcp:127.0.0.1:10809", "tcp:[::1]:10810", "unix:/run/nbdgw/nbd.sock"]
    assert cfg.volume("raw") == VolumeConfig("raw", 1 << 20)
    assert cfg.volume("nope") is None


def test_defaults() -> None:
    cfg = parse_config({"version": 1})
    assert cfg == NodeConfig(
        name=os.uname().nodename,
        data_dir=DEFAULT_DATA_DIR,
        nbd=NbdConfig(listen=(Listen("tcp", host="0.0.0.0", port=10809),),
                      tls=TlsConfig(TlsMode.OFF, None, None, False), allow=()),
        journal=JournalConfig(max_bytes=1 << 30, segment_bytes=64 << 20),
        al_extents=1024,
        volumes=(),
        source=None,
    )
    assert Path("/var/lib/nbdgw") == DEFAULT_DATA_DIR
    assert cfg == default_config()


def test_empty_sections_take_defaults(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, "version: 1\nnode:\nnbd:\njournal:\nactivity_log:\n"))
    assert cfg == parse_config({"version": 1}, cfg.source)


@pytest.mark.parametrize(("text", "mode"), [
    ("off", TlsMode.OFF), ('"off"', TlsMode.OFF), ("on", TlsMode.ON), ('"on"', TlsMode.ON),
    ("require", TlsMode.REQUIRE)])
def test_tls_mode_yaml_booleans(tmp_path: Path, text: str, mode: TlsMode) -> None:
    """YAML 1.1 reads a bare on/off as a boolean; the mode still means what was typed."""
    extra = "" if mode is TlsMode.OFF else "\n    psk_file: /etc/nbdgw/tls.psk"
    cfg = load_config(write_config(
        tmp_path, f"version: 1\nnbd:\n  tls:\n    mode: {text}{extra}\n"))
    assert cfg.nbd.tls.mode is mode


def test_example_config_loads_and_documents_every_key() -> None:
    example = ROOT / "examples" / "nbdgw.yaml"
    cfg = load_config(example)
    assert cfg.name == "alpha"
    assert [v.name for v in cfg.volumes] == ["sql-data", "sql-log", "archive"]
    text = example.read_text()
    for key in ("version", "node", "name", "data_dir", "nbd", "listen", "allow", "tls",
                "mode", "psk_file", "certificates_dir", "verify_peer", "journal",
                "max_bytes", "segment_bytes", "activity_log", "extents", "volumes", "size",
                "read_only", "role", "service", "address", "interface", "peerlink",
                "topology", "secret_file", "peers", "port", "sync_timeout", "rate_limit",
                "compression", "failover", "auto", "heartbeat_port", "interval", "timeout",
                "fence_margin", "heartbeat_addresses", "insecure", "next_secret_file"):
        assert f"{key}:" in text, f"examples/nbdgw.yaml does not document {key}"


def test_sizes_as_integers_and_strings() -> None:
    cfg = parse_config(minimal(journal={"max_bytes": 1 << 30, "segment_bytes": "1M"},
                               volumes=[{"name": "a", "size": 8192}]))
    assert (cfg.journal.max_bytes, cfg.journal.segment_bytes) == (1 << 30, 1 << 20)
    assert cfg.volumes == (VolumeConfig("a", 8192),)


def test_with_overrides_ignores_none() -> None:
    cfg = parse_config({"version": 1})
    new = cfg.with_overrides(data_dir=Path("/x"), name=None)
    assert (new.data_dir, new.name) == (Path("/x"), cfg.name)


def test_config_error_is_a_gateway_error() -> None:
    assert issubclass(ConfigError, GatewayError)


# -- version and top level -----------------------------------------------------------

@pytest.mark.parametrize("raw", [
    {}, {"version": 2}, {"version": 0}, {"version": "1"}, {"version": None},
    {"version": True}, {"version": 1.0},
])
def test_version_missing_or_wrong(raw: dict[str, Any]) -> None:
    assert refused(raw) == "expected version: 1 at the top of the config"


@pytest.mark.parametrize("raw", [[1, 2], "version: 1", 5])
def test_top_level_not_a_mapping(raw: Any) -> None:
    assert refused(raw) == "expected a mapping for the config file"


def test_empty_document(tmp_path: Path) -> None:
    path = write_config(tmp_path, "# nothing here\n")
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert str(ei.value) == f"{path}: expected version: 1 at the top of the config"


# -- unknown keys at each level ------------------------------------------------------

@pytest.mark.parametrize(("raw", "msg"), [
    (minimal(colour="red"), f"unknown key 'colour' in the config file (known: {TOP})"),
    (minimal(node={"colour": 1}), "unknown key 'colour' in node (known: data_dir, name, role)"),
    (minimal(nbd={"colour": 1}),
     "unknown key 'colour' in nbd (known: allow, default_export, listen, tls)"),
    (minimal(nbd={"tls": {"colour": 1}}),
     "unknown key 'colour' in nbd.tls (known: certificates_dir, mode, psk_file, verify_peer)"),
    (minimal(journal={"colour": 1}),
     "unknown key 'colour' in journal (known: max_bytes, segment_bytes)"),
    (minimal(activity_log={"slots": 1}),
     "unknown key 'slots' in activity_log (known: extents)"),
    (minimal(volumes=[{"name": "a", "size": "1G"}, {"name": "b", "size": "1G", "rw": True}]),
     "unknown key 'rw' in volumes[1] (known: cdp, name, read_only, size)"),
])
def test_unknown_keys(raw: dict[str, Any], msg: str) -> None:
    assert refused(raw) == msg


@pytest.mark.parametrize(("raw", "msg"), [
    (minimal(node=[1]), "expected a mapping for node"),
    (minimal(nbd="tcp:1.2.3.4:1"), "expected a mapping for nbd"),
    (minimal(nbd={"tls": "on"}), "expected a mapping for nbd.tls"),
    (minimal(journal=5), "expected a mapping for journal"),
    (minimal(activity_log=[]), "expected a mapping for activity_log"),
    (minimal(volumes=["a"]), "expected a mapping for volumes[0]"),
    (minimal(volumes={"name": "a"}), "expected a list for volumes"),
    (minimal(nbd={"listen": "tcp:127.0.0.1:1"}), "expected a list for nbd.listen"),
    (minimal(nbd={"allow": "10.0.0.0/8"}), "expected a list for nbd.allow"),
])
def test_wrong_container_types(raw: dict[str, Any], msg: str) -> None:
    assert refused(raw) == msg


# -- node ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", [5, "", True, ["a"]])
def test_node_name_type(name: Any) -> None:
    assert refused(minimal(node={"name": name})) == "expected a non-empty string for node.name"


@pytest.mark.parametrize("d", ["relative/dir", "", 5, "~/x"])
def test_node_data_dir_absolute(d: Any) -> None:
    assert refused(minimal(node={"data_dir": d})) == "expected an absolute path for node.data_dir"


# -- integers and sizes --------------------------------------------------------------

@pytest.mark.parametrize("v", [0, -1, 65537, 10**9, "10", True, False, 1.0, None, [1]])
def test_activity_log_extents_range(v: Any) -> None:
    assert refused(minimal(activity_log={"extents": v})) == (
        "expected integer between 1 and 65536 for activity_log.extents")


@pytest.mark.parametrize("v", [1, 65536])
def test_activity_log_extents_bounds_accepted(v: int) -> None:
    assert parse_config(minimal(activity_log={"extents": v})).al_extents == v


@pytest.mark.parametrize(("key", "v", "why"), [
    ("max_bytes", "12X", "invalid size '12X': expected a number with an optional unit K, M, G, "
                         "T or P"),
    ("max_bytes", "1000", "invalid size '1000': must be a multiple of 4096 bytes"),
    ("max_bytes", 0, "invalid size 0: must be greater than zero"),
    ("segment_bytes", "-1M", "invalid size '-1M': expected a number with an optional unit K, "
                             "M, G, T or P"),
    ("segment_bytes", "2P", "invalid size '2P': larger than 1 PiB"),
])
def test_journal_size_values(key: str, v: Any, why: str) -> None:
    assert refused(minimal(journal={key: v})) == f"{why} for journal.{key}"


@pytest.mark.parametrize("v", [True, 1.5, None, ["1G"], {"a": 1}])
def test_journal_size_types(v: Any) -> None:
    assert refused(minimal(journal={"max_bytes": v})) == (
        "expected a size such as 10G for journal.max_bytes")


def test_segment_bytes_minimum() -> None:
    assert refused(minimal(journal={"segment_bytes": "512K"})) == (
        "expected at least 1M for journal.segment_bytes")
    assert parse_config(minimal(journal={"segment_bytes": "1M"})).journal.segment_bytes == 1 << 20


def test_segment_bytes_maximum() -> None:
    assert refused(minimal(journal={"segment_bytes": "2G", "max_bytes": "4G"})) == (
        "expected at most 1G for journal.segment_bytes")
    assert parse_config(minimal(journal={"segment_bytes": "1G"})).journal.segment_bytes == 1 << 30


def test_max_bytes_at_least_segment_bytes() -> None:
    assert refused(minimal(journal={"max_bytes": "32M", "segment_bytes": "64M"})) == (
        "journal.max_bytes must be at least journal.segment_bytes")
    assert refused(minimal(journal={"max_bytes": "32M"})) == (
        "journal.max_bytes must be at least journal.segment_bytes")
    cfg = parse_config(minimal(journal={"max_bytes": "64M", "segment_bytes": "64M"}))
    assert cfg.journal.max_bytes == cfg.journal.segment_bytes


# -- listen --------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "listen"), [
    ("tcp:0.0.0.0:10809", Listen("tcp", host="0.0.0.0", port=10809)),
    ("tcp:127.0.0.1:0", Listen("tcp", host="127.0.0.1", port=0)),
    ("tcp:[::]:65535", Listen("tcp", host="::", port=65535)),
    ("tcp:[fe80::1]:1", Listen("tcp", host="fe80::1", port=1)),
    ("unix:/run/x.sock", Listen("unix", path="/run/x.sock")),
])
def test_listen_accepted(text: str, listen: Listen) -> None:
    assert parse_listen(text) == listen
    assert str(parse_listen(text)) == text
    cfg = parse_config(minimal(nbd={"listen": [text]}))
    assert cfg.nbd.listen == (listen,)


@pytest.mark.parametrize(("value", "msg"), [
    (5, "expected string 'tcp:HOST:PORT' or 'unix:PATH' for nbd.listen[1]"),
    (None, "expected string 'tcp:HOST:PORT' or 'unix:PATH' for nbd.listen[1]"),
    ("unix:run/x.sock", "expected an absolute socket path after 'unix:' for nbd.listen[1]"),
    ("unix:", "expected an absolute socket path after 'unix:' for nbd.listen[1]"),
    ("tcp:127.0.0.1:65536",
     "expected 'tcp:HOST:PORT' with PORT 0-65535 for nbd.listen[1], got 'tcp:127.0.0.1:65536'"),
    ("tcp:127.0.0.1", "expected 'tcp:HOST:PORT' with PORT 0-65535 for nbd.listen[1], "
                      "got 'tcp:127.0.0.1'"),
    ("tcp:127.0.0.1:", "expected 'tcp:HOST:PORT' with PORT 0-65535 for nbd.listen[1], "
                       "got 'tcp:127.0.0.1:'"),
    ("tcp::10809", "expected 'tcp:HOST:PORT' with PORT 0-65535 for nbd.listen[1], "
                   "got 'tcp::10809'"),
    ("tcp:127.0.0.1:-1", "expected 'tcp:HOST:PORT' with PORT 0-65535 for nbd.listen[1], "
                         "got 'tcp:127.0.0.1:-1'"),
    ("tcp:localhost:10809",
     "expected an IP address as HOST in 'tcp:localhost:10809' for nbd.listen[1]"),
    ("tcp:10.0.0.256:1", "expected an IP address as HOST in 'tcp:10.0.0.256:1' for nbd.listen[1]"),
    ("127.0.0.1:10809",
     "expected 'tcp:HOST:PORT' or 'unix:PATH' for nbd.listen[1], got '127.0.0.1:10809'"),
    ("", "expected 'tcp:HOST:PORT' or 'unix:PATH' for nbd.listen[1], got ''"),
])
def test_listen_refused(value: Any, msg: str) -> None:
    assert refused(minimal(nbd={"listen": ["unix:/ok.sock", value]})) == msg


def test_listen_empty_list() -> None:
    assert refused(minimal(nbd={"listen": []})) == "expected at least one address in nbd.listen"


def test_parse_listen_default_location() -> None:
    """The CLI's --listen goes through the same parser; messages then say 'listen'."""
    with pytest.raises(ConfigError) as ei:
        parse_listen("udp:1.2.3.4:5")
    assert str(ei.value) == (
        "expected 'tcp:HOST:PORT' or 'unix:PATH' for listen, got 'udp:1.2.3.4:5'")


# -- tls -----------------------------------------------------------------------------

@pytest.mark.parametrize("tls", [
    {"mode": "require"},
    {"mode": "on"},
    {"mode": True},
    {"mode": "require", "psk_file": "/a", "certificates_dir": "/b"},
    {"mode": "on", "psk_file": "/a", "certificates_dir": "/b", "verify_peer": True},
])
def test_tls_needs_exactly_one_credential(tls: dict[str, Any]) -> None:
    assert refused(minimal(nbd={"tls": tls})) == TLS_ONE_OF


def test_tls_verify_peer_needs_certificates() -> None:
    raw = minimal(nbd={"tls": {"mode": "require", "psk_file": "/etc/psk", "verify_peer": True}})
    assert refused(raw) == "nbd.tls.verify_peer needs nbd.tls.certificates_dir"


@pytest.mark.parametrize("tls", [
    {"mode": "require", "psk_file": "/etc/nbdgw/tls.psk"},
    {"mode": "on", "certificates_dir": "/etc/nbdgw/pki", "verify_peer": True},
    {"mode": "off", "psk_file": "/x"},  # credentials kept for later, not used
    {},
])
def test_tls_valid_combinations(tls: dict[str, Any]) -> None:
    cfg = parse_config(minimal(nbd={"tls": tls}))
    assert cfg.nbd.tls.mode is TlsMode(tls.get("mode", "off"))


@pytest.mark.parametrize(("tls", "msg"), [
    ({"mode": "maybe"}, "expected one of off, on, require for nbd.tls.mode"),
    ({"mode": 1}, "expected one of off, on, require for nbd.tls.mode"),
    ({"mode": "OFF"}, "expected one of off, on, require for nbd.tls.mode"),
    ({"verify_peer": "yes"}, "expected true or false for nbd.tls.verify_peer"),
    ({"verify_peer": 1}, "expected true or false for nbd.tls.verify_peer"),
    ({"psk_file": "tls.psk"}, "expected an absolute path for nbd.tls.psk_file"),
    ({"certificates_dir": 7}, "expected an absolute path for nbd.tls.certificates_dir"),
])
def test_tls_field_types(tls: dict[str, Any], msg: str) -> None:
    assert refused(minimal(nbd={"tls": tls})) == msg


def test_check_tls_directly() -> None:
    """The CLI builds a TlsConfig from flags and checks it with the same rules."""
    with pytest.raises(ConfigError) as ei:
        check_tls(TlsConfig(TlsMode.ON))
    assert str(ei.value) == TLS_ONE_OF
    ok = TlsConfig(TlsMode.ON, psk_file=Path("/p"))
    assert check_tls(ok) is ok


# -- allow ---------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "norm"), [
    ("10.1.2.3", "10.1.2.3/32"), ("10.1.2.3/8", "10.0.0.0/8"), ("0.0.0.0/0", "0.0.0.0/0"),
    ("fd00::5/64", "fd00::/64"), ("::1", "::1/128"),
])
def test_allow_accepted_and_normalised(value: str, norm: str) -> None:
    assert parse_config(minimal(nbd={"allow": [value]})).nbd.allow == (norm,)
    assert parse_cidr(value, "x") == norm


@pytest.mark.parametrize(("value", "msg"), [
    (5, "expected an address or CIDR string in nbd.allow[1]"),
    (None, "expected an address or CIDR string in nbd.allow[1]"),
    ("10.0.0.0/33", "expected an address or CIDR in nbd.allow[1], got '10.0.0.0/33'"),
    ("10.0.0.256", "expected an address or CIDR in nbd.allow[1], got '10.0.0.256'"),
    ("example.com", "expected an address or CIDR in nbd.allow[1], got 'example.com'"),
    ("", "expected an address or CIDR in nbd.allow[1], got ''"),
])
def test_allow_refused(value: Any, msg: str) -> None:
    assert refused(minimal(nbd={"allow": ["127.0.0.1", value]})) == msg


# -- volumes -------------------------------------------------------------------------

@pytest.mark.parametrize(("vols", "msg"), [
    ([{"size": "1G"}], "missing key 'name' in volumes[0]"),
    ([{"name": "a", "size": "1G"}, {"name": "b"}], "missing key 'size' in volumes[1]"),
    ([{"name": "a", "size": "1G"}, {"name": "a", "size": "2G"}],
     "volume a is listed twice in volumes"),
    ([{"name": "a/b", "size": "1G"}], f"invalid volume name 'a/b': {NAME_RULE} in volumes[0].name"),
    ([{"name": "-a", "size": "1G"}], f"invalid volume name '-a': {NAME_RULE} in volumes[0].name"),
    ([{"name": "", "size": "1G"}], "expected a non-empty string for volumes[0].name"),
    ([{"name": 12, "size": "1G"}], "expected a non-empty string for volumes[0].name"),
    ([{"name": "a", "size": "1000"}],
     "invalid size '1000': must be a multiple of 4096 bytes for volumes[0].size"),
    ([{"name": "a", "size": "0"}],
     "invalid size '0': must be greater than zero for volumes[0].size"),
    ([{"name": "a", "size": "ten"}], "invalid size 'ten': expected a number with an optional "
                                     "unit K, M, G, T or P for volumes[0].size"),
    ([{"name": "a", "size": None}], "expected a size such as 10G for volumes[0].size"),
    ([{"name": "a", "size": "1G", "read_only": "yes"}],
     "expected true or false for volumes[0].read_only"),
])
def test_volume_errors(vols: list[Any], msg: str) -> None:
    assert refused(minimal(volumes=vols)) == msg


# -- files ---------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "line", "col"), [
    ("version: 1\nnode:\n  name: x\n   bad: indent\n", 4, 7),
    ("version: 1\nnbd:\n  listen: [unix:/a\n", 4, 1),
    ("version: 1\n\tnode: {}\n", 2, 1),
    ("a: b: c\n", 1, 5),
])
def test_yaml_syntax_error_names_the_line(tmp_path: Path, text: str, line: int,
                                          col: int) -> None:
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert str(ei.value) == f"{path}: not valid YAML at line {line}, column {col}"


def test_load_config_prefixes_the_path(tmp_path: Path) -> None:
    raw = FULL_YAML.replace("extents: 4096", "extents: 0")
    path = write_config(tmp_path, raw)
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert str(ei.value) == (
        f"{path}: expected integer between 1 and 65536 for activity_log.extents")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert str(ei.value) == f"cannot read config {path}: No such file or directory"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path)
    assert str(ei.value) == f"cannot read config {tmp_path}: Is a directory"


def test_parse_config_does_not_modify_its_input() -> None:
    raw = yaml.safe_load(FULL_YAML)
    before = copy.deepcopy(raw)
    parse_config(raw)
    assert raw == before


# -- coordinator (etcd) ------------------------------------------------------------------------

ETCD_OK = {"kind": "etcd", "endpoints": ["http://192.0.2.21:2379", "https://[2001:db8::1]:2379/"]}


def test_coordinator_etcd_is_read_with_its_defaults() -> None:
    c = parse_config({"version": 1, "coordinator": ETCD_OK}).coordinator
    assert c.kind.value == "etcd" and c.group == "default" and c.prefix == "/nbdgw"
    assert c.endpoints == ("http://192.0.2.21:2379", "https://[2001:db8::1]:2379")
    assert c.lease_ttl == 5


@pytest.mark.parametrize(("coordinator", "msg"), [
    ({"kind": "etcd"}, "coordinator.kind etcd needs coordinator.endpoints"),
    ({"kind": "etcd", "endpoints": ["192.0.2.21:2379"]},
     "expected http(s)://HOST:PORT for coordinator.endpoints[0], got '192.0.2.21:2379'"),
    ({"kind": "etcd", "endpoints": "http://192.0.2.21:2379"},
     "expected a list for coordinator.endpoints"),
    ({"endpoints": ["http://192.0.2.21:2379"]},
     "coordinator.endpoints is set but coordinator.kind is heartbeat"),
    ({**ETCD_OK, "group": "a/b"}, "coordinator.group, got 'a/b'"),
    ({**ETCD_OK, "prefix": "nbdgw"}, "coordinator.prefix, got 'nbdgw'"),
    ({**ETCD_OK, "lease_ttl": 1}, "expected integer between 2 and 60 for coordinator.lease_ttl"),
    ({**ETCD_OK, "cert_file": "/c"}, "coordinator.cert_file and coordinator.key_file go "
                                     "together"),
    ({"kind": "zookeeper"}, "coordinator.kind"),
])
def test_coordinator_refuses_bad_values_by_name(coordinator: dict[str, Any], msg: str) -> None:
    assert msg in refused({"version": 1, "coordinator": coordinator})


def test_coordinator_etcd_refuses_a_witness() -> None:
    raw = {"version": 1, "node": {"role": "witness"}, "coordinator": ETCD_OK,
           "peerlink": {"secret_file": "/etc/nbdgw/peer.secret"},
           "peers": [{"name": "a", "role": "primary", "address": "192.0.2.11"},
                     {"name": "b", "role": "secondary", "address": "192.0.2.12"}]}
    assert "etcd decides who is primary" in refused(raw)


def test_coordinator_files_are_checked_by_name(tmp_path: Path) -> None:
    key = tmp_path / "etcd-key.pem"
    key.write_text("k")
    key.chmod(0o644)
    raw = {"version": 1, "coordinator": {**ETCD_OK, "cert_file": str(tmp_path / "none.pem"),
                                         "key_file": str(key)}}
    from gateway.config import check_files

    with pytest.raises(ConfigError, match=r"coordinator\.cert_file"):
        check_files(parse_config(raw))
    (tmp_path / "none.pem").write_text("c")
    with pytest.raises(ConfigError, match=r"coordinator\.key_file"):
        check_files(parse_config(raw))
    key.chmod(0o600)
    check_files(parse_config(raw))
