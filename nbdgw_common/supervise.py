"""One child process, supervised: the long-running counterpart of proc.run.

`ChildProcess` starts an argv list (never a shell string), waits until a caller's check
says it is ready, and stops it: a polite request (SIGTERM unless the caller asked another
way), a bounded wait, SIGKILL, and the reap, so that no zombie is left.  nbdkit (gateway
serve), peerlink (the daemon), tgtd and the FUSE servers (iscsi_bridge) all run under it;
restarting with backoff is the daemon's (gateway/daemon.py, the only one that restarts).

A process an earlier run started, and that outlived it (tgtd, a FUSE server: both run in
a session of their own), is found through the pid file it left (``pid_file``) and stopped
the same way, by pid; /proc/PID/comm must still name the program, so a reused pid is
never signalled.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from .errors import GatewayError

#: How long a process killed with SIGKILL may take to be gone (one in uninterruptible
#: sleep goes only when that ends): ``stop`` returns after this, the process still owned.
KILL_WAIT = 5.0
POLL = 0.05
TAIL_LINES = 3


class ChildError(GatewayError):
    """A child that cannot start, or did not become ready."""


class NotReady(ChildError):
    """The child exited (``status`` is its exit status) or ``timeout`` seconds passed
    (``status`` None) before it was ready; ``tail`` is the end of its stderr."""

    def __init__(self, program: str, status: int | None, timeout: float, tail: str) -> None:
        self.program, self.status, self.timeout, self.tail = program, status, timeout, tail
        if status is not None:
            msg = f"{program} exited with status {status} before it was ready"
        else:
            msg = f"{program} was not ready within {timeout:g} s"
        super().__init__(f"{msg}: {tail}" if tail else msg)


class ChildProcess:
    """One child: ``argv``, run in ``cwd`` with ``env`` (None: ours), stdin closed.

    Its stdout and stderr go to ``log_file`` (appended) if given; else its stderr is
    read line by line, each line handed to ``on_stderr``, if that is given; else both
    are ours.  ``new_session``: its own session and process group (it outlives us and
    no terminal signal reaches it).  A program that is not installed raises
    ``not_found`` if given (the caller's error, saying which package brings it), else
    FileNotFoundError.  ``name`` (default: the program's file name) is what errors say
    and, with ``pid_file``, what /proc/PID/comm must say of an adopted process.
    """

    def __init__(self, argv: Sequence[str], *, name: str | None = None,
                 env: Mapping[str, str] | None = None, cwd: str = "/",
                 log_file: Path | None = None,
                 on_stderr: Callable[[bytes], None] | None = None,
                 new_session: bool = False, pass_fds: Sequence[int] = (),
                 not_found: Exception | None = None, pid_file: Path | None = None) -> None:
        self.argv = list(argv)
        self.name = name or Path(self.argv[0]).name
        self.env = env
        self.cwd = cwd
        self.log_file = log_file
        self.on_stderr = on_stderr
        self.new_session = new_session
        self.pass_fds = tuple(pass_fds)
        self.not_found = not_found
        self.pid_file = pid_file
        self.proc: subprocess.Popen[bytes] | None = None
        self._lines: collections.deque[bytes] = collections.deque(maxlen=TAIL_LINES)
        self._reader: threading.Thread | None = None

    # -- state ------------------------------------------------------------------------

    @property
    def returncode(self) -> int | None:
        """Our child's exit status (reaping it), None while it runs or before a start."""
        return None if self.proc is None else self.proc.poll()

    @property
    def pid(self) -> int | None:
        """Our child's pid while it runs, else that of the live adopted process named by
        ``pid_file``, else None."""
        if self.proc is not None and self.proc.poll() is None:
            return self.proc.pid
        return None if self.pid_file is None else pid_from_file(self.pid_file, self.name)

    @property
    def alive(self) -> bool:
        return self.pid is not None

    def tail(self) -> str:
        """The last lines it wrote to stderr (to the log file), joined by " / "."""
        if self.log_file is not None:
            return log_tail(self.log_file)
        lines = self._lines.copy()  # at once: the reader thread may be appending
        return " / ".join(x.decode(errors="replace").rstrip() for x in lines)

    # -- start ------------------------------------------------------------------------

    def start(self) -> None:
        if self.returncode is None and self.proc is not None:
            raise ChildError(f"{self.name} is still running (pid {self.proc.pid})")
        self._lines.clear()
        with contextlib.ExitStack() as stack:
            out: IO[bytes] | int | None = None
            err: IO[bytes] | int | None = subprocess.PIPE if self.on_stderr else None
            if self.log_file is not None:
                out = err = stack.enter_context(open(self.log_file, "ab"))
            try:
                self.proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    cwd=self.cwd, env=self.env, pass_fds=self.pass_fds,
                    start_new_session=self.new_session)
            except FileNotFoundError:
                if self.not_found is None:
                    raise
                raise self.not_found from None
        if self.proc.stderr is not None:
            self._reader = threading.Thread(target=self._read_stderr, args=(self.proc.stderr,),
                                            name=f"{self.name}-stderr", daemon=True)
            self._reader.start()

    def _read_stderr(self, pipe: IO[bytes]) -> None:
        assert self.on_stderr is not None
        with pipe:
            for line in pipe:
                self._lines.append(line)
                self.on_stderr(line)

    def wait_ready(self, ready: Callable[[], bool], timeout: float,
                   interval: float = POLL) -> None:
        """Return once ``ready()`` is true; raise NotReady if the child exits first or
        ``timeout`` seconds pass.  The child is left as it is: stopping it is the
        caller's choice."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (rc := self.returncode) is not None:
                self._join_reader()  # its last lines, for the tail
                raise NotReady(self.name, rc, timeout, self.tail())
            if ready():
                return
            time.sleep(interval)
        raise NotReady(self.name, None, timeout, self.tail())

    # -- stop -------------------------------------------------------------------------

    def send_signal(self, sig: int) -> None:
        """Signal our child while it runs, else the adopted process, if any."""
        if (pid := self.pid) is not None:
            self._signal(pid, sig)

    def _signal(self, pid: int, sig: int) -> None:
        if self.proc is not None and self.proc.pid == pid:
            self.proc.send_signal(sig)  # not once reaped: the pid may be another's by then
        elif running(pid, self.name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def wait(self, timeout: float) -> int | None:
        """Wait at most ``timeout`` s for our child to exit; its status, None if it runs."""
        if self.proc is None:
            return None
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self.proc.wait(timeout)
        return None

    def stop(self, timeout: float, *, sig: int | None = signal.SIGTERM,
             on_kill: Callable[[], None] | None = None) -> int | None:
        """Send ``sig`` (None: the caller asked it to exit already), wait at most
        ``timeout`` s, then call ``on_kill`` (to say why) and SIGKILL it; reap it.  Safe
        to call again, and when nothing runs.  Returns our child's exit status; None if
        there was none, the process was adopted, or it outlived SIGKILL by KILL_WAIT s
        (then it stays ``alive``, and a later stop reaps it)."""
        pid = self.pid
        if pid is not None:
            if sig is not None:
                self._signal(pid, sig)
            if not self._gone(pid, timeout):
                if on_kill is not None:
                    on_kill()
                self._signal(pid, signal.SIGKILL)
                self._gone(pid, KILL_WAIT)
        self._join_reader()
        return self.returncode

    def kill(self) -> None:
        """SIGKILL it now and reap it."""
        self.stop(0, sig=None)

    def _gone(self, pid: int, timeout: float) -> bool:
        if self.proc is not None and self.proc.pid == pid:
            return self.wait(timeout) is not None
        deadline = time.monotonic() + timeout
        while running(pid, self.name):
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL)
        return True

    def _join_reader(self) -> None:
        if self._reader is not None and self.returncode is not None:
            self._reader.join(KILL_WAIT)  # EOF, unless a grandchild holds the pipe open


def pid_from_file(pid_file: Path, comm: str) -> int | None:
    """The pid ``pid_file`` names if that process is alive and called ``comm``."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if running(pid, comm) else None


def running(pid: int, comm: str) -> bool:
    """Process ``pid`` exists, is not a zombie, and /proc/PID/comm says ``comm``."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == comm and \
            "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[:1]
    except OSError:
        return False


def log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        return " / ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"
