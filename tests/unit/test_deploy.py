"""deploy/: ansible-lint (production profile), syntax checks of every playbook, and the
role's early validation, message by message.

Each validation test runs the real site.yml (connection local, every path under a
temporary root) with one mistake in otherwise good variables, and checks that the run
stops with the exact message and before anything was written.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
VENV_BIN = Path(sys.executable).parent
PLAYBOOKS = sorted(p.name for p in DEPLOY.glob("*.yml"))
SITES = ("main", "dc", "dr")
PATH_VARS = ("config_dir", "data_dir", "venv_dir", "unit_dir", "sysctl_dir")


def site_vars() -> dict[str, Any]:
    """Good variables for a three-site cluster on loopback addresses (127.0.0.1-3)."""
    return {
        "nbdgw_sites": [
            {"name": "main", "role": "primary", "address": "127.0.0.1"},
            {"name": "dc", "role": "secondary", "address": "127.0.0.2", "mode": "sync",
             "sync_timeout": 5},
            {"name": "dr", "role": "dr", "address": "127.0.0.3", "rate_limit": "50M"},
        ],
        "nbdgw_service_address": "192.0.2.10/24",
        "nbdgw_service_interface": "lo",
        "nbdgw_peer_secret": "a-real-secret-of-32-bytes-length",
        "nbdgw_nbd_allow": ["127.0.0.0/8"],
        "nbdgw_volumes": [{"name": "v1", "size": "64M"}, {"name": "v2", "size": 16777216}],
        "nbdgw_sysctl_apply": False,  # never change this machine's kernel settings
    }


def host_vars(root: Path, name: str) -> dict[str, Any]:
    """Connection local, and every path under ``root/name`` (the host's /etc stays alone);
    a site that is not one of SITES (a witness, ``wit``) gets 127.0.0.4."""
    prefix = root / name
    i = SITES.index(name) + 1 if name in SITES else 4
    out: dict[str, Any] = {
        "ansible_connection": "local",
        "ansible_python_interpreter": "/usr/bin/python3",
        "ansible_become": False,
        "nbdgw_node_name": name,
        "nbdgw_peerlink_listen": f"127.0.0.{i}:7789",
        "nbdgw_nbd_listen": [f"tcp:127.0.0.{i}:10809", f"unix:{prefix}/run/nbd.sock"],
    }
    for v in PATH_VARS:
        out[f"nbdgw_{v}"] = str(prefix / v)
    return out


def write_inventory(root: Path, hosts: tuple[str, ...], group: dict[str, Any]) -> Path:
    hvs = {h: host_vars(root, h) for h in hosts}
    if group.get("nbdgw_groups"):  # each group has its own ports: no per-host listen
        for hv in hvs.values():
            del hv["nbdgw_peerlink_listen"], hv["nbdgw_nbd_listen"]
    inv = {"nbdgw": {"hosts": hvs, "vars": group}}
    path = root / "inventory.yml"
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    return path


RESULT = re.compile(r"^(ok|changed|failed|fatal): \[([^]]+)\](?: \(item=.*?\))?(?::)?"
                    r"(?: FAILED!)?(?: => (\{.*\}))?$")
RECAP = re.compile(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$")


class Run:
    """One ansible-playbook run, read from the default callback's one-line JSON results."""

    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.proc = proc
        self.rc = proc.returncode
        self.results: list[tuple[str, str, dict[str, Any]]] = []  # (status, host, result)
        self.stats: dict[str, dict[str, int]] = {}
        for line in proc.stdout.splitlines():
            if m := RESULT.match(line):
                res = json.loads(m.group(3)) if m.group(3) else {}
                self.results.append((m.group(1), m.group(2), res))
            elif m := RECAP.match(line):
                self.stats[m.group(1)] = {k: int(v) for k, v in
                                          (kv.split("=") for kv in m.group(2).split())}

    def failures(self, host: str | None = None) -> list[str]:
        return [str(r.get("msg", "")) for status, h, r in self.results
                if status in ("failed", "fatal") and host in (None, h)
                and r.get("msg") != "One or more items failed"]

    def changed(self, host: str | None = None) -> list[str]:
        return [f"{h}: {r}" for status, h, r in self.results
                if status == "changed" and host in (None, h)]

    def messages(self) -> list[str]:
        return [str(r.get("msg", "")) for _, _, r in self.results]

    def __repr__(self) -> str:
        return (f"rc={self.rc}\nfailures={self.failures()}\nstdout tail:\n"
                f"{self.proc.stdout[-4000:]}\nstderr:\n{self.proc.stderr[-3000:]}")


def ansible_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    env.update({
        "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.default",
        "ANSIBLE_CALLBACK_RESULT_FORMAT": "json",
        "ANSIBLE_CALLBACK_FORMAT_PRETTY": "false",
        "ANSIBLE_DISPLAY_SKIPPED_HOSTS": "false",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
    })
    return env


def run_playbook(playbook: str, inventory: Path, *args: str, timeout: float = 600) -> Run:
    argv = [str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), playbook, *args]
    proc = subprocess.run(argv, cwd=DEPLOY, capture_output=True, text=True, timeout=timeout,
                          env=ansible_env(), check=False)
    return Run(proc)


# --- lint and syntax ------------------------------------------------------------------------

def test_there_are_the_six_playbooks() -> None:
    assert PLAYBOOKS == ["add-branch.yml", "etcd.yml", "promote-dr.yml", "site.yml",
                         "switchover.yml", "upgrade.yml"]


def test_ansible_lint_production_profile_is_clean() -> None:
    p = subprocess.run([str(VENV_BIN / "ansible-lint"), "--offline", "--nocolor"], cwd=DEPLOY,
                       capture_output=True, text=True, timeout=240, env=ansible_env(),
                       check=False)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "Profile 'production' was required, and it passed." in out, out
    assert "0 failure(s), 0 warning(s)" in out, out


