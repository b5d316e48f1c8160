"""Helpers shared by the three-site lab tests (test_lab, test_failover, test_rejoin,
test_failover_faults): start and stop a lab, run clients in its client namespace, read
what each site's daemon published, wait for cluster outcomes; and the file-system stack
the FUSE and ext4 tests build (nbdfuse, a loop device, a mount); and a real peerlink
``ReceiverServer`` process for the tests of what strangers can make it do.

Sites are named main, dc and dr; ``lab`` is the JSON that `nbdgw lab up` printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from iscsi_bridge import Export
from tests.conftest import NBDGW, Served, free_port, run_nbdgw
from tests.integration.cluster import SITES, SIZE, Node
from tests.integration.iscsienv import IscsiEnv
from tests.integration.peerenv import Env, stop_process

TIMEOUT = 2.0 + 1.0  # failover.timeout + fence_margin (the defaults)

# Client in the lab: writes 4 KiB blocks 0, 1, 2, ... each stamped with its number,
# flushing after every 4; prints "flushed N" once blocks < N are durable (with a sync
# secondary: on the secondary too).  Runs until the server goes away.
STAMPER = r"""
import struct, sys, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
i = 0
try:
    while True:
        h.pwrite(struct.pack("<Q", i) * 512, i * 4096)
        i += 1
        if i % 4 == 0:
            h.flush()
            print(f"flushed {i}", flush=True)
except nbd.Error as e:
    print(f"error {e}", flush=True)
"""

# Client in the lab: connect (retrying), then check blocks < N; prints the seconds from
# argv[3] (a time.time() stamp) to the first successful read.
CHECKER = r"""
import json, struct, sys, time, nbd
uri, n, t0 = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + 60
while True:
    try:
        h = nbd.NBD(); h.connect_uri(uri); h.pread(4096, 0); break
    except nbd.Error as e:
        if time.monotonic() > deadline:
            sys.exit(f"no answer: {e}")
        time.sleep(0.05)
first = time.time() - t0
bad = [i for i in range(n) if h.pread(4096, i * 4096) != struct.pack("<Q", i) * 512]
print(json.dumps({"first_read_s": round(first, 2), "bad": bad[:10], "checked": n}))
"""


def run_cmd(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


def lab_cmd(*args: str) -> str:
    return run_nbdgw("lab", *args, timeout=90).stdout


def up(tmp_path: Path, *extra: str) -> dict[str, Any]:
    """`nbdgw lab up` in tmp_path/lab (64 MiB volume); the ``lab_dir`` fixture takes it
    down."""
    p = run_nbdgw("lab", "up", "--dir", str(tmp_path / "lab"), "--size", "64M", *extra,
                  check=False, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)  # type: ignore[no-any-return]


@pytest.fixture
def lab_dir(tmp_path: Path) -> Iterator[Path]:
    """tmp_path/lab, for ``up``; `lab down` afterwards, even when the test failed."""
    yield tmp_path / "lab"
    if (tmp_path / "lab" / "lab.json").exists():
        run_nbdgw("lab", "down", "--dir", str(tmp_path / "lab"), check=False, timeout=90)


def node(lab: dict[str, Any], name: str) -> dict[str, Any]:
    return dict(next(n for n in lab["nodes"] if n["name"] == name))


def node_dir(lab: dict[str, Any], name: str) -> Path:
    """The site's data directory."""
    return Path(node(lab, name)["data_dir"])


def cfg(lab: dict[str, Any], name: str) -> str:
    """The site's node config (for `nbdgw -c`)."""
    return str(node(lab, name)["config"])


def addr(lab: dict[str, Any], name: str) -> str:
    return str(node(lab, name)["address"])


def failover_state(lab: dict[str, Any], name: str) -> dict[str, Any]:
    """What the site's daemon last published in run/failover.json ({} if nothing)."""
    try:
        return json.loads(  # type: ignore[no-any-return]
            (node_dir(lab, name) / "run" / "failover.json").read_text())
    except (OSError, ValueError):
        return {}


def states(lab: dict[str, Any]) -> dict[str, str]:
    return {n["name"]: str(failover_state(lab, n["name"]).get("state", "?"))
            for n in lab["nodes"]}


def in_ns(lab: dict[str, Any], name: str, *argv: str) -> None:
    run_cmd(["ip", "netns", "exec", node(lab, name)["netns"], *argv])


