"""Run nbdkit with the nbdgw plugin: listening sockets, filters, TLS, clean shutdown."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import signal
import socket
import struct
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from blockstore.errors import BlockstoreError, NoSpace
from blockstore.volume import Volume, is_replica, list_volumes
from nbd_plugin import PLUGIN_PATH
from nbdgw_common.errors import GatewayError
from nbdgw_common.logs import LOGGED_MARK
from nbdgw_common.supervise import ChildProcess, NotReady

from .cdp import apply_policies
from .config import Listen, NodeConfig, PeerMode, TlsMode
from .replication import gate_path, has_failover_core, sync_timeout

log = structlog.get_logger(component="serve")

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def plugin_site_dirs() -> str:
    """Where nbdkit's embedded interpreter finds nbdgw and its dependencies."""
    return os.pathsep.join([sysconfig.get_paths()["purelib"], str(PROJECT_ROOT)])


@dataclass(frozen=True)
class PrecheckResult:
    served: list[str]
    failed: dict[str, str]


def precheck_volumes(cfg: NodeConfig, names: list[str] | None,
                     all_readonly: bool = False) -> PrecheckResult:
    """Open (and so recover) each volume before nbdkit starts, to report errors clearly.

    A volume served read-only (``all_readonly``, or declared read_only) that was closed
    cleanly is opened read-only: nothing is written, so it is served on a full disk too.
    One that was not is recovered first; if even that fails for lack of space it is
    served as its store stands, with a warning (what the journal holds past the last
    checkpoint is not in it after a power loss)."""
    apply_policies(cfg)  # CDP windows, read by each volume's next open
    if names is None:
        names = [v.name for v in cfg.volumes] or [
            v.name for v in list_volumes(cfg.data_dir) if not is_replica(v)]
    served, failed = [], {}
    kw = {"al_slots": cfg.al_extents, "journal_max_bytes": cfg.journal.max_bytes,
          "segment_bytes": cfg.journal.segment_bytes}
    for name in names:
        ro = all_readonly or bool((v := cfg.volume(name)) and v.read_only)
        try:
            vol = Volume.open(cfg.data_dir, name, readonly=ro, **kw)
            if ro and vol.recovery.unclean and not vol.replica:
                vol.close()
                try:
                    vol = Volume.open(cfg.data_dir, name, **kw)
                except NoSpace as e:
                    log.warning("volume_not_recovered", volume=name, error=str(e),
                                consequence="served read-only as its store stands")
                    vol = Volume.open(cfg.data_dir, name, readonly=True, **kw)
        except (BlockstoreError, OSError) as e:
            failed[name] = str(e)
            continue
        if vol.replica:
            vol.close()
            failed[name] = ("it is a replica: written by peerlink, not served until promoted")
            continue
        if vol.recovery.unclean and not vol.readonly:
            r = vol.recovery
            log.warning("volume_recovered", volume=name, replayed=r.replayed,
                        torn_bytes=r.torn_bytes, hot_extents=r.hot_extents)
        vol.close()
        served.append(name)
    return PrecheckResult(served, failed)


# Classic BPF (linux/filter.h) for the client allow-list.  Debian's nbdkit 1.32 ip
# filter is built without inet_pton and rejects every address rule, so the kernel
# filters instead: a socket filter on a TCP listener drops SYNs from other sources.
_SKF_NET_OFF = -0x100000
_BPF_LD_W_ABS, _BPF_LD_B_ABS, _BPF_ALU_AND_K, _BPF_ALU_RSH_K = 0x20, 0x30, 0x54, 0x74
_BPF_JEQ_K, _BPF_RET_K = 0x15, 0x06
_SO_ATTACH_FILTER = 26  # linux/asm-generic/socket.h; the socket module lacks it


def _ins(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)


