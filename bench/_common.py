"""Shared helpers for the benches: temp dirs, nbdkit servers on unix sockets, fio runs.

Every server a bench starts lives under one temp directory and is started with
``--exit-with-parent``, so an interrupted bench leaves no process behind; ``Bench``
stops them by pid and deletes the directory on the way out.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BARE_PLUGIN = Path(__file__).resolve().with_name("bare_plugin.py")
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


class BenchError(Exception):
    """A server or fio run failed; carries what was run and what it said."""


def quiet_logs() -> None:
    """Keep structlog (used by gateway/ and blockstore/) off the bench's table output."""
    import logging

    import structlog

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )


def proc_status_kib(pid: int, key: str = "VmRSS") -> int:
    """A KiB figure (VmRSS, VmHWM, ...) of a process, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


def wait_nbd_ready(sock: Path, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """Return once an NBD server answers on ``sock``; raise if it died or never did."""
    import nbd  # python3-libnbd (the venv has --system-site-packages)

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{proc.args!r} exited with status {proc.returncode}")
        if sock.exists():
            h = nbd.NBD()
            try:
                h.set_opt_mode(True)
                h.connect_unix(str(sock))
                h.opt_abort()
                return
            except nbd.Error:
                pass
            finally:
                del h
        time.sleep(0.05)
    raise BenchError(f"no NBD server on {sock} after {timeout} s")


@dataclass
class Server:
    """One running NBD server the bench can point fio at."""

    label: str
    sock: Path
    proc: subprocess.Popen[bytes]
    export: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.export}?socket={self.sock}"

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM (nbdgw closes its volumes cleanly on it), then SIGKILL if stuck."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Bench:
    """A temp directory plus the servers started in it; cleans both up on exit."""

    def __init__(self, prefix: str = "nbdgw-bench-") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.servers: list[Server] = []
        self._nbdgw: list[object] = []

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        for s in reversed(self.servers):
            s.stop()
        if os.environ.get("NBDGW_BENCH_KEEP"):
            print(f"bench dir kept for inspection: {self.dir}", file=sys.stderr)
            return
        shutil.rmtree(self.dir, ignore_errors=True)

    def settle(self) -> float:
        """fdatasync every file in the temp dir (images, stores, journals) and return
        the seconds it took: each job then starts with none of the previous job's dirty
        pages, so kernel writeback throttling does not bill one server for another."""
        t = time.monotonic()
        for root, _dirs, files in os.walk(self.dir):
            for name in files:
                try:
                    fd = os.open(os.path.join(root, name), os.O_RDONLY | os.O_NOFOLLOW)
                except OSError:
                    continue  # a journal segment released meanwhile, a socket
                try:
                    if stat.S_ISREG(os.fstat(fd).st_mode):
                        os.fdatasync(fd)
                finally:
                    os.close(fd)
        return time.monotonic() - t

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    def stop(self, server: Server) -> None:
        server.stop()
        self.servers.remove(server)

    def nbdkit(self, label: str, *plugin_argv: str) -> Server:
        """``nbdkit -U SOCK -f --exit-with-parent PLUGIN ARGS`` on a socket in the temp dir."""
        sock = self.path(f"{label}.sock")
        argv = ["nbdkit", "-U", str(sock), "-f", "--exit-with-parent", *plugin_argv]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, cwd=self.dir)
        server = Server(label, sock, proc)
        self.servers.append(server)
        wait_nbd_ready(sock, proc)
        return server

    def file_image(self, name: str, size: int) -> Path:
        """A sparse file of ``size`` bytes in the temp dir."""
        p = self.path(name)
        with p.open("wb") as f:
            f.truncate(size)
        return p

    def nbdgw(self, label: str, data_dir: Path, volume: str) -> Server:
        """Serve ``volume`` exactly as `nbdgw serve` does: precheck, then NbdServer with
        the node defaults (journal on, 1 GiB retention, env NBDGW_SITE from
        gateway.serve.plugin_site_dirs()), socket-activated on a unix socket."""
        from gateway.config import NbdConfig, default_config, parse_listen
        from gateway.serve import NbdServer, precheck_volumes

        sock = self.path(f"{label}.sock")
        cfg = default_config().with_overrides(
            data_dir=data_dir, nbd=NbdConfig((parse_listen(f"unix:{sock}"),)))
        pre = precheck_volumes(cfg, [volume])
        if pre.failed:
            raise BenchError(f"volume {volume} cannot be served: {pre.failed[volume]}")
        ns = NbdServer(cfg, pre.served)
        ns.start()
        assert ns.proc is not None
        # gateway.sockact execs nbdkit in the same process, so this pid is nbdkit's.
        server = Server(label, sock, ns.proc, export=volume)
        self.servers.append(server)
        ns.wait_ready()
        return server


@dataclass(frozen=True)
class FioResult:
    """One fio job's figures for the direction it ran."""

    iops: float
    bw_bytes: float  # bytes per second
    io_bytes: int
    runtime_ms: int

    @property
    def mib_s(self) -> float:
        return self.bw_bytes / MiB


def fio(bench: Bench, server: Server, name: str, rw: str, bs: str, *,
        iodepth: int = 16, size: str | int | None = None, runtime: float | None = None,
        time_based: bool = True, ramp: float = 0, extra: tuple[str, ...] = ()) -> FioResult:
    """Run one fio job with the nbd engine against ``server``; return its figures."""
    job = fio_job(bench, server, name, rw, bs, iodepth=iodepth, size=size, runtime=runtime,
                  time_based=time_based, ramp=ramp, extra=extra)
    d = job["read"] if rw in ("read", "randread") else job["write"]
    return FioResult(float(d["iops"]), float(d["bw_bytes"]), int(d["io_bytes"]),
                     int(d["runtime"]))


def fio_job(bench: Bench, server: Server, name: str, rw: str, bs: str, *,
            iodepth: int = 16, size: str | int | None = None, runtime: float | None = None,
            time_based: bool = True, ramp: float = 0, extra: tuple[str, ...] = ()
            ) -> dict[str, Any]:
    """Run one fio job with the nbd engine against ``server``; return fio's JSON of it
    (``write``/``read``/``sync`` sections with ``clat_ns``/``lat_ns`` percentiles)."""
    out = bench.path(f"fio-{name}-{time.monotonic_ns()}.json")
    argv = ["fio", f"--name={name}", "--ioengine=nbd", f"--uri={server.uri}", f"--rw={rw}",
            f"--bs={bs}", f"--iodepth={iodepth}", "--output-format=json", f"--output={out}"]
    if size is not None:
        argv.append(f"--size={size}")
    if runtime is not None:
        argv.append(f"--runtime={runtime:g}")
        if time_based:
            argv.append("--time_based")
    if ramp:
        argv.append(f"--ramp_time={ramp:g}")
    argv += list(extra)
    p = subprocess.run(argv, capture_output=True, text=True, check=False,
                       timeout=(runtime or 0) + ramp + 600, cwd=bench.dir)
    if p.returncode != 0 or not out.exists():
        raise BenchError(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    job: dict[str, Any] = json.loads(out.read_text())["jobs"][0]
    if job["error"]:
        raise BenchError(f"fio job {name} on {server.label}: error {job['error']}")
    return job


def dir_bytes(path: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of the files under ``path``."""
    apparent = allocated = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(root, f))
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated
