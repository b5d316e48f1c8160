"""nbdgw_common.supervise.ChildProcess with real short-lived processes: /bin/sleep and
/bin/sh scripts that ignore SIGTERM, exit early or never become ready."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdgw_common.errors import GatewayError
from nbdgw_common.supervise import KILL_WAIT, ChildError, ChildProcess, NotReady, running

SH = "/bin/sh"


def reaped(pid: int) -> bool:
    """No zombie: ``pid`` is no child of ours any more (waited for, not just dead)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


@pytest.fixture
def children() -> Iterator[list[ChildProcess]]:
    """ChildProcesses a test starts; killed at the end whatever the test did."""
    made: list[ChildProcess] = []
    yield made
    for c in made:
        c.kill()


def child(made: list[ChildProcess], argv: list[str], **kw: object) -> ChildProcess:
    c = ChildProcess(argv, **kw)  # type: ignore[arg-type]
    made.append(c)
    return c


def stubborn(made: list[ChildProcess], tmp_path: Path) -> ChildProcess:
    """A shell that ignores SIGTERM, started and past its trap (it touched ``armed``)."""
    armed = tmp_path / "armed"
    c = child(made, [SH, "-c", f"trap '' TERM; : > {armed}; while :; do sleep 0.05; done"])
    c.start()
    c.wait_ready(armed.exists, 5)
    return c


def test_stop_sigterm(children: list[ChildProcess]) -> None:
    c = child(children, ["/bin/sleep", "30"])
    c.start()
    pid = c.pid
    assert c.alive and pid is not None and c.returncode is None
    kills: list[int] = []
    t0 = time.monotonic()
    assert c.stop(10, on_kill=lambda: kills.append(1)) == -signal.SIGTERM
    assert time.monotonic() - t0 < 2
    assert kills == []
    assert not c.alive and c.pid is None and reaped(pid)


def test_stop_escalates_to_sigkill_within_the_bound(children: list[ChildProcess],
                                                    tmp_path: Path) -> None:
    c = stubborn(children, tmp_path)
    pid = c.pid
    assert pid is not None
    kills: list[float] = []
    t0 = time.monotonic()
    rc = c.stop(0.5, on_kill=lambda: kills.append(time.monotonic() - t0))
    took = time.monotonic() - t0
    assert rc == -signal.SIGKILL
    assert len(kills) == 1 and 0.5 <= kills[0] < 1.5  # SIGTERM ignored for the bound
    assert took < 1.5
    assert not c.alive and reaped(pid)


def test_stop_is_idempotent(children: list[ChildProcess]) -> None:
    c = child(children, ["/bin/sleep", "30"])
    assert c.stop(1) is None  # never started: nothing to do
    c.start()
    assert c.stop(5) == -signal.SIGTERM
    assert c.stop(5) == -signal.SIGTERM  # again: the same status, nothing signalled
    c.kill()
    assert c.returncode == -signal.SIGTERM


def test_exited_by_itself_is_reaped(children: list[ChildProcess]) -> None:
    c = child(children, [SH, "-c", "exit 7"])
    c.start()
    assert c.proc is not None
    pid = c.proc.pid
    deadline = time.monotonic() + 5
    while c.returncode is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert c.returncode == 7 and not c.alive
    assert c.stop(5) == 7
    assert reaped(pid)


def test_stop_without_signal_waits_then_kills(children: list[ChildProcess]) -> None:
    """sig=None: the caller asked it to exit its own way (tgtd's delete system, an
    unmount); one that does not go is killed after the bound."""
    c = child(children, ["/bin/sleep", "30"])
    c.start()
    kills: list[int] = []
    t0 = time.monotonic()
    assert c.stop(0.3, sig=None, on_kill=lambda: kills.append(1)) == -signal.SIGKILL
    assert kills == [1] and time.monotonic() - t0 < 1.5


def test_kill(children: list[ChildProcess], tmp_path: Path) -> None:
    c = stubborn(children, tmp_path)
    pid = c.pid
    assert pid is not None
    t0 = time.monotonic()
    c.kill()
    assert time.monotonic() - t0 < 1
    assert c.returncode == -signal.SIGKILL and reaped(pid)


def test_early_exit_names_the_program_and_its_stderr(children: list[ChildProcess],
                                                     tmp_path: Path) -> None:
    log_file = tmp_path / "server.log"
    c = child(children, [SH, "-c", "echo starting; echo 'bind: Address in use' >&2; exit 3"],
              name="tgtd", log_file=log_file)
    c.start()
    t0 = time.monotonic()
    with pytest.raises(NotReady) as ei:
        c.wait_ready(lambda: False, 10)
    assert time.monotonic() - t0 < 5  # not the whole deadline
    e = ei.value
    assert isinstance(e, GatewayError)
    assert (e.program, e.status, e.tail) == ("tgtd", 3, "starting / bind: Address in use")
    assert str(e) == "tgtd exited with status 3 before it was ready: starting / bind: " \
                     "Address in use"
    assert log_file.read_text() == "starting\nbind: Address in use\n"


