"""A config with volume groups (issue 22): parsing, the checks across groups, and the
ordinary node config each site runs each of its groups from (group_config); a config
of today's format is read as before."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import (
    Listen,
    PeerMode,
    Role,
    find_group,
    front_routes,
    group_config,
    groups_of,
    load_config,
    parse_config,
)
from gateway.errors import ConfigError

from .conftest import refused

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "groups.yaml"
LEGACY = Path(__file__).resolve().parents[2] / "examples" / "nbdgw.yaml"


def example() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())  # type: ignore[no-any-return]


def three_groups() -> dict[str, Any]:
    """Two data sites a and b and a witness w: g1 a -> b, g2 b -> a, w witness of both;
    and g3 b -> w (w a data site of g3) with a as its witness."""
    ports = lambda n: {"peerlink": 7800 + 10 * n, "heartbeat": 7801 + 10 * n,  # noqa: E731
                       "nbd": 10810 + n}
    return {
        "version": 1, "node": {"name": "a", "data_dir": "/srv/nbdgw"},
        "peerlink": {"secret_file": "/etc/nbdgw/peer.secret"},
        "sites": [{"name": "a", "address": "10.0.0.1"},
                  {"name": "b", "address": "10.0.0.2", "heartbeat_addresses": ["10.1.0.2"]},
                  {"name": "w", "address": "10.0.0.3"}],
        "groups": [
            {"name": "g1", "primary": "a", "secondary": "b", "witness": "w",
             "replicas": [{"site": "b", "mode": "sync", "sync_timeout": 3},
                          {"site": "a", "mode": "sync"}],
             "ports": ports(1), "service": {"address": "10.0.0.101/24", "interface": "eth0"},
             "volumes": [{"name": "v1", "size": "64M"}]},
            {"name": "g2", "primary": "b", "secondary": "a", "witness": "w",
             "replicas": [{"site": "a", "rate_limit": "20M"}],
             "ports": {**ports(2), "metrics": 9812},
             "volumes": [{"name": "v2", "size": "64M"}]},
            {"name": "g3", "primary": "b", "secondary": "w", "witness": "a",
             "ports": ports(3)},
        ]}


def with_node(raw: dict[str, Any], name: str) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    out["node"]["name"] = name
    return out


# -- derivation ----------------------------------------------------------------------


def roles(site: str) -> dict[str, tuple[str, dict[str, str]]]:
    """Per group of ``site``: its role, and its peers' roles."""
    cfg = parse_config(with_node(three_groups(), site))
    out = {}
    for g in groups_of(cfg):
        d = group_config(cfg, g.name)
        out[g.name] = (d.role.value, {p.name: p.role.value for p in d.peers})
    return out


def test_every_site_runs_its_groups_with_its_role_and_the_groups_other_sites_as_peers():
    both = {"a": "primary", "b": "secondary", "w": "witness"}
    assert roles("a") == {
        "g1": ("primary", {"b": "secondary", "w": "witness"}),
        "g2": ("secondary", {"b": "primary", "w": "witness"}),
        "g3": ("witness", {"b": "primary", "w": "secondary"})}
    assert roles("b") == {
        "g1": ("secondary", {k: v for k, v in both.items() if k != "b"}),
        "g2": ("primary", {"a": "secondary", "w": "witness"}),
        "g3": ("primary", {"w": "secondary", "a": "witness"})}
    # w holds no data of g1 and g2, and is a data site of g3
    assert roles("w") == {
        "g1": ("witness", {"a": "primary", "b": "secondary"}),
        "g2": ("witness", {"b": "primary", "a": "secondary"}),
        "g3": ("secondary", {"b": "primary", "a": "witness"})}


