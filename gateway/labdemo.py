"""The three-site `make demo` (gateway/demo.py picks it where namespaces work).

Every step uses the product as an operator would: `nbdgw lab` builds the sites (each
runs `nbdgw daemon` from its own config), a client in its own namespace writes and reads
through the service address with libnbd, `nbdgw status` and `nbdgw snapshot` are the
real CLI, and the power cut is SIGKILL of every process of the primary site at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nbdgw_common.errors import GatewayError
from nbdgw_common.proc import run

from . import lab
from .demo import say

PAYLOAD = 16 << 20
FAILOVER_TIMEOUT = 30.0
SYNC_TIMEOUT = 30.0

# Runs in the client namespace: write the payload file to the export in 1 MiB requests
# and flush (argv: uri, file); or, with "read", connect (retrying while the service
# address moves) and print the SHA-256 of the first len(file) bytes.
CLIENT = r"""
import hashlib, sys, time, nbd
uri, path, what = sys.argv[1], sys.argv[2], sys.argv[3]
data = open(path, "rb").read()
deadline = time.monotonic() + 60
while True:
    try:
        h = nbd.NBD(); h.connect_uri(uri); break
    except nbd.Error as e:
        if time.monotonic() > deadline:
            sys.exit(f"no answer from {uri}: {e}")
        time.sleep(0.1)
if what == "write":
    for off in range(0, len(data), 1 << 20):
        h.pwrite(data[off:off + (1 << 20)], off)
    h.flush()
    print(hashlib.sha256(data).hexdigest())
else:
    got = b"".join(h.pread(1 << 20, off) for off in range(0, len(data), 1 << 20))
    print(hashlib.sha256(got).hexdigest())
h.shutdown()
"""


def namespaces_unavailable() -> str | None:
    """Why this machine cannot run the lab, or None if it can (a namespace is made and
    deleted to be sure)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing"
    probe = f"nbdgw-probe-{os.getpid()}"
    try:
        run(["ip", "netns", "add", probe], timeout=10)
    except (GatewayError, OSError) as e:
        return f"'ip netns add' failed ({str(e).strip().splitlines()[-1]})"
    with contextlib.suppress(GatewayError, OSError):
        run(["ip", "netns", "delete", probe], timeout=10)
    return None


def nbdgw_out(config: str, *args: str) -> str:
    return run([*lab.nbdgw_argv(), "-c", config, "--log-format", "json", *args],
               timeout=60).strip()


def client(summary: dict[str, Any], payload: Path, what: str) -> str:
    uri = f"nbd://{summary['service_address']}:{summary['nbd_port']}/v1"
    return run(["ip", "netns", "exec", summary["client_netns"], sys.executable, "-c", CLIENT,
                uri, str(payload), what], timeout=120).strip()


def status(config: str) -> dict[str, Any]:
    return json.loads(nbdgw_out(config, "status", "--json"))  # type: ignore[no-any-return]


def wait_replicated(config: str) -> list[dict[str, Any]]:
    """Until both peers acknowledged the primary's last journal record."""
    deadline = time.monotonic() + SYNC_TIMEOUT
    while True:
        (v,) = status(config)["volumes"]
        peers = v["peers"]
        if len(peers) == 2 and all(p["lag_records"] == 0 for p in peers):
            return [dict(p, last_seq=v["journal_last_seq"]) for p in peers]
        if time.monotonic() > deadline:
            raise GatewayError(f"the replicas did not catch up in {SYNC_TIMEOUT:g} s: "
                               + ", ".join(f"{p['name']} {p['state']} lag "
                                           f"{p['lag_records']}" for p in peers))
        time.sleep(0.2)


def wait_failover(lab_dir: Path, site: str) -> float:
    t0 = time.monotonic()
    the_lab = lab.Lab.load(lab_dir)
    while the_lab.failover_state(site).get("state") != "primary":
        if time.monotonic() - t0 > FAILOVER_TIMEOUT:
            raise GatewayError(f"{site} did not take over in {FAILOVER_TIMEOUT:g} s: "
                               f"{the_lab.failover_state(site)}")
        time.sleep(0.1)
    return time.monotonic() - t0