@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_syntax_check(playbook: str) -> None:
    p = subprocess.run([str(VENV_BIN / "ansible-playbook"), "--syntax-check", "-i",
                        "examples/inventory.yml", playbook], cwd=DEPLOY, capture_output=True,
                       text=True, timeout=120, env=ansible_env(), check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"playbook: {playbook}" in p.stdout


# --- validation: each mistake stops site.yml with a message naming the variable ----------
#
# One site.yml run checks every case at once: each case is an inventory host of its own
# (connection local, its own root directory) that believes it is site `main`, with one
# mistake in otherwise good variables. Ansible runs the hosts side by side, and each must
# stop with its message, before anything is written for it.

PLACEHOLDER = ("{} is still a placeholder: put the real value in Ansible Vault "
               "(ansible-vault encrypt_string) before deploying")
SIZE_MSG = ("nbdgw_volumes[1].size: cannot parse {} as a size: expected a whole number "
            "with an optional unit K, M, G, T or P, e.g. 100G")


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation of the good variables: set ``a.0.b`` (dict keys and list indexes)."""
    def apply(group: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = group
        for k in parents:
            node = node[int(k)] if isinstance(node, list) else node[k]
        if value is DELETE:
            del node[last]
        elif isinstance(node, list) and int(last) == len(node):
            node.append(copy.deepcopy(value))
        else:
            node[int(last) if isinstance(node, list) else last] = copy.deepcopy(value)
    return apply


DELETE = object()


def _use_groups(group: dict[str, Any]) -> None:
    """A mutation: the good variables with volume groups instead (groups_vars)."""
    group.clear()
    group.update(groups_vars())
# A TSIG key as `tsig-keygen -a hmac-sha256 nbdgw-update` writes it (a made-up secret).
TSIG_SECRET = "bmJkZ3ctdGVzdC10c2lnLWtleS0zMi1ieXRlcy1sb25n"  # noqa: S105 (made up)
TSIG_KEY = f'key "nbdgw-update" {{\n\talgorithm hmac-sha256;\n\tsecret "{TSIG_SECRET}";\n}};\n'
DNS = {"nbdgw_service_dns_name": "db.branch1.example.com",
       "nbdgw_service_dns_zone": "example.com",
       "nbdgw_service_dns_servers": ["192.0.2.53"],
       "nbdgw_service_dns_key": TSIG_KEY}
DNS_ONLY = [_set(k, v) for k, v in DNS.items()] + [_set("nbdgw_service_address", DELETE)]
DNS_NEEDS = ("{} is not set: a DNS name (nbdgw_service_dns_name) needs "
             "nbdgw_service_dns_zone, nbdgw_service_dns_servers and nbdgw_service_dns_key "
             "(the TSIG key the zone's server grants the name)")
CHAP = {"nbdgw_iscsi_enabled": True, "nbdgw_iscsi_iqn": "iqn.2026-11.com.example:nbdgw",
        "nbdgw_iscsi_chap_user": "sql"}

# A witness in place of the DR site (README "A pair and a witness").
WITNESS_SITE = {"name": "wit", "role": "witness", "address": "127.0.0.4"}

CASES: dict[str, tuple[list[Callable[[dict[str, Any]], None]], str]] = {
    "no_service_address": (
        [_set("nbdgw_service_address", DELETE)],
        "nbdgw_service_address is not set: the address clients use, with its prefix length, "
        "e.g. 192.0.2.10/24; or, across subnets, nbdgw_service_dns_name (a DNS name that "
        "follows the primary)"),
    "empty_service_address": (
        [_set("nbdgw_service_address", "")],
        "nbdgw_service_address is not set: the address clients use, with its prefix length, "
        "e.g. 192.0.2.10/24; or, across subnets, nbdgw_service_dns_name (a DNS name that "
        "follows the primary)"),
    "service_address_without_prefix": (
        [_set("nbdgw_service_address", "192.0.2.10")],
        'nbdgw_service_address "192.0.2.10" has no prefix length: write it as ADDRESS/PREFIX, '
        "e.g. 192.0.2.10/24"),
    "dns_service_address_without_prefix": (
        [*DNS_ONLY, _set("nbdgw_service_address", "192.0.2.10")],
        'nbdgw_service_address "192.0.2.10" has no prefix length: write it as ADDRESS/PREFIX, '
        "e.g. 192.0.2.10/24"),
    "dns_without_zone": (
        [*DNS_ONLY, _set("nbdgw_service_dns_zone", DELETE)],
        DNS_NEEDS.format("nbdgw_service_dns_zone")),
    "dns_without_servers": (
        [*DNS_ONLY, _set("nbdgw_service_dns_servers", [])],
        DNS_NEEDS.format("nbdgw_service_dns_servers")),
    "dns_without_key": (
        [*DNS_ONLY, _set("nbdgw_service_dns_key", "")],
        DNS_NEEDS.format("nbdgw_service_dns_key")),
    "dns_zone_without_name": (
        [_set(k, v) for k, v in DNS.items() if k != "nbdgw_service_dns_name"],
        "nbdgw_service_dns_name is not set, but nbdgw_service_dns_zone, _servers or _key "
        "is: name the record to publish (e.g. db.branch1.example.com), or unset them"),
    "dns_name_outside_zone": (
        [*DNS_ONLY, _set("nbdgw_service_dns_name", "db.branch1.example.org")],
        'nbdgw_service_dns_name "db.branch1.example.org" is not inside '
        'nbdgw_service_dns_zone "example.com": the name must belong to the zone the server '
        "updates, e.g. db.branch1.example.com in example.com"),
    "dns_name_is_the_zone": (
        [*DNS_ONLY, _set("nbdgw_service_dns_name", "example.com.")],
        'nbdgw_service_dns_name "example.com." is not inside nbdgw_service_dns_zone '
        '"example.com": the name must belong to the zone the server updates, e.g. '
        "db.branch1.example.com in example.com"),
    "dns_servers_a_string": (
        [*DNS_ONLY, _set("nbdgw_service_dns_servers", "192.0.2.53")],
        'nbdgw_service_dns_servers is "192.0.2.53": expected a list of the zone\'s primary '
        "server(s), e.g. [192.0.2.53]"),
    "dns_server_a_hostname": (
        [*DNS_ONLY, _set("nbdgw_service_dns_servers", ["192.0.2.53", "ns1.example.com"])],
        'nbdgw_service_dns_servers[1] is "ns1.example.com": expected an IP address or '
        "IP:PORT (updating the name must not depend on resolving another)"),
    "dns_address_not_an_ip": (
        [*DNS_ONLY, _set("nbdgw_service_dns_address", "branch1.example.com")],
        'nbdgw_service_dns_address is "branch1.example.com": expected the IP address this '
        "host's clients reach it by (default: its address in nbdgw_sites)"),
    "dns_ttl_zero": (
        [*DNS_ONLY, _set("nbdgw_service_dns_ttl", 0)],
        'nbdgw_service_dns_ttl is "0": expected whole seconds from 1 to 86400 (clients '
        "follow a failover within the failover time plus the TTL)"),
    "dns_key_placeholder": (
        [*DNS_ONLY, _set("nbdgw_service_dns_key", "CHANGE-ME")],
        PLACEHOLDER.format("nbdgw_service_dns_key")),
    "dns_key_only_the_secret": (
        [*DNS_ONLY,
         _set("nbdgw_service_dns_key", TSIG_SECRET)],
        "nbdgw_service_dns_key is not a TSIG key as tsig-keygen writes it: expected the "
        'whole output of tsig-keygen -a hmac-sha256 NAME, key "NAME" {{ algorithm '
        'hmac-sha256; secret "..."; }};'),  # braces doubled: the messages are formatted
    "two_primaries": (
        [_set("nbdgw_sites.1.role", "primary")],
        "nbdgw_sites: two primaries, main and dc; exactly one site is primary"),
    "no_primary": (
        [_set("nbdgw_sites.0.role", "secondary")],
        "nbdgw_sites: no primary; exactly one site is primary"),
    "peer_listed_twice": (
        [_set("nbdgw_sites.3", {"name": "dc", "role": "dr", "address": "127.0.0.4"})],
        "nbdgw_sites: site dc is listed twice"),
    "no_sites": (
        [_set("nbdgw_sites", [])],
        "nbdgw_sites is empty: list every site (name, role, address), the same list for "
        "every host, e.g. in group_vars"),
    "site_role_unknown": (
        [_set("nbdgw_sites.2.role", "backup")],
        "nbdgw_sites[2].role is 'backup': expected primary, secondary, dr or witness"),
    "witness_and_dr": (
        [_set("nbdgw_sites.3", WITNESS_SITE)],
        "nbdgw_sites: a witness (wit) and a DR site (dr) together: the third voter is one "
        "or the other, not both"),
    "two_witnesses": (
        [_set("nbdgw_sites.2", {"name": "wit1", "role": "witness", "address": "127.0.0.3"}),
         _set("nbdgw_sites.3", WITNESS_SITE)],
        "nbdgw_sites: two witnesses, wit1 and wit; one witness votes for a pair"),
    "witness_without_secondary": (
        [_set("nbdgw_sites", [{"name": "main", "role": "primary", "address": "127.0.0.1"},
                              WITNESS_SITE])],
        "nbdgw_sites: a witness (wit) without a secondary: it votes for a pair of data sites "
        "(primary and secondary)"),
    "witness_with_replication_keys": (
        [_set("nbdgw_sites.2", WITNESS_SITE | {"mode": "async", "rate_limit": "50M"})],
        "nbdgw_sites[2] is the witness wit: it holds no data and nothing is shipped to it; "
        "remove its mode, rate_limit"),
    "witness_without_automatic_failover": (
        [_set("nbdgw_sites", [{"name": "dc", "role": "primary", "address": "127.0.0.2"},
                              {"name": "dr", "role": "secondary", "address": "127.0.0.3"},
                              {"name": "main", "role": "witness", "address": "127.0.0.1"}]),
         _set("nbdgw_failover_auto", False)],
        "nbdgw_failover_auto is false, but main is the witness: it only votes, so automatic "
        "failover must be on (nbdgw_failover_auto: true)"),
    "site_without_address": (
        [_set("nbdgw_sites.1.address", DELETE)],
        "nbdgw_sites[1] has no address"),
    "host_not_a_site": (
        [_set("nbdgw_sites.0.name", "alpha")],
        "nbdgw_node_name 'main' (host {host}) is not one of nbdgw_sites: alpha, dc, dr"),
    "size_decimal": ([_set("nbdgw_volumes.1.size", "1.5G")], SIZE_MSG.format('"1.5G"')),
    "size_words": ([_set("nbdgw_volumes.1.size", "10 gigs")], SIZE_MSG.format('"10 gigs"')),
    "size_negative": ([_set("nbdgw_volumes.1.size", -4096)], SIZE_MSG.format('"-4096"')),
    "size_bool": ([_set("nbdgw_volumes.1.size", True)], SIZE_MSG.format('"True"')),
    "size_not_4k": (
        [_set("nbdgw_volumes.0.size", "1000")],
        'nbdgw_volumes[0].size: "1000" is 1000 bytes: expected a multiple of 4096 greater '
        "than zero"),
    "size_zero": (
        [_set("nbdgw_volumes.0.size", "0G")],
        'nbdgw_volumes[0].size: "0G" is 0 bytes: expected a multiple of 4096 greater than '
        "zero"),
    "volume_listed_twice": (
        [_set("nbdgw_volumes.2", {"name": "v1", "size": "1G"})],
        "nbdgw_volumes: volume v1 is listed twice"),
    "volume_without_size": (
        [_set("nbdgw_volumes.0.size", DELETE)],
        "nbdgw_volumes[0] has no size"),
    "secret_change_me": (
        [_set("nbdgw_peer_secret", "CHANGE-ME")], PLACEHOLDER.format("nbdgw_peer_secret")),
    "secret_changeme_lower": (
        [_set("nbdgw_peer_secret", "changeme")], PLACEHOLDER.format("nbdgw_peer_secret")),
    "secret_angle_brackets": (
        [_set("nbdgw_peer_secret", "<the peer secret>")],
        PLACEHOLDER.format("nbdgw_peer_secret")),
    "secret_xxx": (
        [_set("nbdgw_peer_secret", "x" * 24)], PLACEHOLDER.format("nbdgw_peer_secret")),
    "secret_replace_me": (
        [_set("nbdgw_peer_secret", "replace_me_with_32_random_bytes")],
        PLACEHOLDER.format("nbdgw_peer_secret")),
    "chap_secret_placeholder": (
        [_set(k, v) for k, v in CHAP.items()] + [_set("nbdgw_iscsi_chap_secret", "TODO")],
        PLACEHOLDER.format("nbdgw_iscsi_chap_secret")),
    "chap_user_without_secret": (
        [_set(k, v) for k, v in CHAP.items()],
        "nbdgw_iscsi_chap_user is set but nbdgw_iscsi_chap_secret is not: CHAP needs both"),
    "iscsi_initiators_and_allow": (
        [_set(k, v) for k, v in CHAP.items()]
        + [_set("nbdgw_iscsi_chap_secret", "chap-0123456789"),
           _set("nbdgw_iscsi_initiators", ["iqn.2026-11.com.example:sql1"]),
           _set("nbdgw_iscsi_allow", ["192.0.2.0/24"])],
        "nbdgw_iscsi_initiators and nbdgw_iscsi_allow are both set: tgtd admits an "
        "initiator matching either list; set one"),
    "chap_secret_short": (
        [_set(k, v) for k, v in CHAP.items()] + [_set("nbdgw_iscsi_chap_secret", "short")],
        "nbdgw_iscsi_chap_secret is 5 characters long: expected 12 to 255"),
    "iscsi_readers_portal_a_name": (
        [_set("nbdgw_iscsi_enabled", True), _set("nbdgw_iscsi_iqn", CHAP["nbdgw_iscsi_iqn"]),
         _set("nbdgw_iscsi_readers_portal", "dc:3260")],
        'nbdgw_iscsi_readers_portal is "dc:3260": expected IP:PORT ([IPv6]:PORT), an address '
        "of this host and a port 1-65535, e.g. 192.0.2.12:3260"),
    "iscsi_readers_portal_port_out_of_range": (
        [_set("nbdgw_iscsi_enabled", True), _set("nbdgw_iscsi_iqn", CHAP["nbdgw_iscsi_iqn"]),
         _set("nbdgw_iscsi_readers_portal", "[2001:db8::12]:65536")],
        'nbdgw_iscsi_readers_portal is "[2001:db8::12]:65536": expected IP:PORT '
        "([IPv6]:PORT), an address of this host and a port 1-65535, e.g. 192.0.2.12:3260"),
    "peer_secret_missing": (
        [_set("nbdgw_peer_secret", "")],
        "nbdgw_peer_secret is not set: replication between sites needs a shared secret of at "
        "least 16 bytes (in Ansible Vault), or mutual TLS (nbdgw_peerlink_tls_cert, _key, "
        "_ca)"),
    "peer_secret_too_short": (
        [_set("nbdgw_peer_secret", "short-secret")],
        "nbdgw_peer_secret is 12 bytes long: expected at least 16"),
    "peerlink_tls_incomplete": (
        [_set("nbdgw_peerlink_tls_cert", "-----BEGIN CERTIFICATE-----"),
         _set("nbdgw_peerlink_tls_ca", "-----BEGIN CERTIFICATE-----")],
        "nbdgw_peerlink_tls_key is not set: mutual TLS between sites needs "
        "nbdgw_peerlink_tls_cert, nbdgw_peerlink_tls_key and nbdgw_peerlink_tls_ca"),
    "tls_only_with_automatic_failover": (
        [_set("nbdgw_peer_secret", ""),
         _set("nbdgw_peerlink_tls_cert", "-----BEGIN CERTIFICATE-----"),
         _set("nbdgw_peerlink_tls_key", "-----BEGIN PRIVATE KEY-----"),
         _set("nbdgw_peerlink_tls_ca", "-----BEGIN CERTIFICATE-----")],
        "nbdgw_failover_auto is true but nbdgw_peer_secret is not set: heartbeats are "
        "authenticated with the shared secret (mutual TLS protects only the replication "
        "links); set nbdgw_peer_secret (at least 16 bytes, in Ansible Vault), or "
        "nbdgw_failover_auto: false"),
    "failover_timers": (
        [_set("nbdgw_failover_timeout", 1)],
        "nbdgw_failover_timeout (1) must be at least 3 x nbdgw_failover_interval (0.5): a "
        "single lost heartbeat must not look like a dead node"),
    "topology": (
        [_set("nbdgw_peerlink_topology", "star")],
        "nbdgw_peerlink_topology is 'star': expected fanout or cascade"),
    "schedule_every": (
        [_set("nbdgw_snapshot_schedules", [{"name": "q", "every": "15m", "keep": 4},
                                           {"name": "n", "every": "nightly", "keep": 7}])],
        'nbdgw_snapshot_schedules[1].every is "nightly": expected Nm (N minutes, 1 to 10080), '
        "hourly, daily or weekly"),
    "schedule_every_hours": (
        [_set("nbdgw_snapshot_schedules", [{"name": "q", "every": "4h", "keep": 4}])],
        'nbdgw_snapshot_schedules[0].every is "4h": expected Nm (N minutes, 1 to 10080), '
        "hourly, daily or weekly"),
    "schedule_every_too_rare": (
        [_set("nbdgw_snapshot_schedules", [{"name": "q", "every": "20000m", "keep": 4}])],
        'nbdgw_snapshot_schedules[0].every is "20000m": expected Nm (N minutes, 1 to '
        '10080), hourly, daily or weekly'),
    "schedule_keep": (
        [_set("nbdgw_snapshot_schedules", [{"name": "q", "every": "hourly", "keep": 600}])],
        "nbdgw_snapshot_schedules[0].keep: expected an integer from 1 to 512"),
    "schedule_unknown_volume": (
        [_set("nbdgw_snapshot_schedules",
              [{"name": "q", "volumes": ["v1", "sql-data"], "every": "hourly", "keep": 4}])],
        "nbdgw_snapshot_schedules[0].volumes: sql-data not in nbdgw_volumes"),
    # With volume groups (groups_vars): the node config's cross-group checks, on the
    # controller, naming the inventory's variable.
    "groups_iscsi_readers_portal": (
        [_use_groups, _set("nbdgw_iscsi_readers_portal", "127.0.0.2:3261")],
        "nbdgw_iscsi_readers_portal is set, but the inventory has volume groups (nbdgw_groups): "
        "a replica's LUNs are not served per group yet (each group's tgtd listens on its own "
        "port, nbdgw_groups[].ports.iscsi); leave it out"),
    "groups_name_twice": (
        [_use_groups, _set("nbdgw_groups.1.name", "b1")],
        "nbdgw_groups: group b1 is listed twice"),
    "groups_unknown_site": (
        [_use_groups, _set("nbdgw_groups.1.secondary", "dc2")],
        'nbdgw_groups[1].secondary: no site named "dc2" in nbdgw_sites (sites: main, dc, '
        "dr, br2)"),
    "groups_witness_holds_data": (
        [_use_groups, _set("nbdgw_groups.0.witness", "dc")],
        "nbdgw_groups[0] (b1): site dc is both secondary and witness; a site has one role "
        "in a group (a witness holds none of the data of the group it witnesses)"),
    "groups_shared_site_port": (
        [_use_groups, _set("nbdgw_groups.1.ports.nbd", 10811)],
        "nbdgw_groups[1].ports.nbd 10811 is also nbdgw_groups[0].ports.nbd on site dc: "
        "groups that share a site need ports of their own"),
    "groups_port_twice_in_a_group": (
        [_use_groups, _set("nbdgw_groups.2.ports.heartbeat", 7821)],
        "nbdgw_groups[2].ports.heartbeat and .peerlink are both 7821: a group's ports "
        "differ"),
    "groups_dns_without_servers": (
        [_use_groups, _set("nbdgw_groups.1.service.dns.servers", DELETE)],
        "nbdgw_groups[1].service.dns has no servers: a DNS name needs name, zone and "
        "servers (and nbdgw_service_dns_key, the TSIG key the zone's server grants the "
        "name)"),
    "groups_dns_without_key": (
        [_use_groups, _set("nbdgw_service_dns_key", "")],
        "nbdgw_service_dns_key is not set: nbdgw_groups[1].service.dns needs the TSIG key "
        "the zone's server grants the name (the whole output of tsig-keygen, in Ansible "
        "Vault)"),
    "groups_site_with_a_role": (
        [_use_groups, _set("nbdgw_sites.1.role", "secondary")],
        "nbdgw_sites[1].role: with nbdgw_groups a site has only name, address and "
        "heartbeat_addresses; roles, ports and link options are per group "
        "(nbdgw_groups[].primary, secondary, dr, witness, ports, replicas)"),
    "groups_and_single_group_volumes": (
        [_use_groups, _set("nbdgw_volumes", [{"name": "v9", "size": "1G"}])],
        "nbdgw_volumes is set, but the inventory has volume groups (nbdgw_groups): each "
        "group has its own, nbdgw_groups[].volumes"),
    "groups_replica_to_the_witness": (
        [_use_groups, _set("nbdgw_groups.0.replicas.1", {"site": "dr", "mode": "async"})],
        'nbdgw_groups[0].replicas[1].site: "dr" is not a data site of group b1 (its '
        "primary, secondary or dr); dr is its witness, which holds none of its data and is "
        "shipped nothing"),
    # A group on the node's shared peerlink port (no ports.peerlink of its own).
    "groups_shared_port_without_listen": (
        [_use_groups, _set("nbdgw_groups.0.ports.peerlink", DELETE)],
        "nbdgw_groups[0] (b1) has no ports.peerlink and nbdgw_peerlink_listen is not set on "
        "main: a group without a peerlink port of its own replicates through the shared port "
        "of its sites; set nbdgw_peerlink_listen (e.g. 0.0.0.0:7789, the same port on every "
        "site: in group_vars) or give the group ports.peerlink"),
    "groups_shared_listen_without_port": (
        [_use_groups, _set("nbdgw_groups.2.ports.peerlink", DELETE),
         _set("nbdgw_peerlink_listen", "0.0.0.0")],
        'nbdgw_peerlink_listen is "0.0.0.0": expected HOST:PORT (e.g. 0.0.0.0:7789), the '
        "shared peerlink port of core"),
    "groups_shared_port_without_secret": (
        [_use_groups, _set("nbdgw_groups.0.ports.peerlink", DELETE),
         _set("nbdgw_peerlink_listen", "0.0.0.0:7789"), _set("nbdgw_peer_secret", ""),
         _set("nbdgw_failover_auto", False), _set("nbdgw_peerlink_tls_cert", "c"),
         _set("nbdgw_peerlink_tls_key", "k"), _set("nbdgw_peerlink_tls_ca", "a")],
        "nbdgw_groups[0] (b1) is on the shared peerlink port but nbdgw_peer_secret is not "
        "set: the proofs bind each session to its group (so a connection routed to another "
        "group is refused), and only the shared secret carries them; mutual TLS alone is "
        "not enough"),
    "groups_shared_port_is_a_group_port": (
        [_use_groups, _set("nbdgw_groups.1.ports.peerlink", DELETE),
         _set("nbdgw_peerlink_listen", "0.0.0.0:7802")],
        "nbdgw_groups[0].ports.heartbeat 7802 is also nbdgw_peerlink_listen's port, the "
        "shared port of the groups without ports.peerlink on site main: groups that share a "
        "site need ports of their own"),
    "groups_site_in_no_group": (
        [_use_groups, _set("nbdgw_sites.4", {"name": "spare", "address": "127.0.0.9"})],
        "nbdgw_sites[4] (spare) is in no group of nbdgw_groups"),
    "nbd_tls_without_key": (
        [_set("nbdgw_nbd_tls_mode", "require")],
        "nbdgw_nbd_tls_mode is require: set exactly one of nbdgw_nbd_tls_psk and "
        "nbdgw_nbd_tls_certificates_dir"),
}


@pytest.fixture(scope="module")
def validation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Run]:
    root = tmp_path_factory.mktemp("validation")
    hosts: dict[str, Any] = {}
    for case, (mutations, _) in CASES.items():
        group = site_vars()
        for m in mutations:
            m(group)
        hv = host_vars(root / case, "main")
        if "nbdgw_groups" in group:  # each group has its own ports
            del hv["nbdgw_peerlink_listen"], hv["nbdgw_nbd_listen"]
        hosts[f"case_{case}"] = group | hv
    inv = root / "inventory.yml"
    inv.write_text(yaml.safe_dump({"nbdgw": {"hosts": hosts}}, sort_keys=False))
    return root, run_playbook("site.yml", inv, "--forks", "8", timeout=300)


@pytest.mark.parametrize("case", list(CASES))
def test_validation_message(validation: tuple[Path, Run], case: str) -> None:
    root, run = validation
    host = f"case_{case}"
    want = CASES[case][1].format(host=host)
    assert run.failures(host) == [want], run
    assert not (root / case / "main").exists(), "the role wrote files before its checks passed"
    assert run.changed(host) == []
    assert run.stats[host]["failed"] == 1


def test_placeholder_message_does_not_show_the_value(validation: tuple[Path, Run]) -> None:
    _, run = validation
    assert run.failures("case_secret_replace_me")
    assert "replace_me_with_32_random_bytes" not in run.proc.stdout + run.proc.stderr


def test_dns_key_messages_do_not_show_the_key(validation: tuple[Path, Run]) -> None:
    _, run = validation
    assert run.failures("case_dns_key_only_the_secret")
    assert run.failures("case_dns_ttl_zero")  # a host whose key is good and is refused later
    assert TSIG_SECRET not in run.proc.stdout + run.proc.stderr


def test_a_role_change_is_refused(tmp_path: Path) -> None:
    """A node whose config on disk says secondary is not made primary by site.yml: roles
    move with switchover.yml and promote-dr.yml."""
    inv = write_inventory(tmp_path, ("main",), site_vars())
    config = tmp_path / "main" / "config_dir" / "nbdgw.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("version: 1\nnode: {name: main, role: secondary}\n")
    run = run_playbook("site.yml", inv, timeout=180)
    assert run.rc != 0, run
    assert run.failures() == [
        f"nbdgw_sites gives main the role primary but its config ({config}) says secondary: "
        "roles move with switchover.yml or promote-dr.yml; set nbdgw_allow_role_change=true "
        "to redefine the cluster on purpose"], run
    assert run.changed() == [], run
    assert sorted(p.name for p in (tmp_path / "main").iterdir()) == ["config_dir"]


def test_the_example_inventory_refuses_its_placeholder_secrets(tmp_path: Path) -> None:
    """deploy/examples as shipped: site.yml stops at the vault placeholders. Connection
    and every path are forced local and under tmp_path (extra vars), so even a wrong
    pass could not reach the example's addresses or this machine's /etc."""
    extra = {"ansible_connection": "local", "ansible_python_interpreter": "/usr/bin/python3",
             "ansible_become": False, "nbdgw_sysctl_apply": False}
    for v in PATH_VARS:
        extra[f"nbdgw_{v}"] = str(tmp_path / v)
    run = run_playbook("site.yml", DEPLOY / "examples" / "inventory.yml", "-e",
                       json.dumps(extra), timeout=180)
    assert run.rc != 0, run
    assert sorted(set(run.failures())) == [
        f"{name} is still a placeholder: put the real value in Ansible Vault "
        "(ansible-vault encrypt_string) before deploying"
        for name in ("nbdgw_iscsi_chap_secret", "nbdgw_peer_secret")], run
    assert not any(tmp_path.iterdir())


# --- volume groups -----------------------------------------------------------------------

def groups_vars() -> dict[str, Any]:
    """Good variables with volume groups (examples/groups.yaml's shape): branch main and
    branch br2 (127.0.0.4) each replicate their group to dc, dr witnesses both pairs, and
    dc's own group replicates to dr with main as its witness; b2 is found by DNS."""
    return {
        "nbdgw_sites": [{"name": n, "address": f"127.0.0.{i}"}
                        for i, n in enumerate(("main", "dc", "dr", "br2"), 1)],
        "nbdgw_groups": [
            {"name": "b1", "primary": "main", "secondary": "dc", "witness": "dr",
             "replicas": [{"site": "dc", "mode": "sync", "sync_timeout": 5}],
             "ports": {"peerlink": 7801, "heartbeat": 7802, "nbd": 10811, "metrics": 9811},
             "service": {"address": "192.0.2.10/24", "interface": "lo"},
             "clients": ["192.0.2.0/24"],
             "volumes": [{"name": "v1", "size": "64M"}]},
            {"name": "b2", "primary": "br2", "secondary": "dc", "witness": "dr",
             "ports": {"peerlink": 7811, "heartbeat": 7812, "nbd": 10812},
             "service": {"dns": {"name": "db2.example.com", "zone": "example.com",
                                 "servers": ["192.0.2.53"], "ttl": 30}},
             "clients": ["198.51.100.0/24"],
             "volumes": [{"name": "v2", "size": 16777216}]},
            {"name": "core", "primary": "dc", "secondary": "dr", "witness": "main",
             "topology": "cascade",
             "ports": {"peerlink": 7821, "heartbeat": 7822, "nbd": 10821},
             "service": {"address": "192.0.2.20/24", "interface": "lo"},
             "volumes": [{"name": "erp", "size": "64M"}],
             "snapshots": {"schedules": [{"name": "hourly", "every": "hourly", "keep": 24}]}},
        ],
        "nbdgw_peer_secret": "a-real-secret-of-32-bytes-length",
        "nbdgw_service_dns_key": TSIG_KEY,
        "nbdgw_sysctl_apply": False,
    }


def test_groups_render_configs_that_pass_config_check(tmp_path: Path) -> None:
    """With nbdgw_groups every site gets the same sites and groups (its own node.name),
    no single-group keys, each group's DNS name signed with the one key file; the
    firewall opens each group's ports to that group's sites only; and each config passes
    this tree's `nbdgw config check`."""
    group = groups_vars()
    cfgs = render_configs(tmp_path, write_inventory(tmp_path, ("main", "dc", "dr", "br2"),
                                                    group))
    assert sorted(cfgs) == ["br2", "dc", "dr", "main"]
    for host, cfg in cfgs.items():
        assert cfg["node"] == {"name": host, "data_dir": str(tmp_path / host / "data_dir")}
        assert not {"peers", "service", "volumes", "snapshots", "iscsi"} & set(cfg)
        assert cfg["sites"] == group["nbdgw_sites"]
        assert [g["name"] for g in cfg["groups"]] == ["b1", "b2", "core"]
        assert "clients" not in cfg["groups"][0]  # the firewall's, not the config's
        assert cfg["groups"][1]["service"]["dns"]["key_file"] == str(
            tmp_path / host / "config_dir" / "dns.key")
        assert cfg["groups"][2]["snapshots"] == group["nbdgw_groups"][2]["snapshots"]
        config_check(cfg["__path"])
    assert cfgs["dc"]["nbd"]["allow"] == ["192.0.2.0/24", "198.51.100.0/24"]
    # dc: replica of b1 (from main) and b2 (from br2), primary of core (dr and main).
    nft = cfgs["dc"]["__nft"]
    assert "tcp dport 7801 ip saddr != @g_b1_peers4 drop" in nft
    assert re.search(r"set g_b1_peers4 \{[^}]*elements = \{ 127\.0\.0\.1 \}", nft)
    assert re.search(r"set g_b1_sites4 \{[^}]*elements = \{ 127\.0\.0\.1, 127\.0\.0\.3 \}",
                     nft)
    assert re.search(r"set g_b2_clients4 \{[^}]*elements = \{ 198\.51\.100\.0/24 \}", nft)
    assert "tcp dport 10821 ip saddr != @g_core_clients4" not in nft  # core: no clients
    # dr only witnesses b1 and b2 (heartbeats only) but holds core's data.
    nft = cfgs["dr"]["__nft"]
    assert "tcp dport 7801" not in nft and "tcp dport 7811" not in nft
    assert "udp dport 7802 ip saddr != @g_b1_sites4 drop" in nft
    assert "tcp dport 7821 ip saddr != @g_core_peers4 drop" in nft
    # br2 is in b2 only: nothing about b1's or core's ports.
    assert not re.search(r"dport (7801|7802|7821|7822|10811|10821) ", cfgs["br2"]["__nft"])


def shared_port_vars(*shared: str) -> dict[str, Any]:
    """groups_vars with the groups ``shared`` on the node's shared peerlink port (no
    ports.peerlink of their own), nbdgw_peerlink_listen 0.0.0.0:7789 on every site."""
    group = groups_vars()
    for g in group["nbdgw_groups"]:
        if g["name"] in shared:
            del g["ports"]["peerlink"]
    group["nbdgw_peerlink_listen"] = "0.0.0.0:7789"
    return group


def shared_port_configs(tmp_path: Path, *shared: str) -> dict[str, dict[str, Any]]:
    """The configs of GROUP_HOSTS with shared_port_vars(``shared``): each has
    peerlink.listen 0.0.0.0:7789, the groups ``shared`` no ports.peerlink, the others
    their own, and each passes `nbdgw config check`."""
    own = (("b1", 7801), ("b2", 7811), ("core", 7821))  # groups_vars' ports.peerlink
    group = shared_port_vars(*shared)
    cfgs = render_configs(tmp_path, write_inventory(tmp_path, GROUP_HOSTS, group))
    for cfg in cfgs.values():
        assert cfg["peerlink"]["listen"] == "0.0.0.0:7789"
        assert [(g["name"], g["ports"].get("peerlink", "none")) for g in cfg["groups"]] == [
            (name, "none" if name in shared else port) for name, port in own]
        config_check(cfg["__path"])
    return cfgs


def nft_set(nft: str, name: str) -> list[str]:
    """The elements of set ``name`` in a rendered nft file ([] when it has none)."""
    m = re.search(r"\n    set " + name + r" \{\n(.*?)\n    \}", nft, re.DOTALL)
    assert m, f"no set {name} in:\n{nft}"
    e = re.search(r"elements = \{ ([^}]*) \}", m.group(1))
    return e.group(1).split(", ") if e else []


def test_groups_on_the_shared_peerlink_port(tmp_path: Path) -> None:
    """Every group without ports.peerlink: each site's config has peerlink.listen (the
    groups none of their own), and its firewall one rule for the shared port admitting
    the other data sites of every group it holds data of, never a group's witness; no
    per-group peerlink rule. Each config passes `nbdgw config check`."""
    cfgs = shared_port_configs(tmp_path, "b1", "b2", "core")
    for host in GROUP_HOSTS:
        assert "_peers4 drop" not in cfgs[host]["__nft"].replace("@shared_peers4 drop", "")
    # dc: replica of b1 (from main) and b2 (from br2), primary of core (to dr).
    nft = cfgs["dc"]["__nft"]
    assert "tcp dport 7789 ip saddr != @shared_peers4 drop" in nft
    assert "tcp dport 7789 ip6 saddr != @shared_peers6 drop" in nft
    assert nft_set(nft, "shared_peers4") == ["127.0.0.1", "127.0.0.3", "127.0.0.4"]
    assert nft_set(nft, "shared_peers6") == []
    # dr: core's secondary (dc its only other data site); it witnesses b1 and b2, and
    # main witnesses core: neither main nor br2 reaches dr's shared port.
    assert nft_set(cfgs["dr"]["__nft"], "shared_peers4") == ["127.0.0.2"]
    # main: b1's primary (dc); core's witness only (dr is not admitted).
    assert nft_set(cfgs["main"]["__nft"], "shared_peers4") == ["127.0.0.2"]
    assert nft_set(cfgs["br2"]["__nft"], "shared_peers4") == ["127.0.0.2"]


def test_groups_mixed_own_and_shared_peerlink_ports(tmp_path: Path) -> None:
    """b1 keeps its own port 7801, b2 and core are on the shared one: dc admits main to
    7801 (b1's rule, as before) and br2 and dr to 7789; main, which only witnesses core
    of the shared groups, has no rule and no set for the shared port."""
    cfgs = shared_port_configs(tmp_path, "b2", "core")
    nft = cfgs["dc"]["__nft"]
    assert "tcp dport 7801 ip saddr != @g_b1_peers4 drop" in nft
    assert nft_set(nft, "g_b1_peers4") == ["127.0.0.1"]
    assert "tcp dport 7789 ip saddr != @shared_peers4 drop" in nft
    assert nft_set(nft, "shared_peers4") == ["127.0.0.3", "127.0.0.4"]
    assert "g_b2_peers" not in nft and "g_core_peers" not in nft
    main = cfgs["main"]["__nft"]
    assert "tcp dport 7801 ip saddr != @g_b1_peers4 drop" in main
    assert "7789" not in main and "shared_peers" not in main
    assert re.findall(r"dport (\d+) ip saddr", cfgs["br2"]["__nft"]) == ["7812", "10812", "7789"]


def test_the_shared_peerlink_port_differs_between_sites(tmp_path: Path) -> None:
    """nbdgw_peerlink_listen with another port on one site: each site connects to its
    peers on its own port, so the run stops before anything is rendered."""
    group = shared_port_vars("b2")
    inv = write_inventory(tmp_path, ("dc", "br2"), group)
    data = yaml.safe_load(inv.read_text())
    data["nbdgw"]["hosts"]["br2"]["nbdgw_peerlink_listen"] = "127.0.0.4:7790"
    inv.write_text(yaml.safe_dump(data, sort_keys=False))
    dest = tmp_path / "rendered"
    dest.mkdir()
    playbook = tmp_path / "render.yml"
    playbook.write_text(RENDER_PLAYBOOK.format(role=DEPLOY / "roles" / "nbdgw", dest=dest))
    run = run_playbook(str(playbook), inv, timeout=120)
    assert run.rc != 0, run
    assert run.failures("dc") == [
        'nbdgw_peerlink_listen is "0.0.0.0:7789" on dc but "127.0.0.4:7790" on br2: the '
        "shared peerlink port is the same on every site (each connects to its peers on its "
        "own port)"], run
    assert run.failures("br2") == [
        'nbdgw_peerlink_listen is "127.0.0.4:7790" on br2 but "0.0.0.0:7789" on dc: the '
        "shared peerlink port is the same on every site (each connects to its peers on its "
        "own port)"], run
    assert not any(dest.iterdir())


def test_a_site_that_only_witnesses_renders_as_a_witness(tmp_path: Path) -> None:
    """A site in groups only as their witness (wit: core's) holds no data: no nbd,
    journal or activity_log section, `nbdgw witness` in its unit, only the heartbeat port
    of each group in its firewall; its config (naming b2's DNS key file, as every site's
    does) passes `nbdgw config check`."""
    group = groups_vars()
    group["nbdgw_sites"].append({"name": "wit", "address": "127.0.0.5"})
    group["nbdgw_groups"][2]["witness"] = "wit"
    cfgs = render_configs(tmp_path, write_inventory(tmp_path, ("wit", "main"), group))
    wit = cfgs["wit"]
    assert not {"nbd", "journal", "activity_log"} & set(wit)
    assert "\nDescription=nbdgw node wit with volume groups (core: witness)\n" in wit["__unit"]
    assert "--log-format json witness\n" in wit["__unit"]
    assert re.findall(r"dport \d+ ip6? saddr", wit["__nft"]) == [
        "dport 7822 ip saddr", "dport 7822 ip6 saddr"]
    config_check(wit["__path"])
    # It runs no nbdkit, libnbd client or FUSE: only the venv (and the firewall's nft).
    assert wit["__packages"] == ["python3-venv", "nftables"]
    assert {"nbdkit", "nbdkit-plugin-python", "python3-libnbd"} <= set(cfgs["main"]["__packages"])
    # main, no longer core's witness, is in b1 only.
    assert re.findall(r"dport (\d+) ip saddr", cfgs["main"]["__nft"]) == ["7801", "7802", "10811"]


def test_the_fanin_example_renders_every_site_with_its_groups(tmp_path: Path) -> None:
    """deploy/examples/fanin with its placeholders replaced: five sites, four groups,
    dc in every one (replica of the three branches, primary of core), and every config
    passes `nbdgw config check`."""
    extra = {"vault_nbdgw_peer_secret": "0123456789abcdef0123456789abcdef",
             "vault_nbdgw_service_dns_key": TSIG_KEY}
    cfgs = render_configs(tmp_path, DEPLOY / "examples" / "fanin" / "inventory.yml", "-e",
                          json.dumps(extra))
    assert sorted(cfgs) == ["branch1", "branch2", "branch3", "dc", "dr"]
    for cfg in cfgs.values():
        assert [g["name"] for g in cfg["groups"]] == ["b1", "b2", "b3", "core"]
        config_check(cfg["__path"])
    roles = "b1: secondary, b2: secondary, b3: secondary, core: primary"
    assert f"# nbdgw node config for dc with volume groups ({roles})" in \
        cfgs["dc"]["__path"].read_text()
    assert f"Description=nbdgw node dc with volume groups ({roles})\n" in cfgs["dc"]["__unit"]
    # dr: witness of the branches' groups but holds core's data: the daemon, not a witness.
    assert "--log-format json daemon\n" in cfgs["dr"]["__unit"]
    # The branches share each site's one peerlink port; core keeps its own (7831).
    assert {cfg["peerlink"]["listen"] for cfg in cfgs.values()} == {"0.0.0.0:7789"}
    assert "tcp dport 7789 ip saddr != @shared_peers4 drop" in cfgs["dc"]["__nft"]
    assert nft_set(cfgs["dc"]["__nft"], "shared_peers4") == ["10.1.0.10", "10.2.0.10",
                                                             "10.3.0.10"]
    assert "tcp dport 7831 ip saddr != @g_core_peers4 drop" in cfgs["dc"]["__nft"]
    assert "shared_peers" not in cfgs["dr"]["__nft"]  # it only witnesses the branches
    assert nft_set(cfgs["branch2"]["__nft"], "shared_peers4") == ["10.9.0.10"]


GROUP_HOSTS = ("main", "dc", "dr", "br2")


def run_with_stand_ins(tmp_path: Path, group: dict[str, Any], playbook: str, *args: str,
                       hosts: tuple[str, ...] = GROUP_HOSTS
                       ) -> tuple[Run, dict[str, list[str]]]:
    """``playbook`` on the four local hosts of groups_vars, each host's nbdgw a stand-in
    that records its arguments and succeeds (the product's own commands are tested
    elsewhere; here: which host runs what), `systemctl is-active` a stand-in saying
    "active". Returns the run and each host's recorded commands."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text("#!/bin/sh\n[ \"$1\" = is-active ] && exit 0\nexit 99\n")
    for host in hosts:
        nbdgw = tmp_path / host / "venv_dir" / "bin" / "nbdgw"
        nbdgw.parent.mkdir(parents=True)
        nbdgw.write_text('#!/bin/sh\necho "$*" >> "$(dirname "$0")/calls"\n')
        (tmp_path / host / "config_dir").mkdir()
    for f in [bin_dir / "systemctl", *tmp_path.glob("*/venv_dir/bin/nbdgw")]:
        f.chmod(0o755)
    inv = write_inventory(tmp_path, hosts, group)
    proc = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", str(inv), playbook,
                           *args], cwd=DEPLOY, capture_output=True, text=True, timeout=300,
                          env=ansible_env() | {"PATH": f"{VENV_BIN}:{bin_dir}:"
                                                       f"{os.environ['PATH']}"},
                          check=False)
    calls = {}
    for host in hosts:
        f = tmp_path / host / "venv_dir" / "bin" / "calls"
        calls[host] = f.read_text().splitlines() if f.exists() else []
    return Run(proc), calls


@pytest.mark.skipif(os.geteuid() != 0, reason="the role makes the config root's")
def test_switchover_of_a_group_runs_on_its_primary_and_rewrites_its_entry(
        tmp_path: Path) -> None:
    """switchover.yml -e nbdgw_group=b1: `nbdgw --group b1 switchover --to dc` on b1's
    primary only; then every site's config has b1 with dc primary and main secondary
    (the other groups as they were), and each passes `nbdgw config check`."""
    group = groups_vars()
    run, calls = run_with_stand_ins(tmp_path, group, "switchover.yml", "-e", "nbdgw_group=b1",
                                    "-e", "nbdgw_switchover_to=dc")
    assert run.rc == 0, run
    config = tmp_path / "main" / "config_dir" / "nbdgw.yaml"
    # Each rewritten config went through (the stand-in's) `config check` first.
    assert all(c.pop().endswith(".yaml config check") for c in calls.values()), calls
    assert calls == {"main": ["switchover --help",
                              f"-c {config} --group b1 switchover --to dc"],
                     "dc": [], "dr": [], "br2": []}
    want = copy.deepcopy(group["nbdgw_groups"])
    want[0].update(primary="dc", secondary="main")
    for host in GROUP_HOSTS:
        path = tmp_path / host / "config_dir" / "nbdgw.yaml"
        cfg = yaml.safe_load(path.read_text())
        assert [{k: g[k] for k in ("name", "primary", "secondary", "witness")}
                for g in cfg["groups"]] == [
            {k: g[k] for k in ("name", "primary", "secondary", "witness")} for g in want]
        config_check(path)
    assert ('dc is primary now of group b1. Set its entry in nbdgw_groups to {"primary": '
            '"dc", "secondary": "main", "witness": "dr"} so that site.yml keeps them.'
            ) in run.messages(), run


@pytest.mark.skipif(os.geteuid() != 0, reason="the role makes the config root's")
def test_switchover_without_groups_runs_as_before(tmp_path: Path) -> None:
    """The same run on a single-group inventory: `nbdgw switchover --to dc` (no --group)
    on the primary, every config rewritten with the roles swapped, the same message."""
    run, calls = run_with_stand_ins(tmp_path, site_vars(), "switchover.yml", "-e",
                                    "nbdgw_switchover_to=dc", hosts=SITES)
    assert run.rc == 0, run
    assert all(c.pop().endswith(".yaml config check") for c in calls.values()), calls
    config = tmp_path / "main" / "config_dir" / "nbdgw.yaml"
    assert calls == {"main": ["switchover --help", f"-c {config} switchover --to dc"],
                     "dc": [], "dr": []}
    for host, role in (("main", "secondary"), ("dc", "primary"), ("dr", "dr")):
        cfg = yaml.safe_load((tmp_path / host / "config_dir" / "nbdgw.yaml").read_text())
        assert cfg["node"]["role"] == role
    assert ('dc is primary now. Set the roles in nbdgw_sites to {"main": "secondary", '
            '"dc": "primary", "dr": "dr"} so that site.yml keeps them.') in run.messages(), run


def test_promote_dr_of_a_group_runs_on_its_dr_site(tmp_path: Path) -> None:
    """promote-dr.yml -e nbdgw_group=core (br2 its DR site): `nbdgw --group core promote
    --site br2` on br2 only."""
    group = groups_vars()
    del group["nbdgw_groups"][2]["witness"]
    group["nbdgw_groups"][2]["dr"] = "br2"
    run, calls = run_with_stand_ins(tmp_path, group, "promote-dr.yml", "-e",
                                    "nbdgw_group=core", "-e", "nbdgw_promote_dr_confirm=br2")
    assert run.rc == 0, run
    config = tmp_path / "br2" / "config_dir" / "nbdgw.yaml"
    assert calls == {"main": [], "dc": [], "dr": [],
                     "br2": ["promote --help", f"-c {config} --group core promote --site br2"]}


def test_a_role_change_in_a_group_is_refused(tmp_path: Path) -> None:
    """dc's config on disk makes it primary of b1; the inventory says secondary: refused
    per group, naming it, before anything is written. A group the config does not know
    yet (b2, core: as add-branch.yml adds one) is no change."""
    inv = write_inventory(tmp_path, ("dc",), groups_vars())
    config = tmp_path / "dc" / "config_dir" / "nbdgw.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("version: 1\nnode: {name: dc}\n"
                      "groups: [{name: b1, primary: dc, secondary: main, witness: dr}]\n")
    run = run_playbook("site.yml", inv, timeout=180)
    assert run.rc != 0, run
    assert run.failures() == [
        f"nbdgw_groups gives dc the role secondary in group b1 but its config ({config}) "
        "says primary: roles move with switchover.yml or promote-dr.yml (-e nbdgw_group=G); "
        "set nbdgw_allow_role_change=true to redefine the cluster on purpose"], run
    assert run.changed() == [], run
    assert sorted(p.name for p in (tmp_path / "dc").iterdir()) == ["config_dir"]


# --- the operations playbooks refuse without their confirmation -------------------------

def witness_vars() -> dict[str, Any]:
    """site_vars with the witness wit (127.0.0.4) in the DR site's place."""
    group = site_vars()
    group["nbdgw_sites"][2] = dict(WITNESS_SITE)
    return group


GROUP_OPS = "the inventory has volume groups (b1, b2, core); name the one to act on"
REFUSALS = [  # (playbook, the sites' vars, extra arguments, the one failure it must print)
    ("promote-dr.yml", site_vars, (),
     "promote-dr.yml makes dr the primary of every volume; it runs only when confirmed "
     'with -e nbdgw_promote_dr_confirm=dr (got "nothing")'),
    ("promote-dr.yml", site_vars, ("-e", "nbdgw_promote_dr_confirm=yes"),
     "promote-dr.yml makes dr the primary of every volume; it runs only when confirmed "
     'with -e nbdgw_promote_dr_confirm=dr (got "yes")'),
    ("switchover.yml", site_vars, (),
     "nbdgw_switchover_to is not set: name the site that becomes primary, e.g. "
     "-e nbdgw_switchover_to=dc"),
    ("switchover.yml", site_vars, ("-e", "nbdgw_switchover_to=main"),
     "nbdgw_switchover_to is 'main': expected one of dc, dr (the sites that are not "
     "primary)"),
    ("switchover.yml", witness_vars, ("-e", "nbdgw_switchover_to=wit"),
     "nbdgw_switchover_to is 'wit': wit is the witness, which holds no data and is never "
     "primary; expected one of dc (the sites that are not primary)"),
    ("promote-dr.yml", witness_vars, ("-e", "nbdgw_promote_dr_confirm=wit"),
     "nbdgw_sites has no site with role dr: there is nothing to promote; wit is the "
     "witness, which holds no data and is never primary (with the primary lost, the "
     "secondary takes over by automatic failover)"),
    # With volume groups: the operations act on one named group.
    ("switchover.yml", groups_vars, ("-e", "nbdgw_switchover_to=dc"),
     f"nbdgw_group is not set: {GROUP_OPS}, e.g. -e nbdgw_group=b1"),
    ("promote-dr.yml", groups_vars, ("-e", "nbdgw_group=b9"),
     "nbdgw_group is \"b9\": expected one of b1, b2, core"),
    ("switchover.yml", groups_vars, ("-e", "nbdgw_group=b1", "-e", "nbdgw_switchover_to=dr"),
     "nbdgw_switchover_to is 'dr': dr is the witness, which holds no data and is never "
     "primary; expected one of dc (the sites that are not primary)"),
    ("switchover.yml", groups_vars, ("-e", "nbdgw_group=core", "-e", "nbdgw_switchover_to=dc"),
     "nbdgw_switchover_to is 'dc': expected one of dr (the sites that are not primary)"),
    ("promote-dr.yml", groups_vars, ("-e", "nbdgw_group=b1", "-e", "nbdgw_promote_dr_confirm=dr"),
     "nbdgw_groups[0] (b1) has no dr: there is nothing to promote; dr is the witness, which "
     "holds no data and is never primary (with the primary lost, the secondary takes over "
     "by automatic failover)"),
    ("switchover.yml", site_vars, ("-e", "nbdgw_group=b1"),
     'nbdgw_group is "b1", but the inventory has no volume groups (nbdgw_groups): the '
     "playbook acts on the whole node; leave nbdgw_group out"),
    ("add-branch.yml", groups_vars, (),
     "nbdgw_add_group is not set: name the group to add (already in nbdgw_groups), e.g. "
     "-e nbdgw_add_group=core"),
    ("add-branch.yml", groups_vars, ("-e", "nbdgw_add_group=b4"),
     'nbdgw_add_group is "b4": no such group in nbdgw_groups (b1, b2, core); write the '
     "group there first"),
    ("add-branch.yml", site_vars, ("-e", "nbdgw_add_group=b4"),
     'nbdgw_add_group is "b4" but the inventory has no volume groups (nbdgw_groups): '
     "add-branch.yml adds a group to an inventory of groups"),
    ("add-branch.yml", groups_vars, ("-e", "nbdgw_add_group=b2"),
     "nbdgw_add_group b2: its site(s) br2, dc, dr are not among the hosts of this play "
     "(main): nothing was changed"),
]


@pytest.mark.parametrize(("playbook", "group", "args", "failure"), REFUSALS,
                         ids=["promote-dr-unconfirmed", "promote-dr-wrong-confirmation",
                              "switchover-no-target", "switchover-to-the-primary",
                              "switchover-to-the-witness", "promote-dr-the-witness",
                              "groups-switchover-no-group", "groups-promote-unknown-group",
                              "groups-switchover-to-the-witness",
                              "groups-switchover-to-the-primary",
                              "groups-promote-a-witnessed-group", "group-without-groups",
                              "add-branch-no-group", "add-branch-unknown-group",
                              "add-branch-without-groups", "add-branch-sites-missing"])
def test_operations_playbook_refuses(tmp_path: Path, playbook: str,
                                     group: Callable[[], dict[str, Any]],
                                     args: tuple[str, ...], failure: str) -> None:
    inv = write_inventory(tmp_path, ("main",), group())
    run = run_playbook(playbook, inv, *args, timeout=120)
    assert run.rc != 0, run
    assert run.failures() == [failure], run


@pytest.mark.parametrize("playbook", ["site.yml", "upgrade.yml"])
def test_site_and_upgrade_deploy_the_witness(tmp_path: Path, playbook: str) -> None:
    """The witness host is one of the hosts the role runs on (not left out as a role no
    play names): its config on disk says otherwise, and the role's own refusal stops it."""
    inv = write_inventory(tmp_path, ("wit",), witness_vars())
    config = tmp_path / "wit" / "config_dir" / "nbdgw.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("version: 1\nnode: {name: wit, role: secondary}\n")
    run = run_playbook(playbook, inv, timeout=180)
    assert run.rc != 0, run
    assert run.failures() == [
        f"nbdgw_sites gives wit the role witness but its config ({config}) says secondary: "
        "roles move with switchover.yml or promote-dr.yml; set nbdgw_allow_role_change=true "
        "to redefine the cluster on purpose"], run
    assert run.changed() == [], run


def test_upgrade_stops_without_systemd(tmp_path: Path) -> None:
    """Here systemd does not run: the rolling upgrade cannot see the other main-site node
    and must stop before touching anything (it never guesses)."""
    if Path("/run/systemd/system").exists():
        pytest.skip("systemd runs on this machine; this test is about a host without it")
    inv = write_inventory(tmp_path, ("main", "dc"), site_vars())
    run = run_playbook("upgrade.yml", inv, timeout=120)
    assert run.rc != 0, run
    assert run.failures() == [
        "systemd is not running on dc: upgrade.yml cannot tell whether the other main-site "
        "node runs, so it stops here; nothing was changed"], run
    assert not (tmp_path / "main").exists()
    assert not (tmp_path / "dc").exists()


# --- the snapshots and iscsi sections --------------------------------------------------------

RENDER_PLAYBOOK = """
- name: Render the node config only
  hosts: nbdgw
  gather_facts: false
  tasks:
    - name: The role's checks, with its variables made visible to the play
      ansible.builtin.include_role:
        name: nbdgw
        tasks_from: checks.yml
        public: true
    - name: Render the role's node config, firewall and unit templates
      ansible.builtin.template:
        src: "{role}/templates/{{{{ item.src }}}}"
        dest: "{dest}/{{{{ inventory_hostname }}}}.{{{{ item.ext }}}}"
        mode: "0600"
      delegate_to: localhost
      loop:
        - {{src: nbdgw.yaml.j2, ext: yaml}}
        - {{src: nbdgw.nft.j2, ext: nft}}
        - {{src: nbdgw.service.j2, ext: service}}
    - name: The Debian packages the role would install
      ansible.builtin.copy:
        content: "{{{{ __nbdgw_packages | to_json }}}}"
        dest: "{dest}/{{{{ inventory_hostname }}}}.packages"
        mode: "0600"
      delegate_to: localhost
"""


def render_configs(tmp_path: Path, inventory: Path, *args: str) -> dict[str, dict[str, Any]]:
    """The node config each host of ``inventory`` would get, rendered on the controller
    after the role's checks (no host is touched)."""
    dest = tmp_path / "rendered"
    dest.mkdir()
    playbook = tmp_path / "render.yml"
    playbook.write_text(RENDER_PLAYBOOK.format(role=DEPLOY / "roles" / "nbdgw", dest=dest))
    run = run_playbook(str(playbook), inventory, *args, timeout=120)
    assert run.rc == 0, run
    out = {}
    for f in sorted(dest.glob("*.yaml")):
        out[f.stem] = yaml.safe_load(f.read_text()) | {
            "__path": f, "__nft": f.with_suffix(".nft").read_text(),
            "__unit": f.with_suffix(".service").read_text(),
            "__packages": json.loads(f.with_suffix(".packages").read_text())}
    return out


def render_config(tmp_path: Path, group: dict[str, Any]) -> dict[str, Any]:
    return render_configs(tmp_path, write_inventory(tmp_path, ("main",), group))["main"]


FILE_KEYS = (("peerlink", "secret_file"), ("peerlink", "tls", "cert_file"),
             ("peerlink", "tls", "key_file"), ("peerlink", "tls", "ca_file"),
             ("nbd", "tls", "psk_file"), ("iscsi", "chap", "secret_file"),
             ("iscsi", "mutual_chap", "secret_file"), ("service", "dns", "key_file"))


def with_local_files(path: Path) -> Path:
    """A copy of a rendered config whose secret and key files (which the role writes on
    the host, before its own `config check`) exist here: root's, mode 0600."""
    cfg = yaml.safe_load(path.read_text())
    files = path.parent / f"{path.stem}-files"
    files.mkdir(exist_ok=True)
    for keys in FILE_KEYS:
        section = cfg
        for k in keys[:-1]:
            section = section.get(k) or {}
        if keys[-1] not in section:
            continue
        f = files / "-".join(keys)
        f.write_text(TSIG_KEY if keys[1] == "dns"
                     else "a-test-secret-of-32-bytes-length\n" if "chap" not in keys[0] + keys[1]
                     else f"chap-{keys[1]}-0123"[:16] + "\n")
        f.chmod(0o600)
        section[keys[-1]] = str(f)
    for g in cfg.get("groups", []):  # each group's DNS name: the one key file
        if "dns" in g.get("service", {}):
            f = files / "dns.key"
            f.write_text(TSIG_KEY)
            f.chmod(0o600)
            g["service"]["dns"]["key_file"] = str(f)
    out = path.parent / f"{path.stem}-local.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def config_check(path: Path) -> None:
    """The product's own check of a rendered config (its files made locally)."""
    path = with_local_files(path)
    # This tree's gateway, not the one the venv has installed (editable from elsewhere).
    p = subprocess.run([str(VENV_BIN / "nbdgw"), "-c", str(path), "config", "check"],
                       capture_output=True, text=True, timeout=60, check=False,
                       env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("config ok: "), p.stdout


def test_snapshot_schedules_and_iscsi_render_in_the_documented_shape(tmp_path: Path) -> None:
    group = site_vars() | {
        "nbdgw_snapshot_schedules": [
            {"name": "quarter-hourly", "volumes": ["v1", "v2"], "every": "15m", "keep": 8},
            {"name": "nightly", "every": "daily", "keep": 14}],
        "nbdgw_iscsi_enabled": True,
        "nbdgw_iscsi_portal": "0.0.0.0:3260",
        "nbdgw_iscsi_iqn": "iqn.2026-11.com.example:nbdgw",
        "nbdgw_iscsi_initiators": ["iqn.2026-11.com.example:sql1"],
        "nbdgw_iscsi_chap_user": "sql",
        "nbdgw_iscsi_chap_secret": "chap-secret-0123456789",
        "nbdgw_iscsi_mutual_chap_user": "target",
        "nbdgw_iscsi_mutual_chap_secret": "mutual-secret-0123456789",
    }
    cfg = render_config(tmp_path, group)
    etc = tmp_path / "main" / "config_dir"
    assert cfg["snapshots"] == {"schedules": [
        {"name": "quarter-hourly", "volumes": ["v1", "v2"], "every": "15m", "keep": 8},
        {"name": "nightly", "every": "daily", "keep": 14}]}
    assert cfg["iscsi"] == {
        "enabled": True, "portal": "0.0.0.0:3260", "iqn": "iqn.2026-11.com.example:nbdgw",
        "chap": {"user": "sql", "secret_file": f"{etc}/iscsi-chap.secret"},
        "mutual_chap": {"user": "target", "secret_file": f"{etc}/iscsi-mutual-chap.secret"},
        "initiators": ["iqn.2026-11.com.example:sql1"], "route": "file",
        "fuse": "nbdkit"}
    assert "chap-secret" not in cfg["__path"].read_text()
    config_check(cfg["__path"])


def test_the_readers_iscsi_portal_renders_where_it_is_set(tmp_path: Path) -> None:
    """nbdgw_iscsi_readers_portal, per host: iscsi.readers_portal in the config of each
    site that sets it, the primary's too (read only while not primary: a demoted node
    has it without a new site.yml run), none elsewhere; the configs pass `nbdgw config
    check`."""
    group = site_vars() | {"nbdgw_iscsi_enabled": True,
                           "nbdgw_iscsi_portal": "192.0.2.10:3260",  # the service address
                           "nbdgw_iscsi_iqn": "iqn.2026-11.com.example:nbdgw"}
    inv = write_inventory(tmp_path, SITES, group)
    data = yaml.safe_load(inv.read_text())
    portals = {"main": "127.0.0.1:3261", "dc": "[::1]:3262"}  # dr: none
    for host, portal in portals.items():
        data["nbdgw"]["hosts"][host]["nbdgw_iscsi_readers_portal"] = portal
    inv.write_text(yaml.safe_dump(data, sort_keys=False))
    cfgs = render_configs(tmp_path, inv)
    assert sorted(cfgs) == ["dc", "dr", "main"]
    for host, cfg in cfgs.items():
        assert cfg["iscsi"]["portal"] == "192.0.2.10:3260"
        assert cfg["iscsi"].get("readers_portal") == portals.get(host), host
        config_check(cfg["__path"])


def test_iscsi_with_groups_renders_without_a_node_portal(tmp_path: Path) -> None:
    """With groups the node's iscsi section has no portal (each group served over iSCSI
    has its own, groups[].ports.iscsi); a witness-only site gets none; configs pass
    `nbdgw config check` (which refused iscsi with groups before)."""
    group = groups_vars() | {"nbdgw_iscsi_enabled": True,
                             "nbdgw_iscsi_iqn": "iqn.2026-11.com.example:nbdgw",
                             "nbdgw_iscsi_chap_user": "sql",
                             "nbdgw_iscsi_chap_secret": "chap-secret-0123456789"}
    group["nbdgw_groups"][0]["ports"]["iscsi"] = 3261
    group["nbdgw_sites"].append({"name": "wit", "address": "127.0.0.5"})
    group["nbdgw_groups"][2]["witness"] = "wit"
    cfgs = render_configs(tmp_path, write_inventory(tmp_path, ("main", "wit"), group))
    etc = tmp_path / "main" / "config_dir"
    assert cfgs["main"]["iscsi"] == {
        "enabled": True, "iqn": "iqn.2026-11.com.example:nbdgw",
        "chap": {"user": "sql", "secret_file": f"{etc}/iscsi-chap.secret"},
        "initiators": [], "route": "file", "fuse": "nbdkit"}
    assert cfgs["main"]["groups"][0]["ports"]["iscsi"] == 3261
    assert "iscsi" not in cfgs["wit"]
    assert {"tgt", "fuse3"} <= set(cfgs["main"]["__packages"])
    assert "tgt" not in cfgs["wit"]["__packages"]
    for host in ("main", "wit"):
        config_check(cfgs[host]["__path"])


def test_a_dns_name_renders_in_the_documented_shape(tmp_path: Path) -> None:
    """A DNS name instead of the service address (a branch in its own subnet): service.dns
    as README "Service names by DNS" shows it, the key a file the config names, the
    address this site's own by default; `nbdgw config check` reads the key."""
    group = site_vars() | DNS | {"nbdgw_service_dns_ttl": 10}
    del group["nbdgw_service_address"]
    del group["nbdgw_service_interface"]
    cfg = render_config(tmp_path, group)
    etc = tmp_path / "main" / "config_dir"
    assert cfg["service"] == {"dns": {
        "name": "db.branch1.example.com", "zone": "example.com", "servers": ["192.0.2.53"],
        "key_file": f"{etc}/dns.key", "address": "127.0.0.1", "ttl": 10}}
    assert TSIG_SECRET not in cfg["__path"].read_text()
    config_check(cfg["__path"])


def test_a_dns_name_and_a_service_address_render_together(tmp_path: Path) -> None:
    group = site_vars() | DNS | {"nbdgw_service_dns_address": "203.0.113.11",
                                 "nbdgw_service_dns_servers": ["192.0.2.53:5353",
                                                               "[2001:db8::53]:53"]}
    cfg = render_config(tmp_path, group)
    assert cfg["service"]["address"] == "192.0.2.10/24"
    assert cfg["service"]["interface"] == "lo"
    assert cfg["service"]["dns"]["address"] == "203.0.113.11"
    assert cfg["service"]["dns"]["servers"] == ["192.0.2.53:5353", "[2001:db8::53]:53"]
    assert cfg["service"]["dns"]["ttl"] == 30
    config_check(cfg["__path"])


def test_a_witness_renders_in_the_documented_shape(tmp_path: Path) -> None:
    """A pair and a witness (README "A pair and a witness"): the witness's config has no
    volumes, service address or name, NBD, snapshots or iSCSI (the inventory's shared
    variables set them all), automatic failover on, the data sites as its peers without
    replication settings; the data sites name it `role: witness` with no mode and never
    ship to it; its unit runs `nbdgw witness`; its firewall guards the heartbeat port
    only; and every config passes `nbdgw config check`."""
    from gateway.config import load_config

    group = witness_vars() | DNS | {
        "nbdgw_snapshot_schedules": [{"name": "nightly", "every": "daily", "keep": 14}],
        "nbdgw_iscsi_enabled": True, "nbdgw_iscsi_iqn": "iqn.2026-11.com.example:nbdgw",
        "nbdgw_peerlink_tls_cert": "", "nbdgw_nbd_tls_mode": "off"}
    cfgs = render_configs(tmp_path, write_inventory(tmp_path, ("main", "dc", "wit"), group))
    wit = cfgs["wit"]
    prefix = tmp_path / "wit"
    assert {k: v for k, v in wit.items() if not k.startswith("__")} == {
        "version": 1,
        "node": {"name": "wit", "data_dir": f"{prefix}/data_dir", "role": "witness"},
        "peerlink": {"listen": "127.0.0.4:7789", "topology": "fanout",
                     "secret_file": f"{prefix}/config_dir/peer.secret"},
        "peers": [{"name": "main", "role": "primary", "address": "127.0.0.1"},
                  {"name": "dc", "role": "secondary", "address": "127.0.0.2"}],
        "failover": {"auto": True, "heartbeat_port": 7790, "interval": 0.5, "timeout": 2.0,
                     "fence_margin": 1.0}}
    assert "ExecStart=" in wit["__unit"]
    assert "--log-format json witness\n" in wit["__unit"]
    assert "--log-format json daemon\n" in cfgs["main"]["__unit"]
    # The witness: heartbeats from both data sites; no peerlink, no NBD rule.
    assert "elements = { 127.0.0.1, 127.0.0.2 }" in wit["__nft"]
    assert "udp dport 7790 ip saddr != @sites4 drop" in wit["__nft"]
    assert "tcp dport" not in wit["__nft"]
    # A data site: peerlink from the other data site only, heartbeats from both others.
    main_nft = cfgs["main"]["__nft"]
    assert "set peers4 {\n        type ipv4_addr; flags interval;\n        elements = " \
        "{ 127.0.0.2 }" in main_nft
    assert "set sites4 {\n        type ipv4_addr; flags interval;\n        elements = " \
        "{ 127.0.0.2, 127.0.0.4 }" in main_nft
    assert "tcp dport 7789 ip saddr != @peers4 drop" in main_nft
    assert "tcp dport { 10809 } ip saddr != @nbd_clients4 drop" in main_nft
    assert {p["name"]: p for p in cfgs["main"]["peers"]}["wit"] == {
        "name": "wit", "role": "witness", "address": "127.0.0.4"}
    assert {p["name"]: p.get("mode") for p in cfgs["dc"]["peers"]} == {
        "main": "sync", "wit": None}
    for host, cfg in cfgs.items():
        config_check(cfg["__path"])
        if host != "wit":
            assert cfg["volumes"] and cfg["service"]["dns"]["name"] == DNS[
                "nbdgw_service_dns_name"]
            local = cfg["__path"].parent / f"{host}-local.yaml"
            assert [p.name for p in load_config(local).send_to()] == (
                ["dc"] if host == "main" else [])
    if os.geteuid() == 0 and shutil.which("nft"):
        for host, cfg in cfgs.items():
            nft = tmp_path / f"{host}.nft"
            nft.write_text(cfg["__nft"])
            check = subprocess.run(["nft", "--check", "--file", str(nft)],
                                   capture_output=True, text=True, timeout=30, check=False)
            assert check.returncode == 0, (host, check.stderr)


CONFIG_PLAYBOOK = """
- name: The role's checks and its config step only (no package, no venv, no unit)
  hosts: nbdgw
  gather_facts: false
  tasks:
    - name: The role's checks, with its variables made visible to the play
      ansible.builtin.include_role:
        name: nbdgw
        tasks_from: checks.yml
        public: true
    - name: The role's config step
      ansible.builtin.include_role:
        name: nbdgw
        tasks_from: config.yml
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the role makes the key file root's")
def test_the_dns_key_lands_as_a_root_only_file_the_config_check_reads(tmp_path: Path) -> None:
    """The role's own config step: the key from the inventory becomes dns.key (root, 0600),
    the config is validated by `nbdgw config check` reading that file (this venv's nbdgw
    stands in for the host's), and the key is in neither the config nor the output."""
    group = site_vars() | DNS | {"nbdgw_service_start": False}
    del group["nbdgw_service_address"]
    inv = write_inventory(tmp_path, ("main",), group)
    venv = tmp_path / "main" / "venv_dir" / "bin"
    venv.mkdir(parents=True)
    (venv / "nbdgw").symlink_to(VENV_BIN / "nbdgw")
    playbook = tmp_path / "config.yml"
    playbook.write_text(CONFIG_PLAYBOOK)
    run = run_playbook(str(playbook), inv, timeout=180)
    assert run.rc == 0, run
    etc = tmp_path / "main" / "config_dir"
    key = etc / "dns.key"
    assert key.read_text() == TSIG_KEY
    st = key.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 0, 0o600)
    assert yaml.safe_load((etc / "nbdgw.yaml").read_text())["service"]["dns"]["key_file"] == \
        str(key)
    assert TSIG_SECRET not in (etc / "nbdgw.yaml").read_text()
    assert TSIG_SECRET not in run.proc.stdout + run.proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the role makes the key file root's")
def test_a_witness_of_groups_gets_the_peer_secret_and_the_dns_key_only(tmp_path: Path) -> None:
    """The role's config step on a site that only witnesses (wit, core's witness): it
    writes peer.secret and dns.key (the config every site shares names b2's key file, and
    `nbdgw config check` reads it: this tree's nbdgw stands in for the host's), nothing
    else, and the config passes the check."""
    group = groups_vars() | {"nbdgw_service_start": False,
                             "nbdgw_nbd_tls_mode": "on", "nbdgw_nbd_tls_psk": "u:0123abcd"}
    group["nbdgw_sites"].append({"name": "wit", "address": "127.0.0.5"})
    group["nbdgw_groups"][2]["witness"] = "wit"
    inv = write_inventory(tmp_path, ("wit",), group)
    venv = tmp_path / "wit" / "venv_dir" / "bin"
    venv.mkdir(parents=True)
    (venv / "nbdgw").write_text(f'#!/bin/sh\nPYTHONPATH={ROOT} exec {VENV_BIN / "nbdgw"} "$@"\n')
    (venv / "nbdgw").chmod(0o755)
    playbook = tmp_path / "config.yml"
    playbook.write_text(CONFIG_PLAYBOOK)
    run = run_playbook(str(playbook), inv, timeout=180)
    assert run.rc == 0, run
    etc = tmp_path / "wit" / "config_dir"
    assert sorted(p.name for p in etc.iterdir()) == ["dns.key", "nbdgw.yaml", "peer.secret"]
    assert (etc / "dns.key").read_text() == TSIG_KEY


def test_without_snapshots_and_iscsi_the_sections_are_absent(tmp_path: Path) -> None:
    cfg = render_config(tmp_path, site_vars())
    assert "snapshots" not in cfg
    assert "iscsi" not in cfg
    assert cfg["service"] == {"address": "192.0.2.10/24", "interface": "lo"}  # no dns
    assert cfg["volumes"] == [{"name": "v1", "size": "64M", "read_only": False},
                              {"name": "v2", "size": 16777216, "read_only": False}]


def test_the_example_inventory_renders_three_coherent_configs(tmp_path: Path) -> None:
    """deploy/examples with its placeholders replaced: each site's config names the other
    two as peers, with the same roles, and passes `nbdgw config check`."""
    extra = {"vault_nbdgw_peer_secret": "0123456789abcdef0123456789abcdef",
             "vault_nbdgw_iscsi_chap_secret": "chap-0123456789abcdef"}
    cfgs = render_configs(tmp_path, DEPLOY / "examples" / "inventory.yml", "-e",
                          json.dumps(extra))
    assert sorted(cfgs) == ["dc", "dr", "main"]
    roles = {"main": "primary", "dc": "secondary", "dr": "dr"}
    for host, cfg in cfgs.items():
        assert cfg["node"]["role"] == roles[host]
        assert {p["name"]: p["role"] for p in cfg["peers"]} == {
            k: v for k, v in roles.items() if k != host}
        assert cfg["service"] == {"address": "192.0.2.10/24", "interface": "eth0"}
    assert cfgs["main"]["peers"][0] == {"name": "dc", "role": "secondary",
                                        "address": "192.0.2.12", "mode": "sync",
                                        "sync_timeout": 5}
    # Sync is the main-site pair's: dc names main sync too (for when it is primary), and
    # DR names nobody sync (the config check refuses that).
    assert {p["name"]: p.get("mode") for p in cfgs["dc"]["peers"]} == {
        "main": "sync", "dr": "async"}
    assert [p.get("mode") for p in cfgs["dr"]["peers"]] == [None, None]
    # The replicas' LUNs on each replica site's own address (set per host).
    assert {h: cfg["iscsi"].get("readers_portal") for h, cfg in cfgs.items()} == {
        "main": None, "dc": "192.0.2.12:3260", "dr": "198.51.100.20:3260"}
    for cfg in cfgs.values():
        config_check(cfg["__path"])


def test_the_branch_example_refuses_its_placeholder_secrets(tmp_path: Path) -> None:
    """deploy/examples/branch as shipped stops at its vault placeholders, the DNS key's
    among them (connection and paths forced local, as for the main example)."""
    extra = {"ansible_connection": "local", "ansible_python_interpreter": "/usr/bin/python3",
             "ansible_become": False, "nbdgw_sysctl_apply": False}
    for v in PATH_VARS:
        extra[f"nbdgw_{v}"] = str(tmp_path / v)
    run = run_playbook("site.yml", DEPLOY / "examples" / "branch" / "inventory.yml", "-e",
                       json.dumps(extra), timeout=180)
    assert run.rc != 0, run
    assert sorted(set(run.failures())) == [
        f"{name} is still a placeholder: put the real value in Ansible Vault "
        "(ansible-vault encrypt_string) before deploying"
        for name in ("nbdgw_peer_secret", "nbdgw_service_dns_key")], run
    assert not any(tmp_path.iterdir())


def test_the_branch_example_renders_a_dns_name_for_every_site(tmp_path: Path) -> None:
    """deploy/examples/branch with its placeholders replaced: no service address, the DNS
    name on every site, each publishing its own address, and `nbdgw config check` passes."""
    extra = {"vault_nbdgw_peer_secret": "0123456789abcdef0123456789abcdef",
             "vault_nbdgw_service_dns_key": TSIG_KEY}
    cfgs = render_configs(tmp_path, DEPLOY / "examples" / "branch" / "inventory.yml", "-e",
                          json.dumps(extra))
    assert sorted(cfgs) == ["branch1", "dc", "dr"]
    addresses = {"branch1": "203.0.113.11", "dc": "192.0.2.12", "dr": "198.51.100.20"}
    for host, cfg in cfgs.items():
        assert cfg["service"] == {"dns": {
            "name": "db.branch1.example.com", "zone": "example.com",
            "servers": ["192.0.2.53"], "key_file": "/etc/nbdgw/dns.key",
            "address": addresses[host], "ttl": 30}}
        assert cfg["nbd"]["allow"] == ["203.0.113.0/24"]
        config_check(cfg["__path"])


def test_the_witness_example_refuses_its_placeholder_secrets(tmp_path: Path) -> None:
    """deploy/examples/witness as shipped stops at its vault placeholders, on the witness
    as on the data sites (connection and paths forced local)."""
    extra = {"ansible_connection": "local", "ansible_python_interpreter": "/usr/bin/python3",
             "ansible_become": False, "nbdgw_sysctl_apply": False}
    for v in PATH_VARS:
        extra[f"nbdgw_{v}"] = str(tmp_path / v)
    run = run_playbook("site.yml", DEPLOY / "examples" / "witness" / "inventory.yml", "-e",
                       json.dumps(extra), timeout=180)
    assert run.rc != 0, run
    assert sorted(set(run.failures("wit"))) == sorted(set(run.failures())) == [
        f"{name} is still a placeholder: put the real value in Ansible Vault "
        "(ansible-vault encrypt_string) before deploying"
        for name in ("nbdgw_peer_secret", "nbdgw_service_dns_key")], run
    assert not any(tmp_path.iterdir())


def test_the_witness_example_renders_a_pair_and_a_witness(tmp_path: Path) -> None:
    """deploy/examples/witness with its placeholders replaced: branch1 and dc hold the
    volumes and publish the DNS name, each naming wit as `role: witness`; wit's config has
    neither; all three pass `nbdgw config check`."""
    extra = {"vault_nbdgw_peer_secret": "0123456789abcdef0123456789abcdef",
             "vault_nbdgw_service_dns_key": TSIG_KEY}
    cfgs = render_configs(tmp_path, DEPLOY / "examples" / "witness" / "inventory.yml", "-e",
                          json.dumps(extra))
    assert sorted(cfgs) == ["branch1", "dc", "wit"]
    roles = {"branch1": "primary", "dc": "secondary", "wit": "witness"}
    for host, cfg in cfgs.items():
        assert cfg["node"]["role"] == roles[host]
        assert {p["name"]: p["role"] for p in cfg["peers"]} == {
            k: v for k, v in roles.items() if k != host}
        config_check(cfg["__path"])
    for host in ("branch1", "dc"):
        assert cfgs[host]["service"]["dns"]["name"] == "db.branch1.example.com"
        assert [v["name"] for v in cfgs[host]["volumes"]] == ["sql-data", "sql-log"]
        assert {p["name"]: p.get("mode") for p in cfgs[host]["peers"]}["wit"] is None
    assert not {"service", "volumes", "nbd", "snapshots", "iscsi"} & set(cfgs["wit"])
    assert "--log-format json witness\n" in cfgs["wit"]["__unit"]


def test_upgrade_never_restarts_a_main_site_node_while_the_other_is_down(
        tmp_path: Path) -> None:
    """upgrade.yml's guard, with systemd stood in for: `systemctl is-active nbdgw` says
    "inactive" (as on a host whose nbdgw is down), so the other main-site node must not be
    touched. The stand-in is a script first on PATH; every host here is this machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "systemctl"
    fake.write_text("#!/bin/sh\n# is-active: inactive (exit 3); nothing else is expected\n"
                    "[ \"$1\" = is-active ] && exit 3\necho \"unexpected: systemctl $*\" >&2\n"
                    "exit 99\n")
    fake.chmod(0o755)
    inv = write_inventory(tmp_path, ("main", "dc"), site_vars())
    env_path = f"{bin_dir}:{os.environ['PATH']}"
    argv = [str(VENV_BIN / "ansible-playbook"), "-i", str(inv), "upgrade.yml",
            "-e", f"__nbdgw_systemd_dir={tmp_path}"]  # "systemd runs"
    proc = subprocess.run(argv, cwd=DEPLOY, capture_output=True, text=True, timeout=180,
                          env=ansible_env() | {"PATH": f"{VENV_BIN}:{env_path}"}, check=False)
    run = Run(proc)
    assert run.rc != 0, run
    assert run.failures() == [
        "not upgrading dc: nbdgw is not running on the other main-site node main, and "
        "restarting dc now would leave the main site with no node; bring main back first"], run
    assert run.changed() == [], run
    assert not (tmp_path / "main").exists()
    assert not (tmp_path / "dc").exists()


def test_the_etcd_coordinator_renders_in_the_documented_shape(tmp_path: Path) -> None:
    """nbdgw_coordinator_*: the node config's coordinator section, as examples/nbdgw.yaml
    documents it; `nbdgw config check` reads its certificate files."""
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("ca.pem", "etcd.pem", "etcd-key.pem"):
        (certs / name).write_text("-----BEGIN CERTIFICATE-----\n")
        (certs / name).chmod(0o600)
    group = site_vars() | {
        "nbdgw_coordinator_kind": "etcd", "nbdgw_coordinator_group": "branch-17",
        "nbdgw_coordinator_endpoints": ["https://127.0.0.21:2379", "https://127.0.0.22:2379"],
        "nbdgw_coordinator_lease_ttl": 4,
        "nbdgw_coordinator_ca_file": str(certs / "ca.pem"),
        "nbdgw_coordinator_cert_file": str(certs / "etcd.pem"),
        "nbdgw_coordinator_key_file": str(certs / "etcd-key.pem")}
    cfg = render_config(tmp_path, group)
    assert cfg["coordinator"] == {
        "kind": "etcd", "endpoints": ["https://127.0.0.21:2379", "https://127.0.0.22:2379"],
        "group": "branch-17", "prefix": "/nbdgw", "lease_ttl": 4, "poll_interval": 0.5,
        "ca_file": str(certs / "ca.pem"), "cert_file": str(certs / "etcd.pem"),
        "key_file": str(certs / "etcd-key.pem")}
    config_check(cfg["__path"])


def test_the_etcd_coordinator_without_endpoints_is_refused(tmp_path: Path) -> None:
    inv = write_inventory(tmp_path, ("main",), site_vars() | {"nbdgw_coordinator_kind": "etcd"})
    run = run_playbook("site.yml", inv, timeout=180)
    assert run.rc != 0, run
    assert any("etcd needs nbdgw_coordinator_endpoints" in f for f in run.failures()), run
    assert run.changed() == [], run
