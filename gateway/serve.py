"""Run nbdkit with the nbdgw plugin: listening sockets, filters, TLS, clean shutdown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from blockstore.errors import BlockstoreError
from blockstore.volume import Volume, list_volumes
from nbd_plugin import PLUGIN_PATH

from .config import Listen, NodeConfig, TlsMode
from .errors import GatewayError

log = structlog.get_logger(component="serve")

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def plugin_site_dirs() -> str:
    """Where nbdkit's embedded interpreter finds nbdgw and its dependencies."""
    return os.pathsep.join([sysconfig.get_paths()["purelib"], str(PROJECT_ROOT)])


@dataclass(frozen=True)
class PrecheckResult:
    served: list[str]
    failed: dict[str, str]


def precheck_volumes(cfg: NodeConfig, names: list[str] | None) -> PrecheckResult:
    """Open (and so recover) each volume before nbdkit starts, to report errors clearly."""
    if names is None:
        names = [v.name for v in cfg.volumes] or [v.name for v in list_volumes(cfg.data_dir)]
    served, failed = [], {}
    for name in names:
        ro = bool((v := cfg.volume(name)) and v.read_only)
        try:
            vol = Volume.open(cfg.data_dir, name, readonly=ro, al_slots=cfg.al_extents,
                              journal_max_bytes=cfg.journal.max_bytes,
                              segment_bytes=cfg.journal.segment_bytes)
        except (BlockstoreError, OSError) as e:
            failed[name] = str(e)
            continue
        if vol.recovery.unclean and not ro:
            r = vol.recovery
            log.warning("volume_recovered", volume=name, replayed=r.replayed,
                        torn_bytes=r.torn_bytes, hot_extents=r.hot_extents)
        vol.close()
        served.append(name)
    return PrecheckResult(served, failed)


def bind(listen: Listen) -> socket.socket:
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
    s.listen(128)
    return s


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


def nbdkit_argv(cfg: NodeConfig, volumes: list[str], all_readonly: bool = False) -> list[str]:
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
    if cfg.nbd.allow:
        argv.append("--filter=ip")
    if all_readonly:
        argv.append("-r")
    argv += ["python", str(PLUGIN_PATH), f"data_dir={cfg.data_dir}",
             f"al_slots={cfg.al_extents}", f"journal_max_bytes={cfg.journal.max_bytes}"]
    argv += [f"volume={v}" for v in volumes]
    argv += [f"readonly={v.name}" for v in cfg.volumes if v.read_only]
    if cfg.nbd.allow:
        argv += [f"allow={','.join(cfg.nbd.allow)}", "deny=all"]
    return argv


class NbdServer:
    """One nbdkit process serving the node's volumes on every listen address."""

    def __init__(self, cfg: NodeConfig, volumes: list[str], all_readonly: bool = False) -> None:
        self.cfg = cfg
        self.volumes = volumes
        self.all_readonly = all_readonly
        self.proc: subprocess.Popen[bytes] | None = None
        self.addresses: list[Listen] = []

    def start(self) -> None:
        socks = [bind(x) for x in self.cfg.nbd.listen]
        self.addresses = [bound_address(x, s) for x, s in zip(self.cfg.nbd.listen, socks,
                                                               strict=True)]
        fds = [s.fileno() for s in socks]
        argv = [sys.executable, "-m", "gateway.sockact", ",".join(map(str, fds)),
                *nbdkit_argv(self.cfg, self.volumes, self.all_readonly)]
        env = dict(os.environ, NBDGW_SITE=plugin_site_dirs())
        log.info("nbdkit_starting", argv=argv[4:])
        try:
            self.proc = subprocess.Popen(argv, pass_fds=fds, env=env, cwd="/")
        finally:
            for s in socks:
                s.close()

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM nbdkit (it closes every volume cleanly) and wait for it."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("nbdkit_kill", reason=f"no exit {timeout} s after SIGTERM")
                self.proc.kill()
                self.proc.wait()
        for a in self.addresses:
            if a.kind == "unix":
                Path(a.path).unlink(missing_ok=True)
        return self.proc.returncode

    def wait_ready(self, timeout: float = 15) -> None:
        """Return once nbdkit answers on its first address (or raise if it died)."""
        deadline = time.monotonic() + timeout
        import nbd  # python3-libnbd, through --system-site-packages

        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise GatewayError(f"nbdkit exited with status {self.proc.returncode}")
            h = nbd.NBD()
            try:
                h.set_opt_mode(True)
                a = self.addresses[0]
                if self.cfg.nbd.tls.mode is TlsMode.REQUIRE or self.cfg.nbd.allow:
                    # Cannot probe without the client's key or address; the sockets are
                    # bound already, so clients queue until nbdkit accepts them.
                    time.sleep(0.3)
                    if self.proc is not None and self.proc.poll() is not None:
                        continue
                    return
                if a.kind == "unix":
                    h.connect_unix(a.path)
                else:
                    h.connect_tcp(a.host if a.host not in ("0.0.0.0", "::") else "127.0.0.1",
                                  str(a.port))
                h.opt_abort()
                return
            except nbd.Error:
                time.sleep(0.05)
            finally:
                del h
        raise GatewayError(f"nbdkit did not become ready in {timeout} s")