def lab_demo() -> None:
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="nbdgw-demo-"))
    lab_dir = tmp / "lab"
    summary: dict[str, Any] | None = None
    try:
        say("Building a three-site lab on this machine: primary 'main', secondary 'dc' and "
            "disaster-recovery site 'dr', each in its own network namespace running "
            "`nbdgw daemon`, plus a client namespace")
        summary = lab.up(lab_dir, size="64M")
        nodes = {n["name"]: n for n in summary["nodes"]}
        for n in summary["nodes"]:
            print(f"   {n['name']:<4} {n['role']:<9} {n['address']:<12} "
                  f"namespace {n['netns']}")
        print(f"   clients use the service address {summary['service_address']}:"
              f"{summary['nbd_port']}, held by whichever site is primary")

        say("Writing 16 MiB of random data from the client namespace (NBD, then FLUSH)")
        payload = tmp / "payload.bin"
        payload.write_bytes(os.urandom(PAYLOAD))
        digest = client(summary, payload, "write")
        print(f"   written; SHA-256 {digest[:16]}...")

        say("Replicated: both replicas acknowledge the primary's last journal record")
        for p in wait_replicated(nodes["main"]["config"]):
            print(f"   {p['name']}: {p['state']}, acknowledged seq {p['acked_seq']} of "
                  f"{p['last_seq']}, lag {p['lag_bytes']} bytes")

        say("Taking a snapshot 'before-failover' on the primary (it travels in the journal "
            "to both replicas)")
        print("   " + nbdgw_out(nodes["main"]["config"], "snapshot", "create", "v1",
                                "--name", "before-failover"))

        say("Power cut: every process of site 'main' is killed at once (SIGKILL)")
        killed = lab.kill(lab_dir, "main")
        print(f"   killed: {', '.join(killed['killed'])}")

        say("Failover: 'dc' and 'dr' stop hearing 'main'; with the majority (2 of 3 "
            "sites) 'dc' promotes itself and takes the service address")
        took = wait_failover(lab_dir, "dc")
        print(f"   dc is primary {took:.1f} s after the power cut")

        say("Reading the 16 MiB back through the service address (now served by 'dc')")
        after = client(summary, payload, "read")
        intact = after == digest
        print(f"   SHA-256 {after[:16]}... {'matches' if intact else 'DIFFERS'}")
        snaps = nbdgw_out(nodes["dc"]["config"], "snapshot", "list", "v1")
        kept = "before-failover" in snaps
        print(f"   snapshot 'before-failover' on dc: {'present' if kept else 'MISSING'}")
        for line in nbdgw_out(nodes["dc"]["config"], "status").splitlines()[:3]:
            print(f"   {line}")
        if not intact:
            sys.exit("demo failed: the data read after the failover differs")
        if not kept:
            sys.exit("demo failed: the snapshot did not survive the failover")
    finally:
        if summary is not None or (lab_dir / "lab.json").exists():
            say("Tearing the lab down (processes, namespaces, data)")
            with contextlib.suppress(GatewayError, OSError):
                lab.down(lab_dir)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ndemo complete: data intact after failover (main -> dc in {took:.1f} s), "
          f"snapshot kept, {time.monotonic() - t_start:.0f} s in all")


# -- the fan-in story (`make demo-branches`) ---------------------------------------------

BRANCH_PAYLOAD = 8 << 20

# Like CLIENT, but the export is reached by the group's DNS name (argv: name, port,
# export, file, write|read, the address the name must resolve to first or "").
NAMED_CLIENT = r"""
import hashlib, socket, sys, time, nbd
name, port, export, path, what, want = sys.argv[1:7]
data = open(path, "rb").read()
deadline = time.monotonic() + 60
while True:
    try:
        seen = socket.gethostbyname(name)
        if want and seen != want:
            raise OSError(f"{name} is still {seen}")
        h = nbd.NBD(); h.connect_uri(f"nbd://{name}:{port}/{export}"); break
    except (OSError, nbd.Error) as e:
        if time.monotonic() > deadline:
            sys.exit(f"no answer from {name}: {e}")
        time.sleep(0.1)
if what == "write":
    for off in range(0, len(data), 1 << 20):
        h.pwrite(data[off:off + (1 << 20)], off)
    h.flush()
    got = data
else:
    got = b"".join(h.pread(1 << 20, off) for off in range(0, len(data), 1 << 20))
print(seen, hashlib.sha256(got).hexdigest())
h.shutdown()
"""


def named_client(summary: dict[str, Any], g: dict[str, Any], payload: Path, what: str,
                 want: str = "") -> tuple[str, str]:
    """(the address the name resolved to, the SHA-256 written or read)."""
    out = run(["ip", "netns", "exec", summary["client_netns"], sys.executable, "-c",
               NAMED_CLIENT, g["dns_name"], str(g["ports"]["nbd"]), g["volume"],
               str(payload), what, want], timeout=120).strip()
    seen, digest = out.split()
    return seen, digest


