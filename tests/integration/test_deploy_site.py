"""A real run of deploy/site.yml against this machine.

Inventory hosts for the sites, all `connection: local`, each with every path of the role
(config, data, venv, units, sysctl.d) under its own temporary root, so this machine's
/etc is never touched. The run builds the nbdgw wheel, makes the venvs from
/usr/bin/python3, renders and checks the node configs, creates the volumes (replicas on
dc and dr), and installs the units; systemd does not run here, so the role says so and
does not start them. The test then starts the primary exactly as its unit would
(ExecStartPre, then ExecStart), in a network namespace of its own, and writes and reads a
volume over NBD with libnbd. A second run must change nothing.

Two variants: `primary` (the main site alone, deployed with nbdgw_failover_auto: false
since a lone primary fences itself; CI's bounded run, about a minute and a half) and
`three-sites` (`-m slow`: main, dc and dr, then the three deployed daemons replicate
and the replicas are compared bit for bit; two to three and a half minutes here).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.unit.test_deploy import ROOT, SITES, Run, run_playbook, site_vars, write_inventory

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespace)"),
    # Two site.yml runs on three hosts take 60-130 s on the 2-core machine (the first
    # builds the wheels and three venvs); the module fixture's time lands on one test.
    pytest.mark.timeout(600),
]

SYSTEMD_RUNS = Path("/run/systemd/system").exists()


@dataclass
class Deployed:
    hosts: tuple[str, ...]
    root: Path
    inventory: Path
    first: Run
    second: Run
    first_s: float
    second_s: float

    def prefix(self, host: str) -> Path:
        return self.root / host

    def config(self, host: str) -> Path:
        return self.prefix(host) / "config_dir" / "nbdgw.yaml"

    def nbdgw(self, host: str) -> str:
        return str(self.prefix(host) / "venv_dir" / "bin" / "nbdgw")

    def unit(self, host: str, name: str = "nbdgw.service") -> str:
        return (self.prefix(host) / "unit_dir" / name).read_text()


@pytest.fixture(scope="module", params=[
    # CI's bounded variant: the primary alone (its peers are in its config, not deployed).
    pytest.param(("main",), id="primary"),
    # All three sites, and replication between the deployed daemons: over 2 minutes here.
    pytest.param(SITES, id="three-sites", marks=pytest.mark.slow),
])
def deployed(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> Deployed:
    hosts: tuple[str, ...] = request.param
    root = tmp_path_factory.mktemp("deploy")
    group = site_vars()
    if SYSTEMD_RUNS:  # a developer machine with systemd: never start units from a test
        group["nbdgw_service_start"] = False
    if hosts != SITES:
        # The primary alone has no majority: with automatic failover it fences itself
        # (as it must). Deployed without it, it serves whatever the peers do.
        group["nbdgw_failover_auto"] = False
    inv = write_inventory(root, hosts, group)
    t0 = time.monotonic()
    first = run_playbook("site.yml", inv, timeout=900)
    t1 = time.monotonic()
    assert first.rc == 0, first
    second = run_playbook("site.yml", inv, timeout=600)
    t2 = time.monotonic()
    assert second.rc == 0, second
    print(f"\nsite.yml, local hosts {', '.join(hosts)}: first run {t1 - t0:.1f} s, "
          f"second {t2 - t1:.1f} s")
    return Deployed(hosts, root, inv, first, second, t1 - t0, t2 - t1)


def test_first_run_changes_every_host(deployed: Deployed) -> None:
    for host in deployed.hosts:
        assert deployed.first.stats[host]["failed"] == 0
        assert deployed.first.stats[host]["changed"] > 0, deployed.first


def test_second_run_changes_nothing(deployed: Deployed) -> None:
    assert deployed.second.changed() == [], deployed.second
    for host in deployed.hosts:
        assert deployed.second.stats[host]["changed"] == 0, deployed.second
        assert deployed.second.stats[host]["failed"] == 0


def test_the_role_says_why_units_are_not_started(deployed: Deployed) -> None:
    if SYSTEMD_RUNS:
        pytest.skip("systemd runs here; the test deploys with nbdgw_service_start: false")
    for host in deployed.hosts:
        want = (f"systemd is not running on {host} (/run/systemd/system is missing): the "
                f"units are installed in {deployed.prefix(host) / 'unit_dir'} but not enabled "
                f"or started; run `{deployed.nbdgw(host)} -c {deployed.config(host)} daemon` "
                "under your own supervisor")
        assert want in deployed.first.messages(), deployed.first


def test_configs_render_each_site_and_pass_config_check(deployed: Deployed) -> None:
    roles = {"main": "primary", "dc": "secondary", "dr": "dr"}
    for host in deployed.hosts:
        cfg = yaml.safe_load(deployed.config(host).read_text())
        assert cfg["node"] == {"name": host, "role": roles[host],
                               "data_dir": str(deployed.prefix(host) / "data_dir")}
        assert [p["name"] for p in cfg["peers"]] == [s for s in SITES if s != host]
        assert cfg["service"] == {"address": "192.0.2.10/24", "interface": "lo"}
        assert cfg["peerlink"]["secret_file"] == str(
            deployed.prefix(host) / "config_dir" / "peer.secret")
        p = subprocess.run([deployed.nbdgw(host), "-c", str(deployed.config(host)), "config",
                            "check"], capture_output=True, text=True, timeout=60, check=False)
        assert p.returncode == 0, p.stderr
        assert p.stdout.startswith(f"config ok: node {host}, ")
    dc = yaml.safe_load(deployed.config("main").read_text())["peers"][0]
    assert dc == {"name": "dc", "role": "secondary", "address": "127.0.0.2", "mode": "sync",
                  "sync_timeout": 5}


def test_secrets_are_root_only_files(deployed: Deployed) -> None:
    for host in deployed.hosts:
        secret = deployed.prefix(host) / "config_dir" / "peer.secret"
        assert secret.read_text() == site_vars()["nbdgw_peer_secret"]
        assert secret.stat().st_mode & 0o777 == 0o600
        assert "a-real-secret" not in deployed.config(host).read_text()
    assert "a-real-secret" not in deployed.first.proc.stdout + deployed.second.proc.stdout


def test_volumes_are_created_replicas_on_the_replica_sites(deployed: Deployed) -> None:
    for host in deployed.hosts:
        p = subprocess.run([deployed.nbdgw(host), "-c", str(deployed.config(host)), "volume",
                            "list", "--json"], capture_output=True, text=True, timeout=60,
                           check=True)
        rows = {r["name"]: r for r in json.loads(p.stdout)}
        assert sorted(rows) == ["v1", "v2"]
        assert rows["v1"]["size"] == 64 << 20
        assert rows["v2"]["size"] == 16 << 20
        want = "primary" if host == "main" else "replica"
        assert {r["role"] for r in rows.values()} == {want}, rows


def test_units_sysctls_and_firewall_land(deployed: Deployed) -> None:
    for host in deployed.hosts:
        unit = deployed.unit(host)
        nbdgw, config = deployed.nbdgw(host), deployed.config(host)
        assert f"ExecStart={nbdgw} -c {config} --log-format json daemon\n" in unit
        assert f"ExecStartPre={nbdgw} -c {config} config check\n" in unit
        assert "Restart=on-failure\n" in unit
        assert "Requires=nbdgw-firewall.service\n" in unit
        assert "After=network-online.target nbdgw-firewall.service\n" in unit
        fw = deployed.unit(host, "nbdgw-firewall.service")
        nft = deployed.prefix(host) / "config_dir" / "nftables.nft"
        assert f"ExecStart=/usr/sbin/nft --file {nft}\n" in fw
        rules = nft.read_text()
        peers = ", ".join(f"127.0.0.{i + 1}" for i, s in enumerate(SITES) if s != host)
        assert f"elements = {{ {peers} }}" in rules
        assert "tcp dport 7789 ip saddr != @peers4 drop" in rules
        assert "tcp dport { 10809 } ip saddr != @nbd_clients4 drop" in rules
        check = subprocess.run(["nft", "--check", "--file", str(nft)], capture_output=True,
                               text=True, timeout=30, check=False)
        assert check.returncode == 0, check.stderr
        sysctl = (deployed.prefix(host) / "sysctl_dir" / "60-nbdgw.conf").read_text()
        assert "net.ipv4.ip_nonlocal_bind = 1\n" in sysctl
        assert "net.ipv4.conf.all.arp_notify = 1\n" in sysctl


def test_the_venv_is_built_from_debian_python_with_system_site_packages(
        deployed: Deployed) -> None:
    venv = deployed.prefix("main") / "venv_dir"
    cfg = (venv / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = true" in cfg
    assert "home = /usr/bin" in cfg
    p = subprocess.run([str(venv / "bin" / "python"), "-c",
                        "import nbd, gateway, nbd_plugin, peerlink; print(gateway.__file__)"],
                       capture_output=True, text=True, timeout=60, check=False,
                       cwd="/")  # not the work tree: its packages would shadow the venv's
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(str(venv / "lib")), "nbdgw must come from the deployed venv"


# --- the primary, started as its unit starts it --------------------------------------------

def unit_commands(unit: str) -> tuple[list[str], list[str]]:
    lines = dict(line.split("=", 1) for line in unit.splitlines()
                 if line.startswith(("ExecStartPre=", "ExecStart=")))
    return shlex.split(lines["ExecStartPre"]), shlex.split(lines["ExecStart"])


@contextlib.contextmanager
def netns() -> Iterator[str]:
    """A network namespace of our own: the node may add its service address and dial its
    peers there without touching this machine's network."""
    name = f"nbdgw-deploy-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
                       check=True, timeout=30)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