def test_a_groups_config_has_the_groups_ports_data_dir_and_addresses():
    cfg = parse_config(three_groups())
    g1, g2 = group_config(cfg, "g1"), group_config(cfg, "g2")
    assert (g1.name, g1.group, g1.data_dir) == ("a", "g1", Path("/srv/nbdgw/groups/g1"))
    assert g2.data_dir == Path("/srv/nbdgw/groups/g2")
    assert (g1.peerlink.listen_host, g1.peerlink.listen_port) == ("0.0.0.0", 7810)
    assert g1.failover.heartbeat_port == 7811 and g2.failover.heartbeat_port == 7821
    assert g1.nbd.listen == (Listen("tcp", host="0.0.0.0", port=10811),)
    assert [(p.name, p.address, p.port, p.heartbeat_addresses) for p in g1.peers] == [
        ("b", "10.0.0.2", 7810, ("10.1.0.2",)), ("w", "10.0.0.3", 7810, ())]
    assert g1.metrics.listen is None and g2.metrics.listen == ("10.0.0.1", 9812)
    assert g1.service.address == "10.0.0.101/24" and g2.service.address is None
    assert [v.name for v in g1.volumes] == ["v1"] and [v.name for v in g2.volumes] == ["v2"]
    assert g1.peerlink.secret_file == Path("/etc/nbdgw/peer.secret")  # node-wide
    assert g1.groups == () and g1.sites == ()  # an ordinary node config
    # under etcd, each group is decided on a key of its own: its name
    assert (g1.coordinator.group, g2.coordinator.group) == ("g1", "g2")


def test_link_options_apply_to_the_link_to_their_site_and_sync_only_in_the_pair():
    a = parse_config(three_groups())
    g1 = group_config(a, "g1")
    assert {p.name: (p.mode, p.sync_timeout) for p in g1.peers} == {
        "b": (PeerMode.SYNC, 3.0), "w": (PeerMode.ASYNC, 5.0)}
    assert group_config(a, "g2").peer("b").rate_limit == 0  # type: ignore[union-attr]
    b = parse_config(with_node(three_groups(), "b"))
    assert group_config(b, "g2").peer("a").rate_limit == 20 << 20  # type: ignore[union-attr]
    assert group_config(b, "g1").peer("a").mode is PeerMode.SYNC  # type: ignore[union-attr]
    w = parse_config(with_node(three_groups(), "w"))  # a witness never ships: async
    assert {p.mode for p in group_config(w, "g1").peers} == {PeerMode.ASYNC}


def test_a_group_may_have_failover_timings_of_its_own_and_inherits_the_rest():
    """A branch behind a slow WAN link gets a longer timeout than a pair in one room;
    what a group does not set is the node's failover section."""
    raw = three_groups()
    raw["failover"] = {"interval": 0.4, "fence_margin": 1.5}
    raw["groups"][0]["failover"] = {"timeout": 6}
    raw["groups"][2].update(witness=None, failover={"auto": False})  # a manual pair
    for site in ("a", "b"):
        cfg = parse_config(with_node(raw, site))
        g1 = group_config(cfg, "g1")
        assert (g1.failover.timeout, g1.failover.interval, g1.failover.fence_margin,
                g1.failover.auto, g1.failover.heartbeat_port) == (6.0, 0.4, 1.5, True, 7811)
        if site == "b":  # g3's sites are b and w now
            g3 = group_config(cfg, "g3")
            assert g3.failover.auto is False and g3.failover.timeout == 2.0
        assert group_config(cfg, "g2").failover == cfg.failover.__class__(
            auto=True, heartbeat_port=7821, interval=0.4, timeout=2.0, fence_margin=1.5)


def test_iscsi_serves_the_groups_with_a_portal_port_each_on_their_primary():
    """The node's iscsi section (IQN, CHAP, initiators) with each group's own portal port,
    tgtd control socket and run dir; a group without ports.iscsi is NBD only, and a
    witness serves nothing."""
    raw = three_groups()
    raw["iscsi"] = {"enabled": True, "iqn": "iqn.2026-12.lab.nbdgw", "run_dir": "/run/x"}
    raw["groups"][0]["ports"]["iscsi"] = 3261
    raw["groups"][2]["ports"]["iscsi"] = 3263
    cfg = parse_config(with_node(raw, "b"))
    g1, g2, g3 = (group_config(cfg, g).iscsi for g in ("g1", "g2", "g3"))
    assert (g1.enabled, g1.portal, g1.control_port, g1.run_dir, g1.iqn) == (
        True, "0.0.0.0:3261", 3261, Path("/run/x/g1"), "iqn.2026-12.lab.nbdgw")
    assert not g2.enabled  # no ports.iscsi: NBD only
    assert g3.enabled and g3.portal == "0.0.0.0:3263" and g3.run_dir == Path("/run/x/g3")
    wit = parse_config(with_node(raw, "w"))
    assert not group_config(wit, "g1").iscsi.enabled  # w only witnesses g1


def test_the_witness_of_a_group_gets_no_volume_and_no_service():
    w = parse_config(with_node(three_groups(), "w"))
    g1 = group_config(w, "g1")
    assert g1.role is Role.WITNESS and g1.volumes == () and g1.service.address is None