def wait_group_primary(lab_dir: Path, g: dict[str, Any], site: str) -> float:
    from . import labbranches

    t0 = time.monotonic()
    the_lab = lab.Lab.load(lab_dir)
    while labbranches.serving(the_lab, g) != site:
        if time.monotonic() - t0 > FAILOVER_TIMEOUT:
            raise GatewayError(f"{site} did not take over group {g['name']} in "
                               f"{FAILOVER_TIMEOUT:g} s")
        time.sleep(0.1)
    return time.monotonic() - t0


def switchover_group(config: str, group: str, to: str) -> str:
    """`nbdgw --group G switchover --to TO`, asked again while the rejoined site is still
    finishing its resync (30 s at most)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return run([*lab.nbdgw_argv(), "-c", config, "--group", group, "switchover",
                        "--to", to], timeout=180).strip()
        except GatewayError as e:
            busy = "is not streaming every volume" in str(e) or " is outdated " in str(e)
            if not busy or time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def branches_demo() -> None:
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="nbdgw-demo-branches-"))
    lab_dir = tmp / "lab"
    summary: dict[str, Any] | None = None
    try:
        say("Building three branch offices, each in its own subnet and primary of its own "
            "volume group, replicating into one data centre 'dc' (fan-in), which cascades "
            "them to 'dr'; clients in a fourth subnet find each group by its DNS name")
        summary = lab.up(lab_dir, size="32M", branches=3)
        nodes = {n["name"]: n for n in summary["nodes"]}
        for g in summary["groups"]:
            print(f"   group {g['name']}: {g['primary']} ({nodes[g['primary']]['address']}) "
                  f"-> dc -> dr, clients use {g['uri']}")

        say("Each branch's clients write 8 MiB of random data through the group's name")
        digests = {}
        for g in summary["groups"]:
            payload = tmp / f"{g['name']}.bin"
            payload.write_bytes(os.urandom(BRANCH_PAYLOAD))
            seen, digests[g["name"]] = named_client(summary, g, payload, "write")
            print(f"   {g['dns_name']} -> {seen}: written, SHA-256 {digests[g['name']][:16]}...")

        say("Power cut of branch1: only its group fails over; dc promotes its replica of "
            "b1 and publishes b1.nbdgw.lab with its own address")
        b1, others = summary["groups"][0], summary["groups"][1:]
        lab.kill(lab_dir, "branch1")
        took = wait_group_primary(lab_dir, b1, "dc")
        print(f"   dc serves b1 {took:.1f} s after the power cut")
        seen, after = named_client(summary, b1, tmp / "b1.bin", "read",
                                   nodes["dc"]["address"])
        intact = after == digests["b1"]
        print(f"   b1's clients: {b1['dns_name']} -> {seen} (dc), SHA-256 {after[:16]}... "
              f"{'matches' if intact else 'DIFFERS'}")
        untouched = True
        for g in others:
            seen, got = named_client(summary, g, tmp / f"{g['name']}.bin", "read")
            same = seen == nodes[g["primary"]]["address"] and got == digests[g["name"]]
            untouched = untouched and same
            print(f"   {g['name']}'s clients: {g['dns_name']} -> {seen} ({g['primary']}), "
                  f"{'untouched' if same else 'MOVED OR CHANGED'}")

        say("branch1 comes back: it rejoins as b1's replica, then a switchover gives it "
            "its role back and the name follows")
        lab.start(lab_dir, "branch1")
        print("   " + switchover_group(nodes["dc"]["config"], "b1", "branch1"))
        wait_group_primary(lab_dir, b1, "branch1")
        seen, back = named_client(summary, b1, tmp / "b1.bin", "read",
                                  nodes["branch1"]["address"])
        home = back == digests["b1"]
        print(f"   {b1['dns_name']} -> {seen} (branch1), SHA-256 {back[:16]}... "
              f"{'matches' if home else 'DIFFERS'}")
        if not (intact and untouched and home):
            sys.exit("demo failed: a group's data or name is not where it should be")
    finally:
        if summary is not None or (lab_dir / "lab.json").exists():
            say("Tearing the lab down (processes, namespaces, data)")
            with contextlib.suppress(GatewayError, OSError):
                lab.down(lab_dir)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ndemo complete: branch1's group failed over to dc in {took:.1f} s and came "
          f"home, the other branches untouched, {time.monotonic() - t_start:.0f} s in all")
