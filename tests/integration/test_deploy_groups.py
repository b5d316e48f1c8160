"""A real run of deploy/site.yml and deploy/add-branch.yml with volume groups against
this machine.

Local inventory hosts, every path of the role under a temporary root (as
test_deploy_site.py): site.yml deploys main, dc and dr with groups b1 (main -> dc, dr
witness) and core (dc -> dr, main witness); then branch br2 and its group b2 (br2 -> dc,
dr witness) are written into the inventory and add-branch.yml adds them; b2 has no
peerlink port of its own, it replicates through each site's shared port
(nbdgw_peerlink_listen, set from the first run on). systemd does not
run here, so the data centre and the DR site are told "systemd runs" and get stand-ins
first on PATH: `systemctl` records every call and answers only `reload nbdgw.service`
(the parent then starts the new group and keeps the others: nothing may be restarted).
The new branch is deployed with nbdgw_service_start: false, as site.yml deploys a host
without systemd.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_deploy import (
    DEPLOY,
    VENV_BIN,
    Run,
    ansible_env,
    groups_vars,
    write_inventory,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="the role makes its files root's"),
    pytest.mark.skipif(Path("/run/systemd/system").exists(),
                       reason="systemd runs here: the test never starts units"),
    # site.yml on three hosts (wheels and three venvs), then add-branch.yml: 2-4 min here.
    pytest.mark.timeout(900),
    pytest.mark.slow,
]

FAKES = {
    "systemctl": ('#!/bin/sh\necho "systemctl $*" >> "$NBDGW_TEST_CALLS"\n'
                  '[ "$*" = "reload nbdgw.service" ] || exit 99\n'),
}


SHARED = {"nbdgw_peerlink_listen": "0.0.0.0:7789"}


def with_b2() -> dict[str, Any]:
    """groups_vars with b2 on the shared peerlink port."""
    group = groups_vars() | SHARED
    for g in group["nbdgw_groups"]:
        if g["name"] == "b2":
            del g["ports"]["peerlink"]
    return group


def without_b2() -> dict[str, Any]:
    group = groups_vars() | SHARED
    group["nbdgw_sites"] = [s for s in group["nbdgw_sites"] if s["name"] != "br2"]
    group["nbdgw_groups"] = [g for g in group["nbdgw_groups"] if g["name"] != "b2"]
    return group


def run(root: Path, playbook: str, inventory: Path, *args: str) -> Run:
    bin_dir = root / "bin"
    env = ansible_env()
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    env["NBDGW_TEST_CALLS"] = str(root / "systemctl.calls")
    proc = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", str(inventory),
                           playbook, *args], cwd=DEPLOY, capture_output=True, text=True,
                          timeout=900, env=env, check=False)
    return Run(proc)


@pytest.fixture(scope="module")
def added(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Run, Run]:
    root = tmp_path_factory.mktemp("groups")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    base = without_b2() | {"nbdgw_firewall": "none", "nbdgw_service_start": False}
    first = run(root, "site.yml", write_inventory(root, ("main", "dc", "dr"), base))
    assert first.rc == 0, first
    inv = write_inventory(root, ("main", "dc", "dr", "br2"),
                          with_b2() | {"nbdgw_firewall": "none"})
    data = yaml.safe_load(inv.read_text())
    for host in ("main", "br2"):  # only the running sites dc and dr start anything
        data["nbdgw"]["hosts"][host]["nbdgw_service_start"] = False
    inv.write_text(yaml.safe_dump(data, sort_keys=False))
    # "systemd runs" (the stand-ins; an extra var, as the role's vars outrank inventories).
    args = ("-e", "nbdgw_add_group=b2", "-e", f"__nbdgw_systemd_dir={root}")
    add = run(root, "add-branch.yml", inv, *args)
    assert add.rc == 0, add
    again = run(root, "add-branch.yml", inv, *args)
    assert again.rc == 0, again
    return root, add, again


def test_the_running_sites_get_the_group_without_a_restart(
        added: tuple[Path, Run, Run]) -> None:
    root, add, _ = added
    # One reload on each running site (the parent starts b2 and keeps b1 and core), no
    # restart, and none on the second run (the config did not change).
    calls = (root / "systemctl.calls").read_text().splitlines()
    assert len(calls) == 2 and all(c.startswith("systemctl reload nbdgw.service")
                                   for c in calls), calls
    for host in ("dc", "dr"):
        cfg = yaml.safe_load((root / host / "config_dir" / "nbdgw.yaml").read_text())
        assert [g["name"] for g in cfg["groups"]] == ["b1", "b2", "core"]
        assert cfg["peerlink"]["listen"] == "0.0.0.0:7789"  # b2's: the shared port
        assert "peerlink" not in cfg["groups"][1]["ports"]
    # dc holds b2's replica; dr only witnesses b2 (no data of it).
    data = root / "dc" / "data_dir" / "groups"
    assert (data / "b2" / "volumes" / "v2").is_dir()
    assert not (root / "dr" / "data_dir" / "groups" / "b2").exists()
    # The new branch, deployed whole: its volume, a primary one.
    assert (root / "br2" / "data_dir" / "groups" / "b2" / "volumes" / "v2").is_dir()
    assert add.stats["main"]["changed"] == 0, add  # not in b2: untouched


def test_a_second_run_changes_nothing(added: tuple[Path, Run, Run]) -> None:
    _, _, again = added
    assert again.changed() == [], again