def test_a_group_the_site_is_not_in_or_that_does_not_exist_is_named():
    cfg = parse_config(three_groups())
    with pytest.raises(ConfigError, match=r"^no group 'g9' in the config \(groups: g1, g2, "
                                          r"g3\)$"):
        group_config(cfg, "g9")
    raw = three_groups()
    raw["sites"].append({"name": "c", "address": "10.0.0.4"})
    raw["groups"][2] = {**raw["groups"][2], "witness": "c"}
    cfg = parse_config(raw)
    with pytest.raises(ConfigError, match=r"^site a is not in group g3 \(its sites: b, w, c\)$"):
        group_config(cfg, "g3")
    assert find_group(cfg, "g2").primary == "b"


def test_the_example_derives_for_every_site():
    raw = example()
    seen = {}
    for site in ("branch1", "branch2", "dc", "dr"):
        cfg = parse_config(with_node(raw, site))
        seen[site] = {g.name: group_config(cfg, g.name).role.value for g in groups_of(cfg)}
    assert seen == {"branch1": {"b1": "primary", "core": "witness"},
                    "branch2": {"b2": "primary"},
                    "dc": {"b1": "secondary", "b2": "secondary", "core": "primary"},
                    "dr": {"b1": "witness", "b2": "witness", "core": "secondary"}}


# -- refusals ------------------------------------------------------------------------


def refused_groups(change: Any) -> str:
    raw = three_groups()
    change(raw)
    return refused(raw)


@pytest.mark.parametrize(("where", "key", "value", "hint"), [
    ("node", "role", "primary", "each site's role is per group"),
    ("", "peers", [], "a group's sites are named in groups[]"),
    ("", "volumes", [], "groups[].volumes"),
    ("iscsi", "portal", "0.0.0.0:3260", "groups[].ports.iscsi"),
    ("iscsi", "control_port", 3261, "groups[].ports.iscsi"),
    ("failover", "heartbeat_port", 7790, "groups[].ports.heartbeat"),
    ("nbd", "listen", ["tcp:0.0.0.0:10809"], "groups[].ports.nbd"),
])
def test_a_key_of_todays_format_that_moved_into_groups_is_refused_by_name(where, key, value,
                                                                         hint):
    def change(raw: dict[str, Any]) -> None:
        (raw.setdefault(where, {}) if where else raw)[key] = value

    msg = refused_groups(change)
    name = f"{where}.{key}" if where else key
    assert msg.startswith(f"{name} is not used in a config with groups: ") and hint in msg


def test_an_unknown_key_in_a_group_is_refused_by_name():
    msg = refused_groups(lambda raw: raw["groups"][1].update(colour="red"))
    assert msg.startswith("unknown key 'colour' in groups[1] (known: dr, failover, name, "
                          "ports, primary, replicas, secondary, service, snapshots, "
                          "topology, volumes, witness)")
    msg = refused_groups(lambda raw: raw["groups"][0].update(failover={"heartbeat_port": 1}))
    assert msg.startswith("unknown key 'heartbeat_port' in groups[0].failover (known: auto, "
                          "fence_margin, interval, timeout)")
    msg = refused_groups(lambda raw: raw["groups"][0]["ports"].update(http=8080))
    assert msg.startswith("unknown key 'http' in groups[0].ports")
    msg = refused_groups(lambda raw: raw["sites"][0].update(role="primary"))
    assert msg.startswith("unknown key 'role' in sites[0]")


