"""The iscsi: config section: defaults, a full section, and every message word for word."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import parse_config
from gateway.errors import ConfigError
from iscsi_bridge.settings import ChapConfig, IscsiConfig, IscsiFuse, IscsiRoute

IQN = "iqn.2026-11.com.example:nbdgw"
IQN_RULE = ("expected an IQN such as iqn.2026-11.com.example:nbdgw (iqn.YYYY-MM. and a "
            "reversed domain name, then optionally ':' and a unique part; lowercase "
            "letters, digits, '.', '-' and ':' only)")
KNOWN = ("allow, chap, control_port, enabled, fuse, initiators, iqn, mutual_chap, portal, "
         "readers_portal, route, run_dir")


def cfg(iscsi: Any, **top: Any) -> IscsiConfig:
    return parse_config({"version": 1, "iscsi": iscsi, **top}).iscsi


def refused(iscsi: Any, **top: Any) -> str:
    with pytest.raises(ConfigError) as e:
        cfg(iscsi, **top)
    return str(e.value)


def test_defaults() -> None:
    c = parse_config({"version": 1}).iscsi
    assert c == IscsiConfig()
    assert (c.enabled, c.portal, c.iqn, c.control_port) == (False, "0.0.0.0:3260", None, 3260)
    assert c.run_dir == Path("/run/nbdgw/iscsi")
    assert c.fuse is IscsiFuse.NBDKIT


def test_full_section() -> None:
    c = cfg({"enabled": True, "portal": "[2001:db8::10]:3261", "iqn": IQN,
             "chap": {"user": "sql", "secret_file": "/etc/nbdgw/chap"},
             "mutual_chap": {"user": "tgt", "secret_file": "/etc/nbdgw/mutual"},
             "initiators": ["iqn.1991-05.com.microsoft:sql1", "eui.0123456789ABCDEF",
                            "naa.0123456789abcdef"],
             "control_port": 17000, "run_dir": "/srv/iscsi", "route": "loop",
             "fuse": "nbdfuse"},
            volumes=[{"name": "sql-data", "size": "1G"}])
    assert (c.portal_host, c.portal_port, c.portal) == ("2001:db8::10", 3261,
                                                        "[2001:db8::10]:3261")
    assert c.chap == ChapConfig("sql", Path("/etc/nbdgw/chap"))
    assert c.mutual_chap == ChapConfig("tgt", Path("/etc/nbdgw/mutual"))
    assert len(c.initiators) == 3
    assert (c.control_port, c.run_dir, c.route) == (17000, Path("/srv/iscsi"),
                                                    IscsiRoute.LOOP)
    assert c.fuse is IscsiFuse.NBDFUSE


def test_allow_is_normalised() -> None:
    assert cfg({"allow": ["192.0.2.7", "198.51.100.0/24"]}).allow == (
        "192.0.2.7/32", "198.51.100.0/24")


@pytest.mark.parametrize(("iscsi", "top", "message"), [
    ({"colour": 1}, {}, f"unknown key 'colour' in iscsi (known: {KNOWN})"),
    ("yes", {}, "expected a mapping for iscsi"),
    ({"enabled": "yes"}, {}, "expected true or false for iscsi.enabled"),
    ({"enabled": True}, {}, "missing key 'iqn' in iscsi (required when iscsi.enabled is true)"),
    ({"iqn": "iqn.2026-11.com.Example:nbdgw"}, {},
     f"{IQN_RULE}, got 'iqn.2026-11.com.Example:nbdgw' for iscsi.iqn"),
    ({"iqn": "iqn.2026-13.com.example"}, {},
     f"{IQN_RULE}, got 'iqn.2026-13.com.example' for iscsi.iqn"),
    ({"iqn": "nbdgw"}, {}, f"{IQN_RULE}, got 'nbdgw' for iscsi.iqn"),
    ({"iqn": 7}, {}, f"{IQN_RULE}, got 7 for iscsi.iqn"),
    ({"iqn": "iqn.2026-11.com.example:" + "x" * 200}, {},
     "an iSCSI name is at most 223 bytes, 'iqn.2026-11.com.example:" + "x" * 200
     + "' has 224 for iscsi.iqn"),
    ({"portal": "192.0.2.1"}, {},
     "expected 'HOST:PORT' with an IP address and a port 1..65535 for iscsi.portal, "
     "got '192.0.2.1'"),
    ({"portal": "192.0.2.1:0"}, {},
     "expected 'HOST:PORT' with an IP address and a port 1..65535 for iscsi.portal, "
     "got '192.0.2.1:0'"),
    ({"portal": "gateway:3260"}, {},
     "expected 'HOST:PORT' with an IP address and a port 1..65535 for iscsi.portal, "
     "got 'gateway:3260'"),
    ({"portal": 3260}, {}, "expected 'HOST:PORT' for iscsi.portal"),
    ({"control_port": 0}, {}, "expected integer between 1 and 32767 for iscsi.control_port"),
    ({"run_dir": "run"}, {}, "expected an absolute path for iscsi.run_dir"),
    ({"route": "fast"}, {}, "expected one of file, loop for iscsi.route"),
    ({"fuse": "fusepy"}, {}, "expected one of nbdkit, nbdgw, nbdfuse for iscsi.fuse"),
    ({"chap": {"user": "a"}}, {}, "missing key 'secret_file' in iscsi.chap"),
    ({"chap": {"secret_file": "/s"}}, {}, "missing key 'user' in iscsi.chap"),
    ({"chap": {"user": "a b", "secret_file": "/s"}}, {},
     "expected a user name without spaces for iscsi.chap.user"),
    ({"chap": {"user": "a", "secret_file": "s"}}, {},
     "expected an absolute path for iscsi.chap.secret_file"),
    ({"chap": {"user": "a", "secret_file": "/s", "pw": 1}}, {},
     "unknown key 'pw' in iscsi.chap (known: secret_file, user)"),
    ({"mutual_chap": {"user": "t", "secret_file": "/m"}}, {},
     "iscsi.mutual_chap needs iscsi.chap (the initiator authenticates first)"),
    ({"chap": {"user": "a", "secret_file": "/s"},
      "mutual_chap": {"user": "a", "secret_file": "/m"}}, {},
     "iscsi.chap.user and iscsi.mutual_chap.user must differ"),
    ({"initiators": "iqn.1991-05.com.microsoft:sql1"}, {},
     "expected a list for iscsi.initiators"),
    ({"initiators": ["iqn.1991-05.com.microsoft:sql1", "SQL1"]}, {},
     "expected an initiator name such as iqn.1991-05.com.microsoft:host1, "
     "eui.0123456789ABCDEF or naa.0123456789ABCDEF, got 'SQL1' in iscsi.initiators[1]"),
    ({"allow": ["10.0.0.300"]}, {},
     "expected an address or CIDR in iscsi.allow[0], got '10.0.0.300'"),
    ({"initiators": ["iqn.1991-05.com.microsoft:sql1"], "allow": ["192.0.2.0/24"]}, {},
     "set iscsi.initiators or iscsi.allow, not both: tgtd admits an initiator that "
     "matches either list, so together they would widen access, not narrow it"),
    ({"enabled": True, "iqn": IQN}, {"volumes": [{"name": "ok", "size": "1G"},
                                                 {"name": "SQL_Data", "size": "1G"}]},
     "volume name 'SQL_Data' cannot be part of an iSCSI target name (IQNs allow only "
     "lowercase letters, digits, '.' and '-' here): rename it, or leave it out of the "
     "iSCSI export (volumes[1].name, exported by iscsi)"),
])
def test_messages(iscsi: Any, top: dict[str, Any], message: str) -> None:
    assert refused(iscsi, **top) == message


def test_invalid_volume_names_are_fine_while_iscsi_is_off() -> None:
    c = parse_config({"version": 1, "iscsi": {"iqn": IQN},
                      "volumes": [{"name": "SQL_Data", "size": "1G"}]})
    assert c.volumes[0].name == "SQL_Data"