@contextlib.contextmanager
def started(argv: list[str], ns: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        # `ip netns exec` execs the command: the pid is nbdgw's own.
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=out, stderr=out,
                                cwd="/")  # as systemd starts it
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def connect(sock: Path, export: str, proc: subprocess.Popen[bytes], log: Path,
            timeout: float = 60) -> object:
    import nbd

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"the node exited ({proc.returncode}):\n{log.read_text()}")
        if sock.exists():
            h = nbd.NBD()
            h.set_export_name(export)
            try:
                h.connect_unix(str(sock))
                return h
            except nbd.Error:
                h.close()
        if time.monotonic() > deadline:
            raise AssertionError(f"no NBD answer on {sock} in {timeout:g} s:\n{log.read_text()}")
        time.sleep(0.2)


@contextlib.contextmanager
def sites_running(deployed: Deployed, ns: str, logs: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Every deployed site started as its unit starts it (ExecStartPre, then ExecStart),
    replicas first, in the network namespace ``ns``; yields the primary's process."""
    with contextlib.ExitStack() as stack:
        procs = {}
        for host in ("dr", "dc", "main"):
            if host not in deployed.hosts:
                continue
            pre, start = unit_commands(deployed.unit(host))
            check = subprocess.run(pre, capture_output=True, text=True, timeout=60,
                                   check=False, cwd="/")
            assert check.returncode == 0, check.stderr
            procs[host] = stack.enter_context(started(start, ns, logs / f"{host}.log"))
        yield procs["main"]
    for host, proc in procs.items():
        assert proc.returncode == 0, (logs / f"{host}.log").read_text()


def test_primary_serves_its_volume_from_the_deployed_config(deployed: Deployed,
                                                            tmp_path: Path) -> None:
    """Written and read over NBD; stopped as systemd stops it (SIGTERM) and started again,
    the data is there."""
    sock = deployed.prefix("main") / "run" / "nbd.sock"
    sock.parent.mkdir(parents=True, exist_ok=True)  # the unit's RuntimeDirectory
    log = tmp_path / "main.log"
    block = bytes(range(256)) * 16 * 64  # 256 KiB
    with netns() as ns:
        with sites_running(deployed, ns, tmp_path) as proc:
            h = connect(sock, "v1", proc, log)
            assert h.get_size() == 64 << 20  # type: ignore[attr-defined]
            h.pwrite(block, 1 << 20)  # type: ignore[attr-defined]
            h.flush()  # type: ignore[attr-defined]
            assert h.pread(len(block), 1 << 20) == block  # type: ignore[attr-defined]
            h.shutdown()  # type: ignore[attr-defined]
        with sites_running(deployed, ns, tmp_path) as proc:
            h = connect(sock, "v1", proc, log)
            assert h.pread(len(block), 1 << 20) == block  # type: ignore[attr-defined]
            assert h.pread(4096, 0) == bytes(4096)  # type: ignore[attr-defined]
            h.shutdown()  # type: ignore[attr-defined]


# --- the operations playbooks against the deployed sites -----------------------------------

def test_promote_dr_is_refused_for_an_inconsistent_replica(deployed: Deployed) -> None:
    """Confirmed, promote-dr.yml reaches the DR host. Its replicas never synced, so either
    this nbdgw has no `promote` yet (the playbook says so) or the product's own check
    refuses the Inconsistent replica; either way nothing changes anywhere."""
    run = run_playbook("promote-dr.yml", deployed.inventory, "-e",
                       "nbdgw_promote_dr_confirm=dr", timeout=300)
    assert run.rc != 0, run
    no_command = (f"`{deployed.nbdgw('dr')} promote --help` failed on dr: this nbdgw has no "
                  "`promote` command (it predates DR promotion) or is not installed; upgrade "
                  "it first; nothing was changed")
    if "dr" not in deployed.hosts:
        assert run.failures() == [
            "the DR site dr is not among the hosts of this play (main): nothing was "
            "promoted"], run
    else:
        fails = run.failures("dr")
        assert fails in ([no_command], ["non-zero return code"]), run
        assert run.failures("main") == run.failures("dc") == []
    assert run.changed() == [], run


def test_switchover_needs_every_site_running(deployed: Deployed) -> None:
    if SYSTEMD_RUNS:
        pytest.skip("systemd runs here; the deployed units were not started")
    run = run_playbook("switchover.yml", deployed.inventory, "-e", "nbdgw_switchover_to=dc",
                       timeout=300)
    assert run.rc != 0, run
    assert run.failures("main") == [
        "switchover needs every site up: nbdgw is not running on main (for a lost main site "
        "use promote-dr.yml); nothing was changed"], run
    assert run.changed() == [], run


def status(deployed: Deployed, host: str) -> dict[str, object]:
    p = subprocess.run([deployed.nbdgw(host), "-c", str(deployed.config(host)), "status",
                        "--json"], capture_output=True, text=True, timeout=60, check=True,
                       cwd="/")
    return json.loads(p.stdout)  # type: ignore[no-any-return]


def caught_up(deployed: Deployed, peer: str) -> bool:
    vols = status(deployed, "main")["volumes"]
    states = [p for v in vols for p in v["peers"] if p["name"] == peer]  # type: ignore[attr-defined,index]
    return len(states) == 2 and all(
        p["lag_records"] == 0 and p["state"] in ("in sync", "streaming") for p in states)


def checksum(deployed: Deployed, host: str, volume: str) -> str:
    p = subprocess.run([deployed.nbdgw(host), "-c", str(deployed.config(host)), "volume",
                        "checksum", volume], capture_output=True, text=True, timeout=120,
                       check=True, cwd="/")
    return p.stdout.split()[0]


def test_three_deployed_sites_replicate(deployed: Deployed, tmp_path: Path) -> None:
    """The three sites, each started as its unit starts it, in one network namespace (each
    on its own loopback address, as the inventory says): what a client writes on the
    primary reaches the secondary and the DR site, bit for bit."""
    if deployed.hosts != SITES:
        pytest.skip("needs the three-site deployment (pytest -m slow)")
    sock = deployed.prefix("main") / "run" / "nbd.sock"
    sock.parent.mkdir(parents=True, exist_ok=True)
    logs = {h: tmp_path / f"{h}.log" for h in SITES}
    with netns() as ns, sites_running(deployed, ns, tmp_path) as proc:
        h = connect(sock, "v2", proc, logs["main"])
        for i in range(64):
            h.pwrite(bytes([i + 1]) * 65536, i * 131072 % (16 << 20))  # type: ignore[attr-defined]
        h.flush()  # type: ignore[attr-defined]
        h.shutdown()  # type: ignore[attr-defined]
        deadline = time.monotonic() + 90
        while not (caught_up(deployed, "dc") and caught_up(deployed, "dr")):
            assert time.monotonic() < deadline, (
                f"replicas not caught up in 90 s: {status(deployed, 'main')}\n"
                + "\n".join(f"--- {k}\n{v.read_text()[-3000:]}" for k, v in logs.items()))
            time.sleep(0.5)
    for volume in ("v1", "v2"):
        sums = {host: checksum(deployed, host, volume) for host in deployed.hosts}
        assert len(set(sums.values())) == 1, sums


@pytest.mark.slow  # two more site.yml runs and a wheel build: about a minute
def test_a_new_build_is_installed_and_only_then(deployed: Deployed, tmp_path: Path) -> None:
    """A wheelhouse holding another build of the same version (other bytes: another
    SOURCE_DATE_EPOCH) is installed on every host and recorded; the unchanged rest of the
    host is not touched. Runs last: it leaves the hosts on that build."""
    wheels = tmp_path / "wheelhouse"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
                    "--wheel-dir", str(wheels), str(ROOT)], check=True, timeout=600,
                   env=os.environ | {"SOURCE_DATE_EPOCH": "946684800"})
    (wheel,) = wheels.glob("nbdgw-*.whl")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    args = ("-e", json.dumps({"nbdgw_install_from": "wheelhouse",
                              "nbdgw_wheelhouse": str(wheels)}))
    run = run_playbook("site.yml", deployed.inventory, *args, timeout=600)
    assert run.rc == 0, run
    for host in deployed.hosts:
        stamp = deployed.prefix(host) / "venv_dir" / ".nbdgw-wheel.sha256"
        assert stamp.read_text() == digest + "\n"
        assert run.stats[host]["changed"] == 3, run  # unpack, pip install, stamp
    again = run_playbook("site.yml", deployed.inventory, *args, timeout=600)
    assert again.rc == 0, again
    assert again.changed() == [], again