@pytest.mark.parametrize(("change", "message"), [
    (lambda r: r["groups"][1].update(name="g1"), "group g1 is listed twice in groups"),
    (lambda r: r["groups"][1].update(name="G_2"),
     "expected 1-32 of a-z, 0-9 and '-', starting with a letter or digit, for groups[1].name"),
    (lambda r: r["sites"].append({"name": "a", "address": "10.0.0.9"}),
     "site a is listed twice in sites"),
    (lambda r: r["sites"].append({"name": "x", "address": "10.0.0.9"}),
     "sites[3] (x) is in no group"),
    (lambda r: r["node"].update(name="zz"), "node.name zz is not one of sites[].name (a, b, w)"),
    (lambda r: r["groups"][0].update(secondary="q"),
     "groups[0].secondary: no site named 'q' in sites (sites: a, b, w)"),
    (lambda r: r["groups"][0].update(secondary="a"),
     "groups[0]: site a is both primary and secondary; a site has one role in a group"),
    (lambda r: r["groups"][0].update(witness=None),
     "groups[0] (g1): failover.auto needs three voters in every group with more than one "
     "site: a primary, a secondary and a dr or witness site (or failover.auto: false)"),
    (lambda r: r["groups"][0].update(dr="b", secondary=None, witness=None, replicas=[]),
     "groups[0] (g1): failover.auto needs three voters"),
    (lambda r: r["sites"].append({"name": "c", "address": "10.0.0.4"})
     or r["groups"][0].update(dr="c"),
     "groups[0] (g1): a witness (w) and a DR site (c) together: the third voter is one or "
     "the other, not both"),
    (lambda r: r["groups"][0].update(secondary=None, replicas=[]),
     "groups[0] (g1): a witness (w) without a secondary"),
    (lambda r: r["groups"][0].update(dr="w", witness=None) or r["groups"][1].update(dr="w"),
     "groups[1]: site w is both dr and witness; a site has one role in a group"),
    (lambda r: r["groups"][0]["replicas"].append({"site": "w"}),
     "groups[0].replicas[2].site: 'w' is not a data site of group g1 (its primary, "
     "secondary or dr)"),
    (lambda r: r["groups"][0]["replicas"].append({"site": "b"}),
     "site b is listed twice in groups[0].replicas"),
    (lambda r: r["groups"][1]["ports"].update(nbd=10811),
     "groups[1].ports.nbd 10811 is also groups[0].ports.nbd on site a: groups that share "
     "a site need ports of their own"),
    (lambda r: r["groups"][1]["ports"].update(metrics=7810),
     "groups[1].ports.metrics 7810 is also groups[0].ports.peerlink on site a"),
    (lambda r: r["groups"][0]["ports"].update(nbd=7811),
     "groups[0].ports.nbd and .heartbeat are both 7811: a group's ports differ"),
    (lambda r: r["groups"][1]["volumes"].append({"name": "v1", "size": "1M"}),
     "volume v1 is in groups g1 and g2, which share site a: volume names are unique on a "
     "site (clients name exports by volume)"),
    (lambda r: r["groups"][0]["volumes"].append({"name": "v1", "size": "1M"}),
     "volume v1 is listed twice in groups[0].volumes"),
    (lambda r: r["groups"][0]["ports"].pop("nbd"), "missing key 'nbd' in groups[0].ports"),
    (lambda r: r.update(iscsi={"enabled": True, "iqn": "iqn.2026-12.lab.nbdgw"}),
     "iscsi.enabled: no group has ports.iscsi (each group served over iSCSI has a portal "
     "port of its own)"),
    (lambda r: r["groups"][1]["ports"].update(iscsi=7820),
     "groups[1].ports.iscsi and .peerlink are both 7820"),
    (lambda r: r["groups"][1]["ports"].update(iscsi=40000),
     "expected integer between 1 and 32767 for groups[1].ports.iscsi"),
    (lambda r: r["groups"][1].update(failover={"timeout": 1.0}),
     "groups[1].failover.timeout (1.0 s) must be at least 3 x the group's failover.interval "
     "(0.5 s)"),
    (lambda r: r["groups"][1].update(failover={"auto": False}),
     "groups[1] (g2): a witness (w) votes only for automatic failover: remove it, or "
     "keep groups[1].failover.auto true"),
    (lambda r: r.pop("groups"), "sites and groups go together"),
    (lambda r: r.update(groups=[]), "expected at least one group in groups"),
    (lambda r: r["peerlink"].pop("secret_file"),
     "groups[0] (g1), site a: peerlink has neither secret_file nor tls"),
])
def test_a_bad_groups_config_is_refused_with_what_is_wrong(change, message):
    assert refused_groups(change).startswith(message)


def shared_port(raw: dict[str, Any], *groups: int) -> dict[str, Any]:
    """``raw`` with groups ``groups`` on the node's shared peerlink port (no
    ports.peerlink of their own), peerlink.listen on port 7700."""
    raw["peerlink"]["listen"] = "0.0.0.0:7700"
    for i in groups:
        del raw["groups"][i]["ports"]["peerlink"]
    return raw


