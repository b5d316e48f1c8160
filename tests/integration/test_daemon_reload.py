"""SIGHUP: the daemon reloads its config; a config that does not validate is refused
with the reason and the running one stays in force (nothing stops, clients go on)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import yaml

from tests.conftest import NBDGW, run_nbdgw


def events(log: Path) -> list[dict[str, object]]:
    out = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def wait_event(log: Path, name: str, timeout: float = 15) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in events(log):
            if e.get("event") == name:
                return e
        time.sleep(0.1)
    raise AssertionError(f"no {name} in {log.read_text()[-2000:]}")


class Solo:
    """A one-node daemon serving volume v1 on a unix socket, its config a file the test
    may rewrite; its log is JSON lines."""

    def __init__(self, tmp_path: Path) -> None:
        self.sock, self.cfg = tmp_path / "nbd.sock", tmp_path / "nbdgw.yaml"
        self.good = {"version": 1, "node": {"name": "solo", "data_dir": str(tmp_path / "data")},
                     "nbd": {"listen": [f"unix:{self.sock}"]}}
        self.cfg.write_text(yaml.safe_dump(self.good))
        run_nbdgw("-c", str(self.cfg), "volume", "create", "v1", "--size", "16M")
        self.log = tmp_path / "daemon.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [NBDGW, "-c", str(self.cfg), "--log-format", "json", "daemon"],
                stdout=out, stderr=subprocess.STDOUT)

    def connect(self) -> object:
        import nbd

        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///v1?socket={self.sock}")
        return h

    def stop(self) -> None:
        self.proc.terminate()
        try:
            rc = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR2)  # its threads' stacks, into the log
            time.sleep(1)
            self.proc.kill()  # nbdkit follows (--exit-with-parent)
            self.proc.wait()
            raise AssertionError("the daemon did not stop 30 s after SIGTERM; its log ends:\n"
                                 + self.log.read_text()[-4000:]) from None
        assert rc == 0, self.log.read_text()[-2000:]


def test_sighup_keeps_the_running_config_when_the_new_one_is_bad(tmp_path: Path) -> None:
    d = Solo(tmp_path)
    cfg, log, daemon = d.cfg, d.log, d.proc
    try:
        wait_event(log, "serving")
        h = d.connect()
        h.pwrite(b"a" * 4096, 0)
        cfg.write_text("version: 1\nnode: {name: solo, colour: red}\n")  # unknown key
        daemon.send_signal(signal.SIGHUP)
        refused = wait_event(log, "reload_refused")
        assert "unknown key 'colour' in node" in str(refused["error"])
        assert daemon.poll() is None
        h.pwrite(b"b" * 4096, 4096)  # the client goes on, on the same connection
        h.flush()
        cfg.write_text(yaml.safe_dump({**d.good, "failover": {"timeout": 4}}))
        daemon.send_signal(signal.SIGHUP)
        wait_event(log, "reloaded")
        assert daemon.poll() is None
        assert h.pread(4096, 4096) == b"b" * 4096
        h.shutdown()
    finally:
        d.stop()


def test_the_daemon_takes_sighups_back_to_back_and_still_stops(tmp_path: Path) -> None:
    """Reloads asked for in a burst (a configuration tool notifying once per file it
    wrote) neither stall nor kill the daemon: each is taken or merged with the next,
    and SIGTERM after them stops it cleanly."""
    d = Solo(tmp_path)
    try:
        wait_event(d.log, "serving")
        for _ in range(300):
            d.proc.send_signal(signal.SIGHUP)
            time.sleep(0.001)
        wait_event(d.log, "reloaded")
        time.sleep(1)  # the burst's last reloads
        assert d.proc.poll() is None, d.log.read_text()[-2000:]
        h = d.connect()
        h.pwrite(b"c" * 4096, 0)
        h.flush()
        h.shutdown()
    finally:
        d.stop()