def allow_filter(cidrs: tuple[str, ...]) -> list[bytes]:
    """A cBPF program that accepts packets whose IPv4/IPv6 source is in ``cidrs``.

    Built as (code, k, jt-label, jf-label) with labels resolved at the end; each network
    is one block that jumps to ACCEPT on a match and falls through to the next block.
    """
    nets = [ipaddress.ip_network(c) for c in cidrs]
    ACCEPT, DROP = "accept", "drop"
    prog: list[tuple[int, int, str | None, str | None]] = []
    labels: dict[str, int] = {}
    prog += [(_BPF_LD_B_ABS, _SKF_NET_OFF, None, None), (_BPF_ALU_RSH_K, 4, None, None),
             (_BPF_JEQ_K, 4, None, "v6")]
    for version, label in ((4, "v4"), (6, "v6")):
        labels[label] = len(prog)
        for i, n in enumerate(x for x in nets if x.version == version):
            nxt = f"{label}-{i + 1}"
            src, width = (12, 1) if version == 4 else (8, 4)
            words = struct.unpack(f"!{width}I", n.network_address.packed)
            masks = struct.unpack(f"!{width}I", n.netmask.packed)
            for w in range(width):
                prog += [(_BPF_LD_W_ABS, _SKF_NET_OFF + src + 4 * w, None, None),
                         (_BPF_ALU_AND_K, masks[w], None, None),
                         (_BPF_JEQ_K, words[w], ACCEPT if w == width - 1 else None, nxt)]
            labels[nxt] = len(prog)
        prog.append((_BPF_RET_K, 0, None, None))  # no network matched
    labels[DROP] = len(prog) - 1
    labels[ACCEPT] = len(prog)
    prog.append((_BPF_RET_K, 0xFFFFFFFF, None, None))
    out = []
    for pc, (code, k, jt, jf) in enumerate(prog):
        rel = [labels[x] - pc - 1 if x else 0 for x in (jt, jf)]
        if any(not 0 <= r <= 255 for r in rel):
            raise GatewayError(f"allow-list too long for one filter ({len(nets)} entries)")
        out.append(_ins(code, k, *rel))
    return out


def attach_allow_filter(s: socket.socket, cidrs: tuple[str, ...]) -> None:
    prog = b"".join(allow_filter(cidrs))
    buf = ctypes.create_string_buffer(prog)
    fprog = struct.pack("HL", len(prog) // 8, ctypes.addressof(buf))
    s.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)


