"""The iSCSI bridge end to end: real `nbdgw serve` (nbdkit), real tgtd and nbdfuse,
libiscsi clients (iscsi-inq, iscsi-ls, qemu-img with iscsi:// URLs), libnbd readers.

Each test runs its own tgtd on a free loopback port, with that port number as tgtd's
control port too, so tests never meet each other or a system tgtd.  The fixture stops
the bridge (delete system, unmount) and then kills whatever is left, even on failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blockstore.journal import journal_bounds
from iscsi_bridge import Bridge, Export, loop
from iscsi_bridge.fuse import FuseMount, mounted
from iscsi_bridge.names import DISK_LUN, scsi_id, scsi_sn
from iscsi_bridge.settings import ChapConfig, IscsiFuse
from iscsi_bridge.tgt import Tgtadm
from tests.conftest import NBDGW, Served, free_port, run_nbdgw
from tests.integration.iscsienv import BASE, IscsiEnv, free_control_port, sh
from tests.integration.peerenv import Env

MiB = 1 << 20
GOOD = "iqn.2026-11.com.example:good-host"
BAD = "iqn.2026-11.com.example:bad-host"







def nbd_read(served: Served, offset: int, length: int, export: str = "v1") -> bytes:
    h: Any = served.connect(export)
    try:
        return bytes(h.pread(length, offset))
    finally:
        h.shutdown()


def vpd(e: IscsiEnv, page: int) -> bytes:
    """VPD page ``page`` as iscsi-inq prints it (binary designators raw, so compared
    as bytes: the NAA designators, tid included, must match too)."""
    return subprocess.run(["iscsi-inq", "-e", "1", "-c", str(page), e.url()],
                          capture_output=True, timeout=30, check=True).stdout


# -- data path ----------------------------------------------------------------------------

ROUTES = pytest.mark.parametrize("route", ["loop", "file"])


@ROUTES
def test_write_over_iscsi_read_over_nbd_and_back(tmp_path: Path, iscsi: Callable[..., IscsiEnv],
                                                  data_dir: Path, route: str) -> None:
    e = iscsi(route=route)
    backing = e.bridge.status()["targets"][0]["backing_store"]  # type: ignore[index]
    assert backing.startswith("/dev/loop") if route == "loop" else backing.endswith("/disk")
    data = os.urandom(4 * MiB)
    src = tmp_path / "src.img"
    src.write_bytes(data)
    before = journal_bounds(data_dir / "volumes/v1/journal")[1]
    sh("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), e.url(), timeout=120)
    assert nbd_read(e.served, 0, len(data)) == data

    # NBD writes are seen over iSCSI at once (O_DIRECT: no stale page cache in between)
    h: Any = e.served.connect("v1")
    patch = os.urandom(MiB)
    h.pwrite(patch, 8 * MiB)
    h.flush()
    h.shutdown()
    out = tmp_path / "out.img"
    sh("qemu-img", "convert", "-f", "raw", "-O", "raw", e.url(), str(out), timeout=120)
    got = out.read_bytes()
    assert got[:len(data)] == data
    assert got[8 * MiB:9 * MiB] == patch

    # the iSCSI writes went through the journal: its last sequence number moved on
    assert journal_bounds(data_dir / "volumes/v1/journal")[1] > before
    e.cleanup()
    e.served.stop()
    expect = bytearray(64 * MiB)
    expect[:len(data)] = data
    expect[8 * MiB:9 * MiB] = patch
    assert run_nbdgw("volume", "checksum", "v1", "--data-dir", str(data_dir)).stdout.split()[0] \
        == hashlib.sha256(expect).hexdigest()


def test_iscsi_writes_reach_the_replica(env: Env, iscsi: Callable[..., IscsiEnv],
                                        tmp_path: Path) -> None:
    """Written over iSCSI on the primary, the replica has the same bytes (checksum)."""
    receiver = env.receiver(0, "--secret-file", str(_secret(tmp_path)))
    env.sender(receiver.port, "--secret-file", str(_secret(tmp_path)))
    e = iscsi(served=env.served)
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(3 * MiB))
    sh("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), e.url(), timeout=120)
    e.cleanup()
    env.wait_caught_up()
    primary, replica = env.checksums()
    assert primary == replica


@ROUTES
def test_sync_cache_is_an_nbd_flush(tmp_path: Path, iscsi: Callable[..., IscsiEnv],
                                    serve: Callable[..., Served], route: str) -> None:
    """SYNCHRONIZE CACHE from the initiator reaches the NBD server as FLUSH, after the
    write it covers (nbdkit's log filter in front of a memory disk records the order)."""
    log = tmp_path / "nbd.log"
    sock = tmp_path / "mem.sock"
    nbdkit = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "--exit-with-parent",
                               "--filter=log", "memory", "64M", f"logfile={log}"])
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        e = iscsi(served=serve(), nbd_uri=lambda _: f"nbd+unix:///?socket={sock}", route=route,
                  fuse=IscsiFuse.NBDGW)  # the NBD route: the log filter sees the order
        start = len(log.read_text().splitlines())
        sh("qemu-io", "-f", "raw", "-c", "write -P 0x55 4096 64k", "-c", "flush", e.url())
        ops = [ln.split()[3] for ln in log.read_text().splitlines()[start:]
               if " ..." in ln and "return=" not in ln]
        assert "Write" in ops
        assert "Flush" in ops[ops.index("Write"):]
        e.cleanup()
    finally:
        nbdkit.terminate()
        nbdkit.wait(10)


