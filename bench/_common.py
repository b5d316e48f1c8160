"""Shared helpers for the benches: temp dirs, nbdkit servers on unix sockets, fio runs.

Every server a bench starts lives under one temp directory and is started with
``--exit-with-parent`` (nbdkit) or a parent-death signal (other servers, through
``setpriv --pdeathsig``), so an interrupted bench leaves no process behind; ``Bench``
stops them by pid and deletes the directory on the way out.  nbd-server is the one
exception: it always daemonizes, so only ``Bench``'s exit (also on Ctrl-C, and on
SIGTERM where the script calls ``exit_on_sigterm``) stops it, by the pid in its pid file.

fio runs in a session of its own and is killed as a group (the job processes it forks
too) when its time bound runs out or the bench is interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from gateway.config import NodeConfig

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BARE_PLUGIN = Path(__file__).resolve().with_name("bare_plugin.py")
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


class BenchError(Exception):
    """A server or fio run failed; carries what was run and what it said."""


class FioStalled(BenchError):
    """fio did not finish within its time bound (it was killed, with its job processes)."""


def exit_on_sigterm() -> None:
    """SIGTERM ends the bench as Ctrl-C does: through ``Bench.__exit__`` (servers stopped,
    temp dir deleted) instead of dying on the spot."""
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


class PidProc:
    """A server that daemonized away from us (nbd-server), known by the pid in its pid
    file: as much of ``subprocess.Popen`` as ``Server`` and ``wait_nbd_ready`` use.
    It is not our child, so its state comes from /proc (a zombie counts as gone)."""

    def __init__(self, pid: int, args: list[str]) -> None:
        self.pid = pid
        self.args = args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                stat_line = Path(f"/proc/{self.pid}/stat").read_text()
            except FileNotFoundError:
                self.returncode = 0
            else:
                if stat_line.rpartition(")")[2].split()[0] in ("Z", "X"):
                    self.returncode = 0
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                self.returncode = 0

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            time.sleep(0.05)
        assert self.returncode is not None
        return self.returncode


def with_pdeathsig(argv: list[str]) -> list[str]:
    """``argv`` run so that it gets SIGTERM when the bench dies (util-linux setpriv)."""
    if shutil.which("setpriv"):
        return ["setpriv", "--pdeathsig", "TERM", "--", *argv]
    return argv


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


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` so far (/proc/PID/stat fields 14, 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_nbd_ready(sock: Path, proc: subprocess.Popen[bytes] | PidProc,
                   timeout: float = 20) -> None:
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
    proc: subprocess.Popen[bytes] | PidProc
    export: str = ""
    tcp: tuple[str, int] | None = None  # (host, port) when it also listens on TCP

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.export}?socket={self.sock}"

    def with_export(self, export: str) -> Server:
        """The same server, another export (for fio on a second volume)."""
        return dataclasses.replace(self, export=export)

    def fio_args(self) -> list[str]:
        return ["--ioengine=nbd", f"--uri={self.uri}"]

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM (nbdgw closes its volumes cleanly on it), then SIGKILL if stuck."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass(frozen=True)
class FileTarget:
    """A plain file fio drives itself (no NBD): the disk the servers sit on."""

    label: str
    path: Path
    direct: bool  # O_DIRECT (fio --direct=1) or through the page cache
    engine: str = "libaio"

    def fio_args(self) -> list[str]:
        # --invalidate=0: fio drops a file's page cache before each job by default; the
        # servers' files keep theirs, so a buffered file must too.
        return [f"--ioengine={self.engine}", f"--direct={int(self.direct)}",
                *(() if self.direct else ("--invalidate=0",)), f"--filename={self.path}"]


class FioTarget(Protocol):
    """What fio can be pointed at: a ``Server`` (nbd engine) or a ``FileTarget``."""

    @property
    def label(self) -> str: ...

    def fio_args(self) -> list[str]: ...


class Bench:
    """A temp directory plus the servers started in it; cleans both up on exit."""

    def __init__(self, prefix: str = "nbdgw-bench-") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.servers: list[Server] = []
        self._nbdgw: list[object] = []
        self.background: list[subprocess.Popen[bytes]] = []  # fio runs in their own session

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        for p in self.background:
            kill_group(p)
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

    def require_free(self, need: int, what: str) -> None:
        """Refuse to start (BenchError) unless the temp dir's file system has ``need``
        bytes free: a bench that fills the disk halfway fails with ENOSPC from fio."""
        free = shutil.disk_usage(self.dir).free
        if free < need:
            raise BenchError(f"{what}: needs about {need / GiB:.1f} GiB free in {self.dir.parent}"
                             f", there are {free / GiB:.1f} GiB (try a smaller --size or "
                             f"TMPDIR on another file system)")

    def stop(self, server: Server) -> None:
        server.stop()
        self.servers.remove(server)

    def nbdkit(self, label: str, *plugin_argv: str, tcp: bool = False) -> Server:
        """``nbdkit -U SOCK -f --exit-with-parent PLUGIN ARGS`` on a socket in the temp dir.

        ``tcp``: listen on that unix socket and on a free 127.0.0.1 port, both bound here
        and handed over by socket activation (``gateway.sockact``, as `nbdgw serve` hands
        its addresses to nbdkit; nbdkit's -U and -p exclude each other)."""
        sock = self.path(f"{label}.sock")
        if not tcp:
            argv = ["nbdkit", "-U", str(sock), "-f", "--exit-with-parent", *plugin_argv]
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, cwd=self.dir)
            server = Server(label, sock, proc)
            self.servers.append(server)
            wait_nbd_ready(sock, proc)
            return server
        us = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ts = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            us.bind(str(sock))
            us.listen(128)
            ts.bind(("127.0.0.1", 0))
            ts.listen(128)
            port = ts.getsockname()[1]
            fds = [us.fileno(), ts.fileno()]
            argv = [sys.executable, "-m", "gateway.sockact", ",".join(map(str, fds)),
                    "nbdkit", "-f", "--exit-with-parent", *plugin_argv]
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, cwd=self.dir,
                                    pass_fds=fds, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        finally:
            us.close()
            ts.close()
        # gateway.sockact execs nbdkit in the same process, so this pid is nbdkit's.
        server = Server(label, sock, proc, tcp=("127.0.0.1", port))
        self.servers.append(server)
        wait_nbd_ready(sock, proc)
        return server

    def spawn(self, label: str, argv: list[str], sock: Path, export: str = "") -> Server:
        """Any NBD server that stays in the foreground and listens on ``sock`` (qemu-nbd,
        qemu-storage-daemon); it gets SIGTERM if the bench dies before stopping it."""
        proc = subprocess.Popen(with_pdeathsig(argv), stdin=subprocess.DEVNULL,
                                cwd=self.dir)
        server = Server(label, sock, proc, export=export)
        self.servers.append(server)
        wait_nbd_ready(sock, proc)
        return server

    def nbd_server(self, label: str, image: Path, export: str = "disk") -> Server:
        """nbd-server (3.24: ``unixsock`` in [generic]) serving ``image`` as ``export`` on a
        unix socket in the temp dir, flush and FUA on (without them it offers no FLUSH).
        It always daemonizes (-d serves one connection and exits), so it is known by its
        pid file and stopped by that pid."""
        sock = self.path(f"{label}.sock")
        conf = self.path(f"{label}.conf")
        pidfile = self.path(f"{label}.pid")
        conf.write_text(f"[generic]\nunixsock = {sock}\n"
                        f"[{export}]\nexportname = {image}\nflush = true\nfua = true\n")
        argv = ["nbd-server", "-C", str(conf), "-p", str(pidfile)]
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=30, check=False, cwd=self.dir)
        deadline = time.monotonic() + 10
        while not (pidfile.exists() and pidfile.read_text().strip()):
            if time.monotonic() > deadline or p.returncode != 0:
                raise BenchError(f"{' '.join(argv)}: no pid file ({p.returncode}):\n"
                                 f"{p.stdout}{p.stderr}")
            time.sleep(0.05)
        server = Server(label, sock, PidProc(int(pidfile.read_text().split()[0]), argv),
                        export=export)
        self.servers.append(server)
        wait_nbd_ready(sock, server.proc)
        return server

    def file_image(self, name: str, size: int) -> Path:
        """A sparse file of ``size`` bytes in the temp dir."""
        p = self.path(name)
        with p.open("wb") as f:
            f.truncate(size)
        return p

    def nbdgw(self, label: str, data_dir: Path, volume: str, *,
              more_volumes: tuple[str, ...] = (), tcp: bool = False) -> Server:
        """Serve ``volume`` (and ``more_volumes``, by the same process) with the node
        defaults (journal on, 1 GiB retention): `serve_config`."""
        from gateway.config import default_config

        return self.serve_config(label, default_config().with_overrides(data_dir=data_dir),
                                 [volume, *more_volumes], tcp=tcp)

    def serve_config(self, label: str, cfg: NodeConfig, volumes: list[str], *,
                     tcp: bool = False) -> Server:
        """Serve ``volumes`` of ``cfg`` exactly as `nbdgw serve -c CONFIG` does: precheck,
        then NbdServer (env NBDGW_SITE from gateway.serve.plugin_site_dirs(), the sync
        gate and lease the config implies), socket-activated on a unix socket instead of
        the config's listeners and, with ``tcp``, on a free 127.0.0.1 port.  The export
        is the first volume."""
        from gateway.config import NbdConfig, parse_listen
        from gateway.serve import NbdServer, precheck_volumes

        sock = self.path(f"{label}.sock")
        listen = [parse_listen(f"unix:{sock}")]
        if tcp:
            listen.append(parse_listen("tcp:127.0.0.1:0"))
        cfg = cfg.with_overrides(nbd=NbdConfig(tuple(listen)))
        pre = precheck_volumes(cfg, volumes)
        if pre.failed:
            raise BenchError(f"cannot be served: {pre.failed}")
        ns = NbdServer(cfg, pre.served)
        ns.start()
        assert ns.child is not None and ns.child.proc is not None
        tcp_addr = next(((a.host, a.port) for a in ns.addresses if a.kind == "tcp"), None)
        # gateway.sockact execs nbdkit in the same process, so this pid is nbdkit's.
        server = Server(label, sock, ns.child.proc, export=volumes[0], tcp=tcp_addr)
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


