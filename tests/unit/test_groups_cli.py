"""The command line on a config with groups (issue 22): --group (NBDGW_GROUP) makes any
command act on one group's own config and data_dir; a command that needs a group and got
none names the node's groups; `status` without --group shows every group; volume names
are unique on a site; a config of today's format refuses --group."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from gateway.cli import cli
from nbdgw_common import logs
from tests.statusschema import SCHEMA


@pytest.fixture(autouse=True)
def _structlog_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI configures structlog to cache loggers on first use: a blockstore logger
    first used inside these commands (volume create, status) would keep that
    configuration and miss later tests' captures (tests/unit/test_space.py)."""
    monkeypatch.setattr(logs, "configure", lambda *_a, **_k: None)


def groups_config(tmp_path: Path, node: str = "a") -> Path:
    ports = lambda n: {"peerlink": 7800 + 10 * n, "heartbeat": 7801 + 10 * n,  # noqa: E731
                       "nbd": 10810 + n}
    raw: dict[str, Any] = {
        "version": 1, "node": {"name": node, "data_dir": str(tmp_path / "data")},
        "peerlink": {"insecure": True}, "failover": {"auto": False},
        "sites": [{"name": "a", "address": "10.0.0.1"}, {"name": "b", "address": "10.0.0.2"}],
        "groups": [{"name": "g1", "primary": "a", "secondary": "b", "ports": ports(1)},
                   {"name": "g2", "primary": "b", "secondary": "a", "ports": ports(2)}]}
    path = tmp_path / "nbdgw.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def nbdgw(path: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, ["-c", str(path), *args], env=env)


def test_a_command_without_a_group_names_the_groups_of_the_node(tmp_path: Path):
    r = nbdgw(groups_config(tmp_path), "volume", "create", "v1", "--size", "1M")
    assert r.exit_code == 1
    assert r.output.strip() == (
        "nbdgw: error: node a's config has groups: name one with --group GROUP (or "
        "NBDGW_GROUP=GROUP); this node is in g1 (primary), g2 (secondary)")


def test_volume_create_with_a_group_makes_it_in_the_groups_data_dir(tmp_path: Path):
    path = groups_config(tmp_path)
    r = nbdgw(path, "--group", "g1", "volume", "create", "v1", "--size", "1M")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "data" / "groups" / "g1" / "volumes" / "v1").is_dir()
    r = nbdgw(path, "volume", "create", "w2", "--size", "1M", "--replica",
              env={"NBDGW_GROUP": "g2"})
    assert r.exit_code == 0, r.output
    assert (tmp_path / "data" / "groups" / "g2" / "volumes" / "w2").is_dir()
    r = nbdgw(path, "--group", "g1", "volume", "list", "--json")
    assert [v["name"] for v in json.loads(r.output)] == ["v1"]
    assert not (tmp_path / "data" / "volumes").exists()  # nothing in data_dir itself


def test_a_volume_name_is_used_by_one_group_of_a_site(tmp_path: Path):
    path = groups_config(tmp_path)
    assert nbdgw(path, "--group", "g1", "volume", "create", "v1", "--size", "1M"
                 ).exit_code == 0
    r = nbdgw(path, "--group", "g2", "volume", "create", "v1", "--size", "1M", "--replica")
    assert r.exit_code == 1
    assert r.output.strip() == (
        "nbdgw: error: volume v1 belongs to group g1 on this site (a): volume names are "
        "unique on a site (clients name exports by volume)")
    assert not (tmp_path / "data" / "groups" / "g2" / "volumes" / "v1").exists()


def test_an_unknown_group_is_named_with_the_known_ones(tmp_path: Path):
    r = nbdgw(groups_config(tmp_path), "--group", "g9", "volume", "list")
    assert r.exit_code == 1
    assert r.output.strip() == "nbdgw: error: no group 'g9' in the config (groups: g1, g2)"


def test_a_config_of_todays_format_refuses_group(tmp_path: Path):
    path = tmp_path / "nbdgw.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "node": {"data_dir": str(tmp_path)}}))
    r = nbdgw(path, "--group", "g1", "volume", "list")
    assert r.exit_code == 1
    assert r.output.strip() == f"nbdgw: error: --group g1: the config {path} has no groups"


def test_status_without_a_group_shows_every_group_of_the_node(tmp_path: Path):
    path = groups_config(tmp_path)
    assert nbdgw(path, "--group", "g1", "volume", "create", "v1", "--size", "1M"
                 ).exit_code == 0
    r = nbdgw(path, "status", "--json")
    assert r.exit_code == 0, r.output
    reports = json.loads(r.output)
    assert [x["group"] for x in reports] == ["g1", "g2"]
    assert set(reports[0]["status"]) == set(SCHEMA)  # a report as `--group G status`'s
    assert [v["name"] for v in reports[0]["status"]["volumes"]] == ["v1"]
    assert reports[1] == {"group": "g2", "error": f"data directory {tmp_path}/data/groups/"
                                                  "g2 does not exist"}
    text = nbdgw(path, "status").output
    assert text.startswith("group g1:\n") and "\ngroup g2:\n" in text, text
    one = json.loads(nbdgw(path, "--group", "g1", "status", "--json").output)
    assert [v["name"] for v in one["volumes"]] == ["v1"]  # one group: as today


