"""Shared test helpers: run the nbdgw CLI, serve volumes with real nbdkit, connect libnbd."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
NBDGW = str(VENV_BIN / "nbdgw")


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_nbdgw(*args: str, check: bool = True, input_: str | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real `nbdgw` CLI; return the completed process (stdout, stderr as text)."""
    p = subprocess.run([NBDGW, "--log-format", "json", *args], capture_output=True, text=True,
                       input=input_, timeout=timeout, check=False)
    if check and p.returncode != 0:
        raise AssertionError(f"nbdgw {' '.join(args)} failed ({p.returncode}):\n{p.stderr}")
    return p


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(x) for x in text.split()]


_RUNNING: list[Served] = []  # stopped at each test's teardown, whatever the test did


class Served:
    """A running `nbdgw serve` (and its nbdkit child) on a unix socket in ``data_dir``."""

    def __init__(self, data_dir: Path, extra: list[str], config: Path | None = None,
                 log_dir: Path | None = None) -> None:
        self.data_dir = data_dir
        self.sock = data_dir / "nbd.sock"
        args = [NBDGW, "--log-format", "json"]
        if config is not None:
            args += ["-c", str(config)]
        args += ["serve", "--data-dir", str(data_dir), "--listen", f"unix:{self.sock}", *extra]
        # log_dir: somewhere else than data_dir when data_dir is a file system the test fills.
        self.log_path = (log_dir or data_dir) / f"serve-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, text=True)
        _RUNNING.append(self)
        self.lines: list[str] = []
        deadline = time.monotonic() + 30
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"nbdgw serve exited early:\n{self.stderr()}")
            self.lines.append(line)
            if line.startswith("nbdgw: export"):
                # Every export line follows the listening lines; drain the rest lazily.
                break
        else:
            raise AssertionError("nbdgw serve did not report its exports in 30 s")

    def stderr(self) -> str:
        if self.log.closed:  # stopped: the whole log
            return self.log_path.read_text()
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def uri(self, export: str = "") -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"

    def connect(self, export: str = "") -> object:
        import nbd

        h = nbd.NBD()
        h.connect_uri(self.uri(export))
        return h

    def nbdkit_pid(self) -> int:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            kids = children(self.proc.pid)
            if kids:
                return kids[0]
            time.sleep(0.05)
        raise AssertionError("no nbdkit child of nbdgw serve")

    def kill9_nbdkit(self) -> None:
        """kill -9 nbdkit (a crash at an arbitrary instant); serve then exits too."""
        os.kill(self.nbdkit_pid(), signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                # Where it is stuck: every thread's stack (nbdgw dumps them on SIGUSR2).
                self.proc.send_signal(signal.SIGUSR2)
                time.sleep(1)
                raise AssertionError("nbdgw serve did not exit 60 s after SIGTERM; its "
                                     f"stderr ends:\n{self.stderr()[-4000:]}") from None
        self.log.close()
        return self.proc.returncode


@pytest.fixture(autouse=True)
def _stop_leftover_servers() -> Iterator[None]:
    """A test that fails before ``stop()`` must not leave `nbdgw serve` and nbdkit running."""
    yield
    while _RUNNING:
        s = _RUNNING.pop()
        try:
            s.stop()
        except Exception:  # noqa: BLE001 - best-effort cleanup; the test already reported
            s.proc.kill()
            s.proc.wait(10)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def serve(data_dir: Path) -> Iterator[object]:
    """Factory: ``serve(*extra_args, data_dir=..., config=...)`` starts `nbdgw serve`."""
    started: list[Served] = []

    def start(*extra: str, data_dir_: Path | None = None, config: Path | None = None) -> Served:
        s = Served(data_dir_ or data_dir, list(extra), config)
        started.append(s)
        return s

    yield start
    for s in started:
        try:
            s.stop()
        except Exception:  # noqa: BLE001 - best-effort cleanup; the test already reported
            s.proc.kill()


@pytest.fixture
def volume(data_dir: Path) -> str:
    """A 64 MiB volume named v1 in ``data_dir``."""
    run_nbdgw("volume", "create", "v1", "--size", "64M", "--data-dir", str(data_dir))
    return "v1"


def need(tool: str) -> None:
    """Fail (never skip) when a tool the test uses is missing, naming its package:
    `make setup` installs everything in gateway/doctor.py."""
    from gateway.doctor import MissingTool, require

    try:
        require(tool)
    except MissingTool as e:
        pytest.fail(str(e), pytrace=False)