def fio(bench: Bench, server: FioTarget, name: str, rw: str, bs: str, *,
        iodepth: int = 16, size: str | int | None = None, runtime: float | None = None,
        time_based: bool = True, ramp: float = 0, extra: tuple[str, ...] = ()) -> FioResult:
    """Run one fio job with the nbd engine against ``server`` (or fio's own engine on a
    ``FileTarget``); return its figures."""
    job = fio_job(bench, server, name, rw, bs, iodepth=iodepth, size=size, runtime=runtime,
                  time_based=time_based, ramp=ramp, extra=extra)
    d = job["read"] if rw in ("read", "randread") else job["write"]
    return FioResult(float(d["iops"]), float(d["bw_bytes"]), int(d["io_bytes"]),
                     int(d["runtime"]))


def fio_argv(bench: Bench, server: FioTarget, name: str, rw: str, bs: str, *,
             iodepth: int = 16, size: str | int | None = None, runtime: float | None = None,
             time_based: bool = True, ramp: float = 0, extra: tuple[str, ...] = ()
             ) -> tuple[list[str], Path]:
    """fio's argv for one job and the path its JSON output goes to."""
    out = bench.path(f"fio-{name}-{time.monotonic_ns()}.json")
    argv = ["fio", f"--name={name}", *server.fio_args(), f"--rw={rw}",
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
    return argv, out


def kill_group(p: subprocess.Popen[Any]) -> None:
    """SIGKILL a process started with ``start_new_session`` and everything in its group
    (fio's forked job processes), then reap it."""
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(10)


def fio_parse(argv: list[str], out: Path, returncode: int | None, said: str, label: str,
              name: str) -> dict[str, Any]:
    if returncode != 0 or not out.exists():
        raise BenchError(f"{' '.join(argv)} failed ({returncode}):\n{said}")
    try:
        job: dict[str, Any] = json.loads(out.read_text())["jobs"][0]
    except (ValueError, KeyError, IndexError) as e:
        raise BenchError(f"{' '.join(argv)}: unreadable output ({e}):\n{said}") from e
    if job["error"]:
        raise BenchError(f"fio job {name} on {label}: error {job['error']}")
    return job


def fio_job(bench: Bench, server: FioTarget, name: str, rw: str, bs: str, *,
            iodepth: int = 16, size: str | int | None = None, runtime: float | None = None,
            time_based: bool = True, ramp: float = 0, extra: tuple[str, ...] = (),
            timeout: float | None = None) -> dict[str, Any]:
    """Run one fio job with the nbd engine against ``server`` (or on a ``FileTarget``);
    return fio's JSON of it (``write``/``read``/``sync`` sections with
    ``clat_ns``/``lat_ns`` percentiles; one job for ``--numjobs`` with
    ``--group_reporting``).  ``timeout`` (default: runtime + ramp + 600 s) bounds the
    whole run; past it fio and its job processes are killed and ``FioStalled`` raised."""
    argv, out = fio_argv(bench, server, name, rw, bs, iodepth=iodepth, size=size,
                         runtime=runtime, time_based=time_based, ramp=ramp, extra=extra)
    bound = timeout if timeout is not None else (runtime or 0) + ramp + 600
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, cwd=bench.dir,
                         start_new_session=True)
    try:
        said, _ = p.communicate(timeout=bound)
    except subprocess.TimeoutExpired:
        kill_group(p)
        raise FioStalled(f"fio job {name} on {server.label} did not finish within "
                         f"{bound:g} s") from None
    except BaseException:
        kill_group(p)
        raise
    return fio_parse(argv, out, p.returncode, said, server.label, name)


