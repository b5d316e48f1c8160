"""deploy/etcd.yml (roles/etcd) without real hosts: the settings it renders for three
members (connection local, every path under a temporary root) start a real three-member
etcd cluster that `nbdgw fleet status` reads; the inventory checks stop the run with a
message naming the variable; the nbdgw role's coordinator endpoints default to the
members of the inventory group etcd."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.etcdclient import EtcdClient, EtcdUnavailable
from tests.conftest import free_port, run_nbdgw
from tests.unit.test_deploy import DEPLOY, run_playbook

MEMBERS = ("etcd-a", "etcd-b", "etcd-c")


def member_vars(root: Path, name: str, i: int) -> dict[str, Any]:
    return {"ansible_connection": "local", "ansible_python_interpreter": "/usr/bin/python3",
            "ansible_become": False, "etcd_address": f"127.0.0.{i + 1}",
            "etcd_client_port": free_port(), "etcd_peer_port": free_port(),
            "etcd_env_file": str(root / name / "etcd.env"),
            "etcd_data_dir": str(root / name / "data")}


def inventory(root: Path, hosts: dict[str, dict[str, Any]], **group: Any) -> Path:
    path = root / "inventory.yml"
    path.write_text(yaml.safe_dump({"etcd": {"hosts": hosts, "vars": {
        "etcd_install": False, "etcd_service": False, **group}}}))
    return path


def members(root: Path, n: int = 3) -> dict[str, dict[str, Any]]:
    for name in MEMBERS[:n]:
        (root / name).mkdir(parents=True, exist_ok=True)
    return {name: member_vars(root, name, i) for i, name in enumerate(MEMBERS[:n])}


def env_of(path: Path) -> dict[str, str]:
    """The KEY="value" lines of an environment file, as systemd reads them."""
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = shlex.split(value)[0]
    return out


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[dict[str, dict[str, Any]], list[str]]]:
    """The role's settings for three members, each started as etcd.service would."""
    hosts = members(tmp_path)
    run = run_playbook("etcd.yml", inventory(tmp_path, hosts), timeout=300)
    assert run.rc == 0, run
    procs = []
    try:
        for name in MEMBERS:
            env = env_of(tmp_path / name / "etcd.env")
            log = (tmp_path / name / "etcd.log").open("wb")
            procs.append(subprocess.Popen(["etcd"], env={"PATH": "/usr/bin:/bin", **env},
                                          stdout=log, stderr=subprocess.STDOUT))
        yield hosts, [f"http://{h['etcd_address']}:{h['etcd_client_port']}"
                      for h in hosts.values()]
    finally:
        for p in procs:
            p.terminate()
            p.wait(30)


@pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd-server is not installed")
def test_the_rendered_settings_start_a_three_member_cluster(
        cluster: tuple[dict[str, dict[str, Any]], list[str]], tmp_path: Path) -> None:
    hosts, urls = cluster
    env = env_of(tmp_path / "etcd-b" / "etcd.env")
    b = hosts["etcd-b"]
    assert env["ETCD_NAME"] == "etcd-b"
    assert env["ETCD_LISTEN_CLIENT_URLS"] == f"http://127.0.0.2:{b['etcd_client_port']}"
    assert env["ETCD_INITIAL_CLUSTER"] == ",".join(
        f"{n}=http://{h['etcd_address']}:{h['etcd_peer_port']}" for n, h in hosts.items())
    assert "ETCD_CERT_FILE" not in env
    client = EtcdClient(urls)
    deadline = time.monotonic() + 60
    while True:  # bounded: a quorum forms within seconds
        try:
            listed = client.members()
            if len(listed) == 3 and all(m.get("name") for m in listed):
                break
        except EtcdUnavailable:
            pass
        assert time.monotonic() < deadline, (tmp_path / "etcd-a" / "etcd.log").read_text()
        time.sleep(0.2)
    assert sorted(m["name"] for m in listed) == list(MEMBERS)
    cfg = tmp_path / "nbdgw.yaml"
    cfg.write_text(yaml.safe_dump({"version": 1, "coordinator": {"kind": "etcd",
                                                                 "endpoints": urls}}))
    report = json.loads(run_nbdgw("-c", str(cfg), "fleet", "status", "--json").stdout)
    assert report["groups"] == [] and report["endpoints"] == urls