def test_early_exit_stderr_through_a_pipe(children: list[ChildProcess]) -> None:
    """Without a log file, stderr is read line by line: handed on, and its end kept."""
    seen: list[bytes] = []
    script = "for i in 1 2 3 4 5; do echo line $i >&2; done; exit 1"
    c = child(children, [SH, "-c", script], on_stderr=seen.append)
    c.start()
    with pytest.raises(NotReady) as ei:
        c.wait_ready(lambda: False, 10)
    assert str(ei.value) == "sh exited with status 1 before it was ready: line 3 / line 4 / " \
                            "line 5"
    assert seen == [f"line {i}\n".encode() for i in range(1, 6)]


def test_readiness_deadline(children: list[ChildProcess], tmp_path: Path) -> None:
    c = child(children, [SH, "-c", "echo waiting >&2; exec sleep 30"],
              log_file=tmp_path / "log")
    c.start()
    calls: list[float] = []
    t0 = time.monotonic()
    with pytest.raises(NotReady) as ei:
        c.wait_ready(lambda: bool(calls.append(time.monotonic())), 0.5)
    took = time.monotonic() - t0
    assert 0.5 <= took < 1.5
    assert len(calls) >= 3  # polled meanwhile
    assert (ei.value.status, ei.value.timeout) == (None, 0.5)
    assert str(ei.value) == "sh was not ready within 0.5 s: waiting"
    assert c.alive  # what to do with it is the caller's choice
    assert c.stop(5) == -signal.SIGTERM


def test_ready(children: list[ChildProcess], tmp_path: Path) -> None:
    flag = tmp_path / "ready"
    c = child(children, [SH, "-c", f"sleep 0.2; : > {flag}; exec sleep 30"])
    c.start()
    c.wait_ready(flag.exists, 10)
    assert c.alive


def test_not_found(children: list[ChildProcess]) -> None:
    c = child(children, ["/nonexistent/tgtd"], not_found=ChildError("apt-get install tgt"))
    with pytest.raises(ChildError, match="apt-get install tgt"):
        c.start()
    with pytest.raises(FileNotFoundError):
        child(children, ["/nonexistent/tgtd"]).start()
    assert c.stop(1) is None


def test_one_child_at_a_time_and_restart(children: list[ChildProcess]) -> None:
    c = child(children, ["/bin/sleep", "30"])
    c.start()
    first = c.pid
    with pytest.raises(ChildError, match=rf"sleep is still running \(pid {first}\)"):
        c.start()
    assert c.pid == first
    c.stop(5)
    c.start()  # again, as the daemon restarts a child that exited
    assert c.pid not in (None, first)
    assert first is not None and reaped(first)


def test_environment_directory_and_session(children: list[ChildProcess],
                                           tmp_path: Path) -> None:
    out = tmp_path / "out"
    c = child(children, [SH, "-c", f'echo "$SUPERVISE_TEST $(pwd)" > {out}; exec sleep 30'],
              env={"SUPERVISE_TEST": "x", "PATH": "/usr/bin:/bin"}, cwd=str(tmp_path),
              new_session=True)
    c.start()
    c.wait_ready(lambda: out.exists() and out.read_text().endswith("\n"), 5)
    assert out.read_text() == f"x {tmp_path}\n"
    pid = c.pid
    assert pid is not None and os.getsid(pid) == pid  # a session (and group) of its own


def sleeper() -> subprocess.Popen[bytes]:
    """A `sleep 30` that is not a ChildProcess's, once it runs as sleep (past exec)."""
    p = subprocess.Popen(["/bin/sleep", "30"])
    deadline = time.monotonic() + 5
    while not running(p.pid, "sleep") and time.monotonic() < deadline:
        time.sleep(0.01)
    return p


def test_adopted_process(tmp_path: Path) -> None:
    """A process an earlier run started is found through its pid file, if it still runs
    under the name, and stopped by pid; a pid file naming another program is ignored."""
    pid_file = tmp_path / "server.pid"
    other = sleeper()
    try:
        pid_file.write_text(f"{other.pid}\n")
        assert ChildProcess(["tgtd"], pid_file=pid_file).pid is None  # not tgtd
        c = ChildProcess(["/bin/sleep", "1"], pid_file=pid_file)
        assert c.pid == other.pid and c.alive
        assert c.stop(5) is None  # no status: not our child
        assert not c.alive  # a zombie (of this test) counts as gone
        assert other.wait(5) == -signal.SIGTERM
    finally:
        other.kill()
        other.wait()


def test_adopted_process_killed_after_the_bound(tmp_path: Path) -> None:
    pid_file = tmp_path / "server.pid"
    other = sleeper()
    try:
        pid_file.write_text(f"{other.pid}\n")
        kills: list[int] = []
        t0 = time.monotonic()
        ChildProcess(["sleep"], pid_file=pid_file).stop(
            0.3, sig=None, on_kill=lambda: kills.append(1))
        assert kills == [1] and time.monotonic() - t0 < 0.3 + KILL_WAIT
        assert other.wait(5) == -signal.SIGKILL
    finally:
        other.kill()
        other.wait()