class FioBackground:
    """One fio job running beside the bench (a neighbour's load), in its own session;
    ``finish`` waits for it (time-based jobs end by themselves) and returns its JSON."""

    def __init__(self, bench: Bench, server: FioTarget, name: str, rw: str, bs: str, *,
                 iodepth: int = 16, size: str | int | None = None, runtime: float,
                 ramp: float = 0, extra: tuple[str, ...] = ()) -> None:
        self.bench = bench
        self.label = server.label
        self.name = name
        self.argv, self.out = fio_argv(bench, server, name, rw, bs, iodepth=iodepth,
                                       size=size, runtime=runtime, ramp=ramp, extra=extra)
        self.log = bench.path(f"fio-{name}-{time.monotonic_ns()}.log")
        with self.log.open("w") as f:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=f,
                                         stderr=subprocess.STDOUT, cwd=bench.dir,
                                         start_new_session=True)
        bench.background.append(self.proc)

    def finish(self, timeout: float) -> dict[str, Any]:
        """Wait up to ``timeout`` s; past it the job is killed and ``FioStalled`` raised."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_group(self.proc)
            raise FioStalled(f"background fio job {self.name} on {self.label} did not "
                             f"finish within {timeout:g} s") from None
        finally:
            if self.proc.poll() is not None:
                self.bench.background.remove(self.proc)
        return fio_parse(self.argv, self.out, self.proc.returncode,
                         self.log.read_text(errors="replace"), self.label, self.name)

    def kill(self) -> None:
        kill_group(self.proc)
        if self.proc in self.bench.background:
            self.bench.background.remove(self.proc)


def progress(msg: str, prefix: str = "") -> None:
    """A progress line on stderr (the tables go to stdout)."""
    print(f"{prefix}{msg}", file=sys.stderr, flush=True)


def fmt_num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def fmt_size(n: int) -> str:
    return f"{n / GiB:g} GiB" if n >= GiB else f"{n / MiB:g} MiB"


def print_table(headers: list[str], rows: list[list[str]], left: int = 1) -> None:
    """Plain-text table; the first ``left`` columns left-aligned, the rest right."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))


def percentile_us(section: dict[str, Any], key: str, pct: float) -> float:
    """A latency percentile in microseconds from a fio JSON section (``clat_ns`` of
    ``read``/``write``, ``lat_ns`` of ``sync``); NaN when fio recorded none."""
    got = section.get(key, {}).get("percentile", {}).get(f"{pct:.6f}")
    return float(got) / 1e3 if got is not None else float("nan")


def dir_bytes(path: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of the files under ``path``."""
    apparent = allocated = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(root, f))
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


def disk_written_bytes(path: Path) -> int | None:
    """Bytes the block device under ``path`` has written so far (its sectors written,
    /sys/dev/block/MAJ:MIN/stat), or None where there is no such device (tmpfs, overlay).
    Every writer of that device counts, not only the bench's."""
    st = os.stat(path)
    try:
        fields = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat"
                      ).read_text().split()
    except OSError:
        return None
    return int(fields[6]) * 512