def test_config_check_on_groups_names_each_group_of_the_node(tmp_path: Path):
    r = nbdgw(groups_config(tmp_path, node="b"), "config", "check")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == [
        f"config ok: node b, data_dir {tmp_path / 'data'}, 2 group(s) of 2 site(s); this "
        "node is in g1 (secondary), g2 (primary)",
        f"group g1: role secondary, data_dir {tmp_path / 'data/groups/g1'}, ports peerlink "
        "7810, heartbeat 7811, nbd 10811; sends to nobody; 0 volume(s) in the config",
        f"group g2: role primary, data_dir {tmp_path / 'data/groups/g2'}, ports peerlink "
        "7820, heartbeat 7821, nbd 10812; sends to a (async); 0 volume(s) in the config"]


def test_config_check_names_the_shared_port_of_a_group_without_its_own(tmp_path: Path):
    path = groups_config(tmp_path, node="b")
    raw = yaml.safe_load(path.read_text())
    del raw["groups"][0]["ports"]["peerlink"]
    secret = tmp_path / "peer.secret"
    secret.write_bytes(b"s" * 32)
    secret.chmod(0o600)
    raw["peerlink"] = {"secret_file": str(secret), "listen": "0.0.0.0:7700"}
    path.write_text(yaml.safe_dump(raw))
    r = nbdgw(path, "config", "check")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[1:] == [
        f"group g1: role secondary, data_dir {tmp_path / 'data/groups/g1'}, ports peerlink "
        "7700 (shared), heartbeat 7811, nbd 10811; sends to nobody; 0 volume(s) in the config",
        f"group g2: role primary, data_dir {tmp_path / 'data/groups/g2'}, ports peerlink "
        "7820, heartbeat 7821, nbd 10812; sends to a (async); 0 volume(s) in the config"]


def test_the_groups_parent_runs_one_daemon_per_group_of_the_node(tmp_path: Path):
    """`nbdgw daemon` on a config with groups: a child `nbdgw --group G daemon` per group
    of the node (`witness` where it is the group's witness), none for other groups."""
    from gateway.config import load_config
    from gateway.daemon import GroupsDaemon

    path = groups_config(tmp_path, node="b")
    raw = yaml.safe_load(path.read_text())
    raw["sites"].append({"name": "c", "address": "10.0.0.3"})
    raw["groups"].append({"name": "g3", "primary": "c", "secondary": "a", "witness": "b",
                          "ports": {"peerlink": 7830, "heartbeat": 7831, "nbd": 10813}})
    raw["failover"] = {"auto": True}
    raw["groups"][0]["witness"] = raw["groups"][1]["witness"] = "c"
    raw["peerlink"] = {"secret_file": "/etc/nbdgw/peer.secret"}
    path.write_text(yaml.safe_dump(raw))
    parent = GroupsDaemon(load_config(path), path, "json")
    assert sorted(parent.children) == ["group g1", "group g2", "group g3"]
    assert {g: p.argv[3:] for g, p in parent.procs.items()} == {
        g: ["-c", str(path), "--group", g, "--log-format", "json", verb]
        for g, verb in (("g1", "daemon"), ("g2", "daemon"), ("g3", "witness"))}
    assert all(p.env is not None and p.env["NBDGW_DIE_WITH_PARENT"] == "1"
               and "NBDGW_GROUP" not in p.env for p in parent.procs.values())


def test_health_without_a_group_checks_the_node_once_with_every_groups_volumes(
        tmp_path: Path):
    """A monitoring check runs `nbdgw health` on the host: with groups it must not need a
    group (it failed with 'name one with --group'), and it sees the volumes of every
    group, each named with its group; the file system is checked once."""
    path = groups_config(tmp_path)
    assert nbdgw(path, "--group", "g1", "volume", "create", "v1", "--size", "1M"
                 ).exit_code == 0
    assert nbdgw(path, "--group", "g2", "volume", "create", "w2", "--size", "2M",
                 "--replica").exit_code == 0
    r = nbdgw(path, "health", "--json")
    assert r.exit_code in (0, 1), r.output  # ok, or a warning about this machine's disks
    report = json.loads(r.output)
    assert [(v["name"], v["size"]) for v in report["volumes"]] == [
        ("g1/v1", 1 << 20), ("g2/w2", 2 << 20)]
    assert report["filesystem"]["size_bytes"] > 0
    one = json.loads(nbdgw(path, "--group", "g2", "health", "--json").output)
    assert [v["name"] for v in one["volumes"]] == ["w2"]  # one group: as before
