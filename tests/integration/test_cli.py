"""Small CLI points: --version, a data directory that does not exist, a relative
--data-dir, `status --watch` into a pipe, `iscsi status|down` without a config."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import NBDGW, Served, run_nbdgw
from tests.integration.iscsienv import free_control_port


def refused(p: subprocess.CompletedProcess[str], message: str) -> None:
    assert (p.returncode, p.stdout, p.stderr) == (1, "", f"nbdgw: error: {message}\n")


def test_version() -> None:
    p = run_nbdgw("--version")
    assert p.stdout == f"nbdgw {importlib.metadata.version('nbdgw')}\n"


@pytest.mark.parametrize("args", [
    ("volume", "list"), ("volume", "list", "--json"), ("status",), ("status", "--json"),
    ("audit",), ("snapshot", "list", "v1"), ("volume", "checksum", "v1"),
    ("serve", "--listen", "unix:/tmp/nbdgw-never.sock"),
])
def test_a_data_dir_that_does_not_exist_is_an_error(tmp_path: Path, args: tuple[str, ...]
                                                    ) -> None:
    missing = tmp_path / "nonexistent"
    p = run_nbdgw(*args, "--data-dir", str(missing), check=False)
    refused(p, f"data directory {missing} does not exist (check --data-dir or "
               "node.data_dir; 'nbdgw volume create' makes it)")
    assert not missing.exists()


def test_an_empty_data_dir_has_no_volumes(data_dir: Path) -> None:
    assert run_nbdgw("volume", "list", "--data-dir", str(data_dir)).stdout == "no volumes\n"


@pytest.mark.timeout(60)
def test_a_relative_data_dir_is_taken_from_the_current_directory(tmp_path: Path) -> None:
    """Made absolute once, by the CLI: nbdkit runs in / (`serve` failed with 'no volume
    named v1 in rel'), and every path it prints is absolute."""
    cwd = tmp_path / "here"
    cwd.mkdir()

    def nbdgw(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([NBDGW, "--log-format", "json", *args], cwd=cwd, text=True,
                              capture_output=True, timeout=60, check=True)

    absolute = cwd / "rel"
    p = nbdgw("volume", "create", "v1", "--size", "8M", "--data-dir", "rel")
    assert p.stdout == f"created volume v1: 8388608 bytes in {absolute}/volumes/v1\n"
    assert json.loads(nbdgw("status", "--json", "--data-dir", "rel").stdout)["data_dir"] == \
        str(absolute)
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen([NBDGW, "--log-format", "json", "serve", "--data-dir", "rel",
                             "--listen", f"unix:{sock}"], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        assert lines[1] == f"nbdgw: export v1: nbd+unix:///v1?socket={sock}\n", \
            (lines, proc.stderr.read() if proc.poll() is not None else "")
        import nbd

        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///v1?socket={sock}")
        h.pwrite(b"x" * 4096, 0)
        h.shutdown()
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    assert "1 " in nbdgw("volume", "list", "--data-dir", "rel").stdout


def watch(args: list[str], blocks: int) -> tuple[list[str], int, str]:
    """Run `nbdgw status --watch` into a pipe, read ``blocks`` lines, close the pipe."""
    proc = subprocess.Popen([NBDGW, "status", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    lines = [proc.stdout.readline() for _ in range(blocks)]
    proc.stdout.close()  # the reader goes away, as `head` does
    rc = proc.wait(15)
    return lines, rc, proc.stderr.read()


@pytest.mark.timeout(60)
def test_status_watch_keeps_printing_into_a_pipe(data_dir: Path, volume: str) -> None:
    """It printed once and exited; now a report every N seconds until the reader goes
    (SIGPIPE: quietly, status 0)."""
    start = time.monotonic()
    lines, rc, err = watch(["--json", "--watch", "0.3", "--data-dir", str(data_dir)], 3)
    assert (rc, err) == (0, "")
    assert [json.loads(x)["volumes"][0]["name"] for x in lines] == ["v1"] * 3
    assert time.monotonic() - start >= 0.6
    lines, rc, err = watch(["--watch", "0.3", "--data-dir", str(data_dir)], 40)
    assert (rc, err) == (0, "")
    heads = [x for x in lines if x.startswith("node ")]
    assert len(heads) >= 3, lines
    p = subprocess.run(["sh", "-c", f"{NBDGW} status --watch 1 --data-dir {data_dir} | head -3"],
                       capture_output=True, text=True, timeout=30, check=False)
    assert (p.returncode, p.stderr, len(p.stdout.splitlines())) == (0, "", 3), p


def test_iscsi_status_and_down_without_an_iqn(tmp_path: Path, data_dir: Path) -> None:
    """They need tgtd's control port (and down its run_dir), not iscsi.iqn; --data-dir
    is accepted (down uses it to wait for nbdkit's FUSE mounts)."""
    p = run_nbdgw("iscsi", "status", "--json", "--data-dir", str(data_dir))
    assert json.loads(p.stdout)["control_port"] == 3260  # no config: the default port
    port = free_control_port()
    cfg = tmp_path / "nbdgw.yaml"
    cfg.write_text(yaml.safe_dump({"version": 1, "iscsi": {
        "control_port": port, "run_dir": str(tmp_path / "iscsi")}}))
    p = run_nbdgw("-c", str(cfg), "iscsi", "status", "--data-dir", str(data_dir))
    assert p.stdout == f"tgtd: not running (control port {port})\n"
    p = run_nbdgw("-c", str(cfg), "iscsi", "down", "--data-dir", str(data_dir))
    assert p.stdout == "nbdgw: iscsi bridge stopped\n"


def test_served_volume_in_use_through_a_relative_data_dir(data_dir: Path, volume: str,
                                                          serve: object) -> None:
    """`volume list` says in use from /proc/locks, without taking the lock."""
    s: Served = serve()  # type: ignore[operator]
    rel = os.path.relpath(data_dir)
    p = run_nbdgw("volume", "list", "--json", "--data-dir", rel)
    assert [r["in_use"] for r in json.loads(p.stdout)] == [True]
    assert s.stop() == 0
    p = run_nbdgw("volume", "list", "--json", "--data-dir", rel)
    assert [r["in_use"] for r in json.loads(p.stdout)] == [False]


def test_sigusr2_prints_every_threads_stack_and_serving_goes_on(data_dir: Path, volume: str,
                                                                 serve: object) -> None:
    """kill -USR2 on a process that seems stuck: each thread's Python stack in its log,
    and it goes on serving; SIGTERM still stops it cleanly."""
    import signal

    s: Served = serve()  # type: ignore[operator]
    s.proc.send_signal(signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while "Current thread" not in s.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    err = s.stderr()
    assert "Current thread" in err, err[-2000:]
    assert 'gateway/cli.py", line' in err and "in serve" in err, err[-2000:]
    assert "in _read_stderr" in err, err[-2000:]  # the other threads too
    h = s.connect(volume)
    h.pwrite(b"u" * 4096, 0)  # type: ignore[attr-defined]
    h.flush()  # type: ignore[attr-defined]
    h.shutdown()  # type: ignore[attr-defined]
    assert s.stop() == 0