def bind(listen: Listen, allow: tuple[str, ...] = ()) -> socket.socket:
    if listen.kind == "unix":
        path = Path(listen.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket():
            path.unlink()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        os.chmod(path, 0o660)
    else:
        fam = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((listen.host, listen.port))
        if allow:
            attach_allow_filter(s, allow)
    s.listen(128)
    return s


def open_to_network(cfg: NodeConfig) -> list[Listen]:
    """The TCP addresses NBD accepts any client on: not loopback, no allow-list, and
    plaintext allowed (TLS off, or on without require).  Unix sockets are governed by
    their file mode."""
    if cfg.nbd.allow or cfg.nbd.tls.mode is TlsMode.REQUIRE:
        return []
    return [a for a in cfg.nbd.listen
            if a.kind == "tcp" and not ipaddress.ip_address(a.host).is_loopback]


def warn_if_open(cfg: NodeConfig) -> str | None:
    """Warn once, at start, when NBD is open to the network: a structured log event
    (nbd_open_to_network) and one line on stderr, which is what `serve` and the daemon
    print before serving.  Returns the line (None when nothing is open)."""
    exposed = open_to_network(cfg)
    if not exposed:
        return None
    where = ", ".join(str(a) for a in exposed)
    tls = "TLS off" if cfg.nbd.tls.mode is TlsMode.OFF else "TLS not required"
    line = (f"nbdgw: warning: NBD on {where} accepts any client that reaches it ({tls}, "
            "no allow-list): anyone there can read and overwrite every served volume; "
            "set nbd.allow to the client networks or nbd.tls.mode: require (SECURITY.md)")
    log.warning("nbd_open_to_network", listen=[str(a) for a in exposed],
                tls=cfg.nbd.tls.mode.value, allow=[],
                fix="set nbd.allow or nbd.tls.mode: require")
    print(line, file=sys.stderr, flush=True)
    return line


def bound_address(listen: Listen, s: socket.socket) -> Listen:
    if listen.kind == "unix":
        return listen
    return Listen("tcp", host=listen.host, port=s.getsockname()[1])


def uri(addr: Listen, export: str, tls: bool) -> str:
    if addr.kind == "unix":
        return f"nbd{'s' if tls else ''}+unix:///{export}?socket={addr.path}"
    host = f"[{addr.host}]" if ":" in addr.host else addr.host
    if host in ("0.0.0.0", "[::]"):
        host = "HOST"
    return f"nbd{'s' if tls else ''}://{host}:{addr.port}/{export}"


def lease_path(data_dir: Path) -> Path:
    return data_dir / "run" / "write.lease"


def nbdkit_argv(cfg: NodeConfig, volumes: list[str] | None,
                all_readonly: bool = False, replicas_only: bool = False) -> list[str]:
    """``volumes`` None: serve every primary volume of data_dir, those created later too.
    ``replicas_only``: a secondary's nbdkit for readers (nbd_plugin Params.replicas_only):
    it writes no volume, so it takes neither the lease nor the sync gate."""
    argv = ["nbdkit", "--exit-with-parent"]
    tls = cfg.nbd.tls
    if tls.mode is not TlsMode.OFF:
        argv.append(f"--tls={tls.mode.value}")
        if tls.psk_file is not None:
            argv.append(f"--tls-psk={tls.psk_file}")
        if tls.certificates_dir is not None:
            argv.append(f"--tls-certificates={tls.certificates_dir}")
        if tls.verify_peer:
            argv.append("--tls-verify-peer")
    if all_readonly:
        argv.append("-r")
    argv += ["python", str(PLUGIN_PATH), f"data_dir={cfg.data_dir}",
             f"al_slots={cfg.al_extents}", f"journal_max_bytes={cfg.journal.max_bytes}",
             f"segment_bytes={cfg.journal.segment_bytes}"]
    writes_volumes = not (all_readonly or replicas_only)
    if replicas_only:
        argv.append("replicas_only=true")
    if cfg.failover.auto and cfg.peers and writes_volumes:
        # Writes need the daemon's lease (nbd_plugin/lease.py; the node core sets it).
        argv += [f"lease={lease_path(cfg.data_dir)}"]
    timeout = sync_timeout(cfg)
    if timeout is not None and writes_volumes:
        # Every write waits for the sync peers' acks (nbd_plugin/syncgate.py).
        argv += [f"sync_socket={gate_path(cfg.data_dir)}", f"sync_timeout={timeout:g}",
                 f"sync_auto_degrade={'false' if has_failover_core(cfg) else 'true'}",
                 "sync_peers=" + ",".join(p.name for p in cfg.send_to()
                                          if p.mode is PeerMode.SYNC)]
    argv += [f"volume={v}" for v in volumes or ()]
    if cfg.nbd.default_export is not None:
        argv.append(f"default_export={cfg.nbd.default_export}")
    argv += [f"readonly={v.name}" for v in cfg.volumes if v.read_only]
    return argv


_libc = ctypes.CDLL(None, use_errno=True)
_SYS_pidfd_getfd = 438


def disconnect_clients(pid: int) -> int:
    """shutdown(2) every connected socket of process ``pid`` (our nbdkit child)."""
    count = 0
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except FileNotFoundError:
                continue
            fd = _libc.syscall(_SYS_pidfd_getfd, pidfd, int(name), 0)
            if fd < 0:
                continue
            with socket.socket(fileno=fd) as s:
                if not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    s.shutdown(socket.SHUT_RDWR)
                    count += 1
    finally:
        os.close(pidfd)
    return count


def forward_stderr(line: bytes) -> None:
    """Copy a line of nbdkit's stderr to ours, unless nbdkit printed it for a request
    whose failure the plugin logged already as a structured, rate-limited event
    (logs.quiet_logged_errors: one marked line each, a client retrying writes on a full
    disk would print one per request)."""
    if LOGGED_MARK.encode() in line:
        return
    view = memoryview(line)
    with contextlib.suppress(OSError):  # our stderr is gone: nbdkit's is drained all the same
        while view:
            view = view[os.write(2, view):]


class NbdServer:
    """One nbdkit process serving the node's volumes on every listen address."""

    def __init__(self, cfg: NodeConfig, volumes: list[str], all_readonly: bool = False,
                 discover: bool = False, replicas_only: bool = False) -> None:
        """``volumes``: those served now; ``discover``: also serve volumes created (or
        promoted) in data_dir while it runs; ``replicas_only``: see nbdkit_argv."""
        self.cfg = cfg
        self.volumes = volumes
        self.all_readonly = all_readonly
        self.discover = discover
        self.replicas_only = replicas_only
        self.child: ChildProcess | None = None  # a new one each start: new sockets
        self.addresses: list[Listen] = []

    def _bind(self) -> list[tuple[Listen, socket.socket]]:
        """Every listen address, bound.  For readers (``replicas_only``) an address this
        host does not have is skipped: the service address is on the primary only."""
        bound = []
        for x in self.cfg.nbd.listen:
            try:
                bound.append((x, bind(x, self.cfg.nbd.allow)))
            except OSError as e:
                if not (self.replicas_only and e.errno == errno.EADDRNOTAVAIL):
                    for _x, s in bound:
                        s.close()
                    raise
                log.warning("nbd_address_skipped", listen=str(x), error=str(e),
                            note="not an address of this node: readers use the others")
        if not bound:
            raise GatewayError("no address of nbd.listen is on this node")
        return bound

    def start(self) -> None:
        bound = self._bind()
        socks = [s for _x, s in bound]
        self.addresses = [bound_address(x, s) for x, s in bound]
        fds = [s.fileno() for s in socks]
        argv = [sys.executable, "-m", "gateway.sockact", ",".join(map(str, fds)),
                *nbdkit_argv(self.cfg, None if self.discover else self.volumes,
                             self.all_readonly, self.replicas_only)]
        env = dict(os.environ, NBDGW_SITE=plugin_site_dirs())
        log.info("nbdkit_starting", argv=argv[4:])
        self.child = ChildProcess(argv, name="nbdkit", env=env, pass_fds=fds,
                                  on_stderr=forward_stderr)
        try:
            self.child.start()
        finally:
            for s in socks:
                s.close()

    def poll(self) -> int | None:
        return None if self.child is None else self.child.returncode

    def kill(self) -> None:
        if self.child is not None:
            self.child.kill()

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM nbdkit (it closes every volume cleanly) and wait for it; its exit
        status (None: it never ran, or outlived SIGKILL)."""
        child = self.child
        if child is None:
            return None
        if (pid := child.pid) is not None:
            child.send_signal(signal.SIGTERM)
            # nbdkit answers requests with ESHUTDOWN after SIGTERM but only exits (and
            # runs the plugin's cleanup) once every client has disconnected.
            if child.wait(2) is None:
                n = disconnect_clients(pid)
                log.warning("nbdkit_clients_disconnected", clients=n)
        rc = child.stop(timeout, sig=None, on_kill=lambda: log.error(
            "nbdkit_kill", reason=f"no exit {timeout} s after SIGTERM"))
        for a in self.addresses:
            if a.kind == "unix":
                Path(a.path).unlink(missing_ok=True)
        return rc

    def wait_ready(self, timeout: float = 15) -> None:
        """Return once nbdkit answers (or raise if it died).

        Probes a unix address if there is one (the allow-list filters TCP only);
        without one, or when TLS is required (no client key here), it can only check
        that nbdkit stays up: the sockets are bound already, so clients queue meanwhile.
        """
        import nbd  # python3-libnbd, through --system-site-packages

        unix = [a for a in self.addresses if a.kind == "unix"]
        tcp = [a for a in self.addresses if a.kind == "tcp"]
        can_probe = self.cfg.nbd.tls.mode is not TlsMode.REQUIRE and (
            unix or not self.cfg.nbd.allow)

        def answers() -> bool:
            if not can_probe:  # up for 0.3 s
                return child.alive and time.monotonic() - t0 >= 0.3
            h = nbd.NBD()
            try:
                h.set_opt_mode(True)
                if unix:
                    h.connect_unix(unix[0].path)
                else:
                    a = tcp[0]
                    host = "127.0.0.1" if a.host in ("0.0.0.0", "::") else a.host
                    h.connect_tcp(host, str(a.port))
                h.opt_abort()
                return True
            except nbd.Error:
                return False
            finally:
                del h

        t0 = time.monotonic()
        # None: its start failed; the daemon may start it again meanwhile (probe on)
        child = self.child or ChildProcess(["nbdkit"])
        try:
            child.wait_ready(answers, timeout)
        except NotReady as e:
            raise GatewayError(f"nbdkit exited with status {e.status}" if e.status is not None
                               else f"nbdkit did not become ready in {timeout} s") from None