def _secret(tmp_path: Path) -> Path:
    p = tmp_path / "peer.secret"
    if not p.exists():
        p.write_bytes(b"a shared secret of 32 bytes.....")
        p.chmod(0o600)
    return p


# -- identity -----------------------------------------------------------------------------

def test_identity_is_derived_from_the_iqn_and_stable(iscsi: Callable[..., IscsiEnv],
                                                     serve: Callable[..., Served]) -> None:
    e = iscsi()
    iqn = f"{BASE}:v1"
    sn, sid = scsi_sn(iqn, DISK_LUN), scsi_id(iqn, DISK_LUN)
    page80, page83 = vpd(e, 0x80), vpd(e, 0x83)
    assert f"Unit Serial Number:[{sn:>36}]".encode() in page80
    assert f"Designator:[{sid}]".encode() in page83
    assert page83.count(b"Designator Type:(3) NAA") == 2
    listing = sh("iscsi-ls", "-s", f"iscsi://127.0.0.1:{e.port}").stdout
    assert f"Target:{iqn} Portal:127.0.0.1:{e.port}" in listing

    # another node (another tgtd, another run dir and port) shows the same identity
    other = iscsi(served=e.served)
    assert other.port != e.port
    assert vpd(other, 0x80) == page80
    assert vpd(other, 0x83) == page83
    # and a restarted bridge on this node too
    e.bridge.stop()
    e.reconcile()
    assert (vpd(e, 0x80), vpd(e, 0x83)) == (page80, page83)


# -- authentication and ACLs --------------------------------------------------------------