def test_a_group_without_a_peerlink_port_uses_the_nodes_shared_port_with_its_route():
    cfg = parse_config(shared_port(three_groups(), 0, 2))
    g1, g2 = group_config(cfg, "g1"), group_config(cfg, "g2")
    # g1: its peers are reached at their shared port, opening with g1's route preamble;
    # its own peerlink takes its connections from the front (no listener of its own)
    assert [(p.name, p.port, p.route) for p in g1.peers] == [("b", 7700, "g1"),
                                                             ("w", 7700, "g1")]
    assert (g1.peerlink.front, g1.peerlink.listen_port) == (True, 7700)
    # g2 keeps its own port, as before: no route, no front
    assert [(p.name, p.port, p.route) for p in g2.peers] == [("b", 7820, None),
                                                             ("w", 7820, None)]
    assert (g2.peerlink.front, g2.peerlink.listen_port) == (False, 7820)
    # the front of site a routes g1 (a holds its data); g3 is shared too, but a is only
    # its witness; b routes g3
    assert front_routes(cfg) == {"g1": Path("/srv/nbdgw/groups/g1/run/peerlink-front.sock")}
    b = parse_config(with_node(shared_port(three_groups(), 0, 2), "b"))
    assert sorted(front_routes(b)) == ["g1", "g3"]


def test_without_a_shared_group_there_is_nothing_to_route():
    cfg = parse_config(three_groups())
    assert front_routes(cfg) == {}
    assert all(p.route is None for p in group_config(cfg, "g1").peers)


@pytest.mark.parametrize(("change", "message"), [
    (lambda r: r["peerlink"].update(secret_file=None, tls={
        "cert_file": "/c", "key_file": "/k", "ca_file": "/ca"}),
     "groups[0] (g1): on the node's shared peerlink port (no ports.peerlink of its own) a "
     "group needs peerlink.secret_file: the proofs bind each session to its group, so a "
     "connection routed to another group is refused"),
    (lambda r: r["groups"][1]["ports"].update(nbd=7700),
     "groups[1].ports.nbd 7700 is also peerlink.listen's port, the shared port of the "
     "groups without ports.peerlink on site a"),
])
def test_a_bad_shared_port_config_is_refused(change, message):
    raw = shared_port(three_groups(), 0)
    change(raw)
    assert refused(raw).startswith(message)


def test_sync_to_a_dr_site_is_refused():
    def change(raw: dict[str, Any]) -> None:
        raw["groups"][2] = {**raw["groups"][2], "secondary": "w", "witness": None, "dr": "a",
                            "replicas": [{"site": "a", "mode": "sync"}]}

    assert refused_groups(change).startswith(
        "mode: sync is allowed only between the two main-site nodes (primary and "
        "secondary): groups[2].replicas[0] (a) is the DR site of group g3")


def test_a_witness_site_may_hold_data_of_other_groups_and_volumes_may_repeat_across_sites():
    """w is g1's and g2's witness and g3's secondary; a volume name may repeat in groups
    that share no site."""
    raw = three_groups()
    raw["sites"].append({"name": "c", "address": "10.0.0.4"})
    raw["groups"].append({"name": "g4", "primary": "c", "ports": {
        "peerlink": 7810, "heartbeat": 7811, "nbd": 10811},  # g1's ports: no shared site
        "volumes": [{"name": "v1", "size": "1M"}]})
    cfg = parse_config(raw)
    assert [g.name for g in groups_of(cfg, "w")] == ["g1", "g2", "g3"]
    assert group_config(cfg, "g4", "c").peers == ()


# -- today's format ------------------------------------------------------------------


def test_a_config_of_todays_format_is_read_as_before(tmp_path: Path):
    """The example of today's format: no groups, data in data_dir itself, its role and
    peers as written."""
    text = LEGACY.read_text()
    active = "\n".join(line.split("#")[0] for line in text.splitlines())
    cfg = parse_config(yaml.safe_load(active))
    assert (cfg.groups, cfg.sites, cfg.group) == ((), (), None)
    assert cfg.data_dir == Path("/var/lib/nbdgw") and cfg.role is Role.PRIMARY
    assert [p.name for p in cfg.peers] == ["beta", "gamma"]
    assert groups_of(cfg) == ()


def test_the_groups_example_loads_from_its_file(tmp_path: Path):
    path = tmp_path / "groups.yaml"
    path.write_text(EXAMPLE.read_text())
    cfg = load_config(path)
    assert cfg.name == "dc" and [g.name for g in cfg.groups] == ["b1", "b2", "core"]
    assert [(g.name, g.ports.nbd) for g in groups_of(cfg)] == [
        ("b1", 10811), ("b2", 10812), ("core", 10821)]