def client(lab: dict[str, Any], script: str, *args: str,
           **kw: Any) -> subprocess.Popen[str]:
    """A Python ``script`` run in the lab's client namespace (stdout and stderr piped)."""
    return subprocess.Popen(["ip", "netns", "exec", lab["client_netns"], sys.executable, "-c",
                             script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def run_client(lab: dict[str, Any], script: str, *args: str, timeout: float = 120
               ) -> dict[str, Any]:
    """Run ``script`` in the client namespace; its last stdout line, as JSON."""
    p = client(lab, script, *args)
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def uri(lab: dict[str, Any], export: str = "v1", host: str | None = None) -> str:
    """The NBD URI of ``export`` at the service address (or at ``host``)."""
    return f"nbd://{host or lab['service_address']}:10809/{export}"


def check_blocks(lab: dict[str, Any], n: int, t0: float) -> dict[str, Any]:
    """CHECKER through the service address: blocks < n as STAMPER wrote them."""
    p = client(lab, CHECKER, uri(lab), str(n), str(t0))
    out, err = p.communicate(timeout=90)
    assert p.returncode == 0, err
    return json.loads(out)  # type: ignore[no-any-return]


def wait_states(lab: dict[str, Any], want: dict[str, str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while states(lab) != {**states(lab), **want}:
        if time.monotonic() > deadline:
            raise AssertionError(f"states {states(lab)}, wanted {want}")
        time.sleep(0.1)


def one_primary(lab: dict[str, Any]) -> str:
    prim = [n for n, s in states(lab).items() if s == "primary"]
    assert len(prim) == 1, states(lab)
    return prim[0]


def checksum(lab: dict[str, Any], name: str) -> str:
    """`nbdgw volume checksum v1` on one site (a served volume: the store as it is)."""
    return run_nbdgw("-c", cfg(lab, name), "volume", "checksum", "v1").stdout.split()[0]


def wait_consistent(lab: dict[str, Any], name: str, timeout: float = 60) -> None:
    """Wait until the site's replica of v1 is Consistent (its first sync completed)."""
    deadline = time.monotonic() + timeout
    while True:
        report = json.loads(run_nbdgw("-c", cfg(lab, name), "status", "--json").stdout)
        vols = {v["name"]: v for v in report["volumes"]}
        if "v1" in vols and not vols["v1"]["inconsistent"]:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}'s v1 still Inconsistent after {timeout} s")
        time.sleep(0.5)


def converge(lab: dict[str, Any], timeout: float = 90) -> str:
    """Wait until every site's v1 has the same checksum (writes have stopped)."""
    deadline = time.monotonic() + timeout
    while True:
        sums = {n: checksum(lab, n) for n in ("main", "dc", "dr")}
        if len(set(sums.values())) == 1:
            return next(iter(sums.values()))
        if time.monotonic() > deadline:
            raise AssertionError(f"replicas differ after {timeout} s: {sums}")
        time.sleep(1)


def switchover(lab: dict[str, Any], primary: str, to: str) -> str:
    """`nbdgw switchover --to TO` on ``primary``; asked again while the primary's sender
    has not yet reported the target streaming (a rejoined node that has just finished
    its resync: equal checksums do not mean its link has left ``resync``), for 30 s at
    most.  Returns what the command printed."""
    deadline = time.monotonic() + 30
    while True:
        sw = run_nbdgw("-c", cfg(lab, primary), "switchover", "--to", to, check=False,
                       timeout=180)
        if sw.returncode == 0:
            return sw.stdout
        assert ("is not streaming every volume" in sw.stderr
                or f"{to} is outdated" in sw.stderr), sw.stderr
        assert time.monotonic() < deadline, sw.stderr
        time.sleep(0.5)


def events(lab_dir: Path, name: str, event: str) -> list[dict[str, Any]]:
    """The site's daemon.log lines (daemon and peerlink) with this event name."""
    out = []
    for line in (lab_dir / name / "daemon.log").read_text().splitlines():
        if f'"event": "{event}"' in line or f'"event":"{event}"' in line:
            out.append(json.loads(line))
    return out


# -- the file-system stack: nbdfuse -> loop device -> mount --------------------------------


def run(argv: list[str], timeout: float = 60, check: bool = True
        ) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check:
        assert p.returncode == 0, f"{argv} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p


@contextmanager
def nbdfuse(mountdir: Path, uri: str, readonly: bool = False) -> Iterator[Path]:
    """Run nbdfuse on ``mountdir`` (export as MOUNTDIR/nbd); unmount and reap it after."""
    mountdir.mkdir(exist_ok=True)
    argv = ["nbdfuse", *(["-r"] if readonly else []), str(mountdir), uri]
    log = mountdir.parent / f"{mountdir.name}.log"
    with log.open("w") as err:
        proc = subprocess.Popen(argv, stdout=err, stderr=err)
    try:
        image = mountdir / "nbd"
        deadline = time.monotonic() + 15
        while not (os.path.ismount(mountdir) and image.exists()):
            assert proc.poll() is None, f"nbdfuse exited {proc.returncode}: {log.read_text()}"
            assert time.monotonic() < deadline, "nbdfuse did not mount in 15 s"
            time.sleep(0.05)
        yield image
    finally:
        # A loop device detached a moment ago may still hold the file: the kernel
        # releases it once the loop's dirty pages are written back through FUSE and NBD,
        # and nbdfuse exits once its own are.  Measured on a quiet machine: 0 s in most
        # runs, but busy for 19.7 s in one and an exit 16.2 s after the unmount in
        # another (CI at load 8: over 30 s).  "busy" is retried and the exit awaited,
        # bounded; the bounds are about teardown, not what the tests measure.
        t0 = time.monotonic()
        tried = []
        while os.path.ismount(mountdir):
            p = subprocess.run(["fusermount3", "-u", str(mountdir)], check=False,
                               timeout=30, capture_output=True, text=True)
            tried.append(f"{time.monotonic() - t0:.1f}s rc={p.returncode} {p.stderr.strip()}")
            if p.returncode == 0 or "busy" not in p.stderr or time.monotonic() > t0 + 60:
                break
            time.sleep(0.2)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            subprocess.run(["fusermount3", "-uz", str(mountdir)], check=False, timeout=30)
    assert proc.returncode == 0, (
        f"nbdfuse exited {proc.returncode} {time.monotonic() - t0:.1f} s after the first "
        f"unmount; fusermount3 -u: {tried[:2] + tried[-2:]}; log: {log.read_text()}")


@contextmanager
def loop_device(image: Path, readonly: bool = False) -> Iterator[str]:
    """Attach ``image`` to a free loop device (buffered I/O); detach it after."""
    argv = ["losetup", "--find", "--show", "--direct-io=off"]
    if readonly:
        argv.append("--read-only")
    dev = run([*argv, str(image)]).stdout.strip()
    assert dev.startswith("/dev/loop"), dev
    try:
        yield dev
    finally:
        run(["losetup", "--detach", dev], check=False)


@contextmanager
def mounted(dev: str, mnt: Path, options: str = "") -> Iterator[Path]:
    mnt.mkdir(exist_ok=True)
    run(["mount", *(["-o", options] if options else []), dev, str(mnt)])
    try:
        yield mnt
    finally:
        if os.path.ismount(mnt):
            p = run(["umount", str(mnt)], check=False)
            if p.returncode != 0:
                run(["umount", "-l", str(mnt)], check=False)


# -- another local user (tests/integration/test_local_users.py) ---------------------------

class Nobody:
    """Runs a function in a forked child that is user nobody (no supplementary groups):
    what another local user could do.  ``errno(fn)`` is 0 when ``fn`` succeeded, else the
    errno of the OSError it raised."""

    def __init__(self) -> None:
        import grp
        import pwd

        self.uid = pwd.getpwnam("nobody").pw_uid
        self.gid = grp.getgrnam("nogroup").gr_gid

    def run(self, fn: Any) -> tuple[str, Any]:
        """("ok", fn()'s JSON-able result) or ("errno", e.errno) or ("error", repr)."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: only syscalls and os._exit from here
            try:
                os.close(r)
                os.setgroups([])
                os.setresgid(self.gid, self.gid, self.gid)
                os.setresuid(self.uid, self.uid, self.uid)
                try:
                    out: tuple[str, Any] = ("ok", fn())
                except OSError as e:
                    out = ("errno", e.errno)
                except BaseException as e:  # noqa: BLE001 - reported to the parent
                    out = ("error", repr(e))
                os.write(w, json.dumps(out).encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            data = f.read()
        os.waitpid(pid, 0)
        kind, value = json.loads(data or b'["error", "the child said nothing"]')
        return kind, value

    def errno(self, fn: Any) -> int:
        kind, value = self.run(fn)
        assert kind != "error", value
        return 0 if kind == "ok" else int(value)


@pytest.fixture
def nobody() -> Nobody:
    if os.geteuid() != 0:
        pytest.skip("becomes user nobody: needs root")
    return Nobody()


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory under /tmp that every user may search (pytest's tmp_path is 0700, which
    would hide a data directory's modes): what a data directory is made in."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="nbdgw-users-", dir="/tmp"))
    base.chmod(0o755)
    old = os.umask(0o022)  # an admin's umask; nbdgw's modes must not depend on it
    try:
        yield base
    finally:
        os.umask(old)
        shutil.rmtree(base, ignore_errors=True)


# -- a node with control.group (the daemon's socket opened to a group) ----------------------

GROUP = "daemon"  # any group nobody is not in


def group_node(prefix: str) -> Path:
    """A node config with control.group GROUP, readable by nobody, and volume v1 created
    by root (no daemon yet), in a fresh directory under /tmp; returns the config path."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    base.chmod(0o755)  # the config must be readable by nobody
    cfg = {"version": 1, "node": {"name": "main", "data_dir": str(base / "data")},
           "nbd": {"listen": [f"tcp:127.0.0.1:{free_port()}"]},
           "control": {"group": GROUP}}
    path = base / "nbdgw.yaml"
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o644)
    run_nbdgw("-c", str(path), "volume", "create", "v1", "--size", "8M")
    return path


def as_nobody(config: Path, *args: str, groups: tuple[str, ...] = ()
              ) -> subprocess.CompletedProcess[str]:
    """`nbdgw -c CONFIG ARGS` as user nobody, in ``groups`` besides nogroup."""
    return subprocess.run([NBDGW, "-c", str(config), *args], capture_output=True, text=True,
                          timeout=60, check=False, user="nobody", group="nogroup",
                          extra_groups=list(groups), cwd="/")


# -- a real ReceiverServer process (the daemon's receiving side, one port for every volume) --

# Serves the replica volumes named in argv[4:] of the data directory argv[1] as node argv[2]
# with the secret in the file argv[3]; prints "listening PORT"; stops on SIGTERM.
RX_SERVER = r"""
import asyncio, signal, sys
from pathlib import Path
import uvloop
from nbdgw_common.logs import configure
from peerlink.receiver import Receiver, ReceiverServer

async def main(data_dir, node, secret_file, volumes):
    secret = Path(secret_file).read_bytes().strip()
    rxs = {v: Receiver(Path(data_dir), v, node=node, secret=secret, timeout=3)
           for v in volumes}
    server = ReceiverServer(rxs, node=node, timeout=3, secret=secret)
    _, port = await server.start("127.0.0.1", 0)
    print(f"listening {port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.close()

configure(fmt="json")
uvloop.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]))
"""


class RxServer:
    """A `ReceiverServer` in its own process: its port, RSS and JSON log events."""

    def __init__(self, data_dir: Path, node: str, secret_file: Path, volumes: list[str],
                 log: Path) -> None:
        self.log = log
        self.logf = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RX_SERVER, str(data_dir), node, str(secret_file),
             *volumes], stdout=subprocess.PIPE, stderr=self.logf, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("listening "), f"{line!r}\n{log.read_text()}"
        self.port = int(line.split()[1])

    def rss(self) -> int:
        """Resident set size in bytes (VmRSS)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in (json.loads(x) for x in self.log.read_text().splitlines()
                            if x.startswith("{")) if e.get("event") == name]

    def stop(self) -> int:
        return stop_process(self.proc, self.logf, "ReceiverServer")


@pytest.fixture
def rx_server(tmp_path: Path) -> Iterator[Callable[..., RxServer]]:
    """Factory: ``rx_server(data_dir, node, secret_file, volumes)`` starts a real
    ReceiverServer process; killed at teardown if the test did not stop it."""
    started: list[RxServer] = []

    def start(data_dir: Path, node: str, secret_file: Path,
              volumes: tuple[str, ...] = ("v1",)) -> RxServer:
        s = RxServer(data_dir, node, secret_file, list(volumes),
                     tmp_path / f"rx-server-{len(started)}.log")
        started.append(s)
        return s

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(10)
        if not s.logf.closed:
            s.logf.close()


# -- peerlink end to end (tests/integration/peerenv.py) -------------------------------------


@pytest.fixture
def env(tmp_path: Path, data_dir: Path, volume: str, serve: Callable[..., Served]
        ) -> Iterator[Env]:
    replica = tmp_path / "replica"
    replica.mkdir()
    run_nbdgw("volume", "create", "v1", "--size", "64M", "--replica", "--data-dir", str(replica))
    e = Env(tmp_path, data_dir, replica, serve())
    try:
        yield e
    finally:
        e.kill_all()


# -- a daemon serving one volume, with a peer away and metrics on (test_metrics, the
# status schema) ----------------------------------------------------------------------------


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[dict[str, Any]]:
    data = tmp_path / "data"
    sock = tmp_path / "nbd.sock"
    port = free_port()
    secret = tmp_path / "peer.secret"
    secret.write_text(os.urandom(32).hex())
    secret.chmod(0o600)  # config check refuses a secret others can read
    cfg = {"version": 1, "node": {"name": "main", "data_dir": str(data), "role": "primary"},
           "nbd": {"listen": [f"unix:{sock}"]}, "failover": {"auto": False},
           "peerlink": {"listen": f"127.0.0.1:{free_port()}", "secret_file": str(secret)},
           "peers": [{"name": "dc", "role": "secondary", "address": "127.0.0.1",
                      "port": free_port()}],  # nobody listens: the peer is away
           "metrics": {"listen": f"127.0.0.1:{port}"}}
    path = tmp_path / "nbdgw.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_nbdgw("-c", str(path), "volume", "create", "v1", "--size", "32M")
    log = (tmp_path / "daemon.log").open("wb")
    proc = subprocess.Popen([NBDGW, "-c", str(path), "--log-format", "json", "daemon"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while not (sock.exists() and (data / "volumes" / "v1" / "control.sock").exists()):
        assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
        assert time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
        time.sleep(0.1)
    yield {"port": port, "sock": sock, "config": path, "data": data, "proc": proc}
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(40)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


# -- files of known content on a file system (test_filesystem, snapshots of it) ------------

# What the file-system tests need: root, FUSE and loop devices.
FS_MARKS = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE, losetup, mount)"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is not available"),
    pytest.mark.skipif(not os.path.exists("/dev/loop-control"),
                       reason="loop devices are not available (/dev/loop-control missing)"),
]


def make_files(rng: random.Random) -> dict[str, bytes]:
    """A few files of known content, from empty to several MiB, some in a subdirectory."""
    sizes = {"empty": 0, "one-byte": 1, "odd.bin": 12_345, "four-k": 4096,
             "dir/two-mib": 2 * (1 << 20), "dir/sub/three-mib-plus": 3 * (1 << 20) + 17,
             "big.bin": 5 * (1 << 20)}
    return {name: rng.randbytes(n) for name, n in sizes.items()}


# -- a cluster of three real daemons (tests/integration/cluster.py) ------------------------


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Any]:
    made: list[Node] = []

    def make(topology: str = "fanout", modes: dict[str, str] | None = None,
             sync_timeout: float = 2.0) -> list[Node]:
        secret = tmp_path / "peer.secret"
        secret.write_text(secrets.token_hex(32))
        secret.chmod(0o600)  # config check refuses a secret others can read
        nodes = [Node(tmp_path, n, r, free_port()) for n, r in SITES]
        for n in nodes:
            n.write_config(nodes, topology, modes or {}, secret, sync_timeout)
            n.nbdgw("volume", "create", "v1", "--size", str(SIZE),
                    *(["--replica"] if n.role != "primary" else []))
        made.extend(nodes)
        return nodes

    yield make
    for n in made:
        if n.proc is not None:
            with __import__("contextlib").suppress(Exception):
                n.stop(signal.SIGKILL)


# -- the iSCSI bridge in front of one nbdgw serve (tests/integration/iscsienv.py) --------


@pytest.fixture
def iscsi(tmp_path: Path, volume: str, serve: Callable[..., Served]
          ) -> Iterator[Callable[..., IscsiEnv]]:
    """Factory: ``iscsi(exports=[...], served=..., **IscsiConfig fields)`` -> reconciled env."""
    made: list[IscsiEnv] = []

    def make(exports: list[Export] | None = None, served: Served | None = None,
             nbd_uri: Callable[[str], str] | None = None, route: str | None = None,
             **kw: Any) -> IscsiEnv:
        e = IscsiEnv(tmp_path, served or serve(), exports or [Export("v1")], nbd_uri, route,
                     **kw)
        made.append(e)
        e.reconcile()
        return e

    yield make
    for e in made:
        e.cleanup()


# -- a small file system that fills up (full disks, store health) --------------------------


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the duration (unmounted lazily even on
    failure, so that a process still holding a file cannot keep it mounted)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True, capture_output=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True, capture_output=True,
                       timeout=30)


@contextmanager
def connected(s: Served, export: str = "v1") -> Iterator[Any]:
    """A libnbd handle on ``export`` of ``s``, shut down on exit (nbdkit waits for
    connected clients when it stops)."""
    import nbd

    h = s.connect(export)
    try:
        yield h
    finally:
        with contextlib.suppress(nbd.Error):
            h.shutdown()