def test_tls_settings(tmp_path: Path) -> None:
    run = run_playbook("etcd.yml", inventory(
        tmp_path, members(tmp_path), etcd_tls=True, etcd_ca_file="/etc/etcd/ca.pem",
        etcd_cert_file="/etc/etcd/m.pem", etcd_key_file="/etc/etcd/m-key.pem"))
    assert run.rc == 0, run
    env = env_of(tmp_path / "etcd-a" / "etcd.env")
    assert env["ETCD_LISTEN_PEER_URLS"].startswith("https://127.0.0.1:")
    assert env["ETCD_INITIAL_CLUSTER"].count("=https://") == 3
    assert (env["ETCD_CLIENT_CERT_AUTH"], env["ETCD_PEER_CLIENT_CERT_AUTH"]) == ("true", "true")
    assert env["ETCD_PEER_TRUSTED_CA_FILE"] == env["ETCD_TRUSTED_CA_FILE"] == "/etc/etcd/ca.pem"


CASES = {
    "two members": (2, {}, "the inventory group etcd has 2 host(s): expected 3 or 5 (an odd "
                           "number: a majority of them must answer for nbdgw to change a "
                           "primary; 1 member is a single point of failure)"),
    "no address": (3, {"etcd-b": {"etcd_address": "etcd-b.example"}},
                   'etcd_address of etcd-b is "etcd-b.example": expected the member\'s IPv4 '
                   "address"),
    "tls without files": (3, {"*": {"etcd_tls": True, "etcd_ca_file": "/ca.pem"}},
                          "etcd_tls is true: etcd_ca_file, etcd_cert_file and etcd_key_file "
                          "must name the files on the member (etcd_cert_file, etcd_key_file "
                          "not set)"),
    "timers": (3, {"*": {"etcd_election_timeout": 400}},
               "etcd_election_timeout (400 ms) must be at least 5 x etcd_heartbeat_interval "
               "(100 ms)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_validation_message(tmp_path: Path, case: str) -> None:
    n, changes, msg = CASES[case]
    hosts = members(tmp_path, n)
    for name, hv in hosts.items():
        hv.update(changes.get("*", {}), **changes.get(name, {}))
    run = run_playbook("etcd.yml", inventory(tmp_path, hosts))
    assert run.rc != 0, run
    assert set(run.failures()) == {msg}, run
    assert not any((tmp_path / h / "etcd.env").exists() for h in hosts)  # nothing written


def test_nbdgw_endpoints_default_to_the_etcd_members(tmp_path: Path) -> None:
    """The nbdgw role's nbdgw_coordinator_endpoints, with the example etcd inventory:
    http, and https once the nodes have a CA file for etcd."""
    play = tmp_path / "endpoints.yml"
    play.write_text(yaml.safe_dump([{
        "name": "Show the endpoints", "hosts": "etcd1", "gather_facts": False,
        "tasks": [{"ansible.builtin.include_vars": str(DEPLOY / "roles/nbdgw" / f)}
                  for f in ("defaults/main.yml", "vars/main.yml")]
        + [{"ansible.builtin.debug": {"msg": "{{ nbdgw_coordinator_endpoints | to_json }}"}}]}]))
    inv = DEPLOY / "examples/etcd/inventory.yml"
    for extra, scheme in ((), "http"), (("-e", "nbdgw_coordinator_ca_file=/ca.pem"), "https"):
        run = run_playbook(str(play), inv, "-e", "ansible_connection=local", *extra)
        assert run.rc == 0, run
        assert [json.loads(m) for m in run.messages() if m.startswith("[")] == [
            [f"{scheme}://192.0.2.2{i}:2379" for i in (1, 2, 3)]]