def test_chap_secrets_never_on_a_command_line(tmp_path: Path, iscsi: Callable[..., IscsiEnv],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 20, point 8: no process the bridge starts (tgtadm, tgtd, FUSE servers) has
    a CHAP secret in its argv, where /proc/PID/cmdline shows it to every local user;
    the accounts still work, and a rotated secret too."""
    argvs: list[list[str]] = []
    real = subprocess.Popen

    class Recording(real):  # type: ignore[valid-type,misc]
        def __init__(self, args: Any, *a: Any, **kw: Any) -> None:
            argvs.append([str(x) for x in args] if isinstance(args, list | tuple)
                         else [str(args)])
            super().__init__(args, *a, **kw)

    monkeypatch.setattr(subprocess, "Popen", Recording)
    (tmp_path / "in").write_text("initiator-secret-1\n")
    (tmp_path / "out").write_text("target-secret-22\n")
    e = iscsi(chap=ChapConfig("sqlhosts", tmp_path / "in"),
              mutual_chap=ChapConfig("nbdgw-target", tmp_path / "out"))
    (tmp_path / "in").write_text("initiator-secret-2\n")
    e.reconcile()
    assert any(a[0] == "tgtadm" for a in argvs)
    leaked = [a for a in argvs if any("secret-" in x for x in a)]
    assert leaked == []
    assert e.bridge.adm.accounts() == {"sqlhosts", "nbdgw-target"}
    ok = e.inq(url=e.url(chap=("sqlhosts", "initiator-secret-2"),
                         target=("nbdgw-target", "target-secret-22")))
    assert "Peripheral Device Type:DIRECT_ACCESS" in ok.stdout


def test_chap_and_mutual_chap(tmp_path: Path, iscsi: Callable[..., IscsiEnv]) -> None:
    (tmp_path / "in").write_text("initiator-secret-1\n")
    (tmp_path / "out").write_text("target-secret-22\n")
    e = iscsi(chap=ChapConfig("sqlhosts", tmp_path / "in"),
              mutual_chap=ChapConfig("nbdgw-target", tmp_path / "out"))
    right = ("sqlhosts", "initiator-secret-1")
    assert "Authentication failure" in e.inq().stdout + e.inq().stderr
    wrong = e.inq(url=e.url(chap=("sqlhosts", "initiator-secret-X")))
    assert "Authentication failure" in wrong.stdout + wrong.stderr
    assert "Peripheral Device Type:DIRECT_ACCESS" in e.inq(url=e.url(chap=right)).stdout
    ok = e.inq(url=e.url(chap=right, target=("nbdgw-target", "target-secret-22")))
    assert "Peripheral Device Type:DIRECT_ACCESS" in ok.stdout
    fake = e.inq(url=e.url(chap=right, target=("nbdgw-target", "target-secret-XX")))
    assert "Invalid CHAP_R response from the target" in fake.stdout + fake.stderr
    # a rotated secret is picked up by the next reconcile
    (tmp_path / "in").write_text("initiator-secret-2\n")
    e.reconcile()
    old = e.inq(url=e.url(chap=right))
    assert "Authentication failure" in old.stdout + old.stderr
    new = e.inq(url=e.url(chap=("sqlhosts", "initiator-secret-2")))
    assert "Peripheral Device Type:DIRECT_ACCESS" in new.stdout


def test_initiator_name_acl(iscsi: Callable[..., IscsiEnv]) -> None:
    e = iscsi(initiators=(GOOD,))
    assert "DIRECT_ACCESS" in e.inq("-i", GOOD).stdout
    refused = e.inq("-i", BAD)
    assert "Failed to log in to target" in refused.stdout + refused.stderr
    assert BAD not in sh("iscsi-ls", "-i", BAD, f"iscsi://127.0.0.1:{e.port}",
                         check=False).stdout


@pytest.mark.parametrize(("allow", "admitted"), [(("127.0.0.0/8",), True),
                                                  (("192.0.2.0/24",), False)])
def test_initiator_address_acl(iscsi: Callable[..., IscsiEnv], allow: tuple[str, ...],
                               admitted: bool) -> None:
    e = iscsi(allow=allow)
    p = e.inq()
    assert ("DIRECT_ACCESS" in p.stdout) is admitted
    if not admitted:
        assert "Failed to log in to target" in p.stdout + p.stderr


# -- read-only ----------------------------------------------------------------------------

def test_read_only_lun_refuses_writes(tmp_path: Path, iscsi: Callable[..., IscsiEnv]) -> None:
    e = iscsi(exports=[Export("v1", read_only=True)])
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(MiB))
    p = sh("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), e.url(),
           check=False)
    assert p.returncode != 0
    assert nbd_read(e.served, 0, MiB) == bytes(MiB)
    assert e.bridge.status()["targets"][0]["read_only"] is True  # type: ignore[index]


def test_a_read_only_flip_removes_the_lun_before_its_mount_goes(
        tmp_path: Path, iscsi: Callable[..., IscsiEnv], monkeypatch: pytest.MonkeyPatch) -> None:
    """An export turned read-only gets a fresh read-only mount, and unmounting ends the
    old mount's FUSE connection (FuseMount.stop): tgtd's LUN is removed first, so it
    never serves from a dead mount, then made again on the new one."""
    e = iscsi()
    data = os.urandom(MiB)
    src = tmp_path / "src.img"
    src.write_bytes(data)
    sh("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), e.url())
    order: list[str] = []
    remove_lun = e.bridge.adm.remove_lun
    stop = FuseMount.stop

    def removing(*a: Any) -> None:
        order.append("remove LUN")
        remove_lun(*a)

    def unmounting(m: FuseMount, *a: Any, **kw: Any) -> None:
        order.append("unmount")
        stop(m, *a, **kw)

    monkeypatch.setattr(e.bridge.adm, "remove_lun", removing)
    monkeypatch.setattr(FuseMount, "stop", unmounting)
    report = e.reconcile([Export("v1", read_only=True)])
    assert order[:2] == ["remove LUN", "unmount"]  # then the new mount's start (a no-op)
    assert any("re-created" in r for r in report.repaired)
    out = tmp_path / "out.img"
    sh("qemu-img", "convert", "-f", "raw", "-O", "raw", e.url(), str(out))
    assert out.read_bytes()[:MiB] == data
    p = sh("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), e.url(),
           check=False)
    assert p.returncode != 0
    assert e.bridge.status()["targets"][0]["read_only"] is True  # type: ignore[index]


def test_snapshot_export_is_a_read_only_target(tmp_path: Path, iscsi: Callable[..., IscsiEnv],
                                               data_dir: Path) -> None:
    """A real nbdgw snapshot ``v1@hourly-...T...Z`` becomes target <iqn>:v1:<lowercased
    snapshot>, read-only, with the bytes of the moment it was taken; withdrawn first
    when it is deleted."""
    e = iscsi()
    before = os.urandom(2 * MiB)
    src = tmp_path / "src.img"
    src.write_bytes(before)
    sh("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), e.url())
    snap = "hourly-20261122T1400Z"
    run_nbdgw("snapshot", "create", "v1", "--name", snap, "--data-dir", str(data_dir))
    src.write_bytes(os.urandom(2 * MiB))  # the volume moves on
    sh("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), e.url())

    e.reconcile([Export("v1"), Export(f"v1@{snap}")])
    snap_iqn = f"{BASE}:v1:hourly-20261122t1400z"
    url = f"iscsi://127.0.0.1:{e.port}/{snap_iqn}/1"
    out = tmp_path / "out.img"
    sh("qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(out))
    assert out.read_bytes()[:len(before)] == before
    p = sh("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), url, check=False)
    assert p.returncode != 0
    names = {t["iqn"]: t["read_only"] for t in e.bridge.status()["targets"]}  # type: ignore[union-attr]
    assert names == {f"{BASE}:v1": False, snap_iqn: True}

    assert e.bridge.withdraw(f"v1@{snap}")  # before the snapshot is deleted
    assert not (e.cfg.run_dir / "mnt" / f"v1@{snap}").exists()
    run_nbdgw("snapshot", "delete", "v1", snap, "--data-dir", str(data_dir))
    report = e.reconcile([Export("v1")])
    assert not report.changed


# -- lifecycle ----------------------------------------------------------------------------

@ROUTES
@pytest.mark.parametrize("fuse", [IscsiFuse.NBDKIT, IscsiFuse.NBDGW])
def test_reconcile_is_idempotent_and_repairs(iscsi: Callable[..., IscsiEnv],
                                             serve: Callable[..., Served], route: str,
                                             fuse: IscsiFuse) -> None:
    e = iscsi(route=route, fuse=fuse)
    assert not e.reconcile().changed

    pid = e.bridge.tgtd.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # tgtd dies: targets, LUNs, accounts are gone with it
    r = e.reconcile()
    assert r.tgtd_started
    assert r.created == [f"{BASE}:v1"]
    assert "DIRECT_ACCESS" in e.inq().stdout

    adm = Tgtadm(e.cfg.control_port)
    (tid,) = adm.targets()
    adm.delete_target(tid)  # an operator deletes the target by hand
    assert e.reconcile().created == [f"{BASE}:v1"]

    mount_pid = e.bridge.mounts["v1"].pid()
    assert mount_pid is not None
    if fuse is IscsiFuse.NBDKIT:  # nbdkit dies under tgtd (and its serve): a new one starts
        assert mount_pid == e.served.nbdkit_pid()
        e.served.kill9_nbdkit()
        e.served = serve()
        assert e.bridge.mounts["v1"].pid() is None
    else:
        os.kill(mount_pid, signal.SIGKILL)  # the FUSE server dies under tgtd
    time.sleep(0.2)
    assert not e.bridge.mounts["v1"].healthy()
    r = e.reconcile()
    assert r.repaired == [f"{BASE}:v1: LUN 1 re-created on a fresh mount"]
    assert "DIRECT_ACCESS" in e.inq().stdout
    assert not e.reconcile().changed
    e.cleanup()
    assert not [lo for lo in loop.loops() if str(e.cfg.run_dir) in lo.backing_file or
                lo.backing_file == "/disk"], "a loop device was left behind"


def test_a_new_bridge_adopts_the_running_tgtd(iscsi: Callable[..., IscsiEnv]) -> None:
    """The gateway restarted: tgtd and nbdfuse kept serving; nothing is rebuilt."""
    e = iscsi()
    pid = e.bridge.tgtd.pid()
    e.bridge = Bridge(e.cfg, e.served.uri, data_dir=e.served.data_dir)
    r = e.reconcile()
    assert not r.tgtd_started
    assert not r.created
    assert e.bridge.tgtd.pid() == pid


def test_withdraw_while_an_initiator_writes(tmp_path: Path,
                                            iscsi: Callable[..., IscsiEnv]) -> None:
    """Role change: the volume is no longer served here; its busy target goes away."""
    e = iscsi()
    bench = subprocess.Popen(["qemu-img", "bench", "-f", "raw", "-w", "-t", "none", "-d", "4",
                              "-c", "10000000", "-s", "4096", e.url()],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        assert bench.poll() is None
        t0 = time.monotonic()
        r = e.reconcile([])
        assert r.removed == [f"{BASE}:v1"]
        # Bounded by the bridge's own wait for the unmounted file's release (15 s, then a
        # warning: FuseMount.stop) plus the tgtadm calls; usually well under a second.
        # A CI run on a machine loaded by three lab runs hit that wait (15.2 s in all).
        assert time.monotonic() - t0 < 15 + 10
        gone = e.inq()  # libiscsi in qemu-img keeps retrying; a fresh login is refused
        assert gone.returncode != 0
        assert "Login Failed" in gone.stdout + gone.stderr
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert e.bridge.status()["targets"] == []
    assert not any(e.cfg.run_dir.glob("mnt/v1"))


def test_stop_is_clean(iscsi: Callable[..., IscsiEnv]) -> None:
    e = iscsi()
    pid = e.bridge.tgtd.pid()
    mount = e.bridge.mounts["v1"]
    fuse_pid = mount.pid()
    e.bridge.stop()
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    assert mount.pid() is None and fuse_pid is not None
    assert not mounted(mount.dir)
    assert e.bridge.status()["tgtd"] == "down"


# -- CLI ----------------------------------------------------------------------------------

def test_cli_serve_status_and_sigterm(tmp_path: Path, data_dir: Path, volume: str,
                                      serve: Callable[..., Served]) -> None:
    served = serve()
    port, control = free_port(), free_control_port()
    cfg = tmp_path / "nbdgw.yaml"
    cfg.write_text(f"""version: 1
node: {{data_dir: {data_dir}}}
iscsi:
  enabled: true
  portal: 127.0.0.1:{port}
  iqn: {BASE}
  control_port: {control}
  run_dir: {tmp_path / 'iscsi'}
""")
    log = open(tmp_path / "iscsi-serve.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen([NBDGW, "--log-format", "json", "-c", str(cfg), "iscsi", "serve",
                             "--nbd-socket", str(served.sock), "--interval", "0.5"],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        assert lines == [f"nbdgw: iscsi portal 127.0.0.1:{port}\n",
                         f"nbdgw: iscsi target v1: iscsi://127.0.0.1:{port}/{BASE}:v1/1\n"]
        status = json.loads(run_nbdgw("-c", str(cfg), "iscsi", "status", "--json").stdout)
        assert [t["iqn"] for t in status["targets"]] == [f"{BASE}:v1"]
        text = run_nbdgw("-c", str(cfg), "iscsi", "status").stdout
        assert f"{BASE}:v1  LUN 1 read-write, serial {scsi_sn(BASE + ':v1', 1)}" in text
        # the serve loop repairs a killed tgtd by itself
        os.kill(status["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            p = sh("iscsi-inq", f"iscsi://127.0.0.1:{port}/{BASE}:v1/1", check=False)
            if "DIRECT_ACCESS" in p.stdout:
                break
            time.sleep(0.3)
        else:
            raise AssertionError("tgtd was not repaired by iscsi serve")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        down = run_nbdgw("-c", str(cfg), "iscsi", "status").stdout
        assert down == f"tgtd: not running (control port {control})\n"
        assert not any(tmp_path.glob("iscsi/mnt/*/disk"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        run_nbdgw("-c", str(cfg), "iscsi", "down", check=False)
        log.close()


def test_cli_refuses_a_bad_iqn_and_a_disabled_bridge(tmp_path: Path, data_dir: Path) -> None:
    cfg = tmp_path / "nbdgw.yaml"
    cfg.write_text("version: 1\niscsi:\n  enabled: true\n  iqn: iqn.2026-11.com.Example:x\n")
    p = run_nbdgw("-c", str(cfg), "iscsi", "serve", check=False)
    assert p.returncode == 1
    assert p.stderr.endswith("got 'iqn.2026-11.com.Example:x' for iscsi.iqn\n")
    cfg.write_text(f"version: 1\nnode: {{data_dir: {data_dir}}}\n")
    p = run_nbdgw("-c", str(cfg), "iscsi", "serve", check=False)
    assert p.stderr == ("nbdgw: error: iscsi is not enabled in the config (set "
                        "iscsi.enabled: true and iscsi.iqn)\n")
