"""The sync gate: the plugin's SyncGate (nbd_plugin/syncgate.py) waiting in many threads,
against a scripted gate and against the real one (gateway/replication.py, in-process,
its sender's acks injected; the peer itself is never reachable).  No nbdkit."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockstore.errors import FormatError
from blockstore.node_state import outdated_path, read_outdated, write_outdated
from blockstore.volume import create_volume
from gateway import nodestate
from gateway.config import Role, parse_config
from gateway.replication import Replication, gate_path, has_failover_core
from gateway.serve import nbdkit_argv
from nbd_plugin.handle import Handle
from nbd_plugin.syncgate import SyncGate


class Waiters:
    """``wait(volume, seq)`` in one thread per seq; which have returned, and what."""

    def __init__(self, gate: SyncGate, volume: str, seqs: list[int]) -> None:
        self.done: dict[int, bool] = {}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._wait, args=(gate, volume, s),
                                         daemon=True) for s in seqs]
        for t in self.threads:
            t.start()

    def _wait(self, gate: SyncGate, volume: str, seq: int) -> None:
        ok = gate.wait(volume, seq)
        with self.lock:
            self.done[seq] = ok

    def returned(self, timeout: float = 0.0) -> dict[int, bool]:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                done = dict(self.done)
            if len(done) == len(self.threads) or time.monotonic() >= deadline:
                return done
            time.sleep(0.01)


class ScriptedGate:
    """A unix socket server that records ``written`` lines and sends what it is told."""

    def __init__(self, path: Path) -> None:
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen()
        self.conns: list[socket.socket] = []
        self.lines: list[dict[str, Any]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._read, args=(c,), daemon=True).start()

    def _read(self, c: socket.socket) -> None:
        for line in c.makefile("rb"):
            self.lines.append(json.loads(line))

    def durable(self, volume: str, through: int, degraded: tuple[str, ...] = ()) -> None:
        self.conns[-1].sendall(json.dumps({"op": "durable", "volume": volume,
                                           "through": through,
                                           "degraded": list(degraded)}).encode() + b"\n")

    def close(self) -> None:
        self.srv.close()
        for c in self.conns:
            c.close()


def test_one_line_releases_every_waiter_it_covers(tmp_path: Path) -> None:
    server = ScriptedGate(tmp_path / "gate.sock")
    gate = SyncGate(tmp_path / "gate.sock", 5.0, auto_degrade=False)
    try:
        w = Waiters(gate, "v1", list(range(1, 17)))
        deadline = time.monotonic() + 5
        while not server.lines or max(x["seq"] for x in server.lines) < 16:
            assert time.monotonic() < deadline, server.lines
            time.sleep(0.01)
        assert len(server.conns) == 1  # sixteen waiters, one connection
        assert {x["op"] for x in server.lines} == {"written"}
        assert w.returned(0.2) == {}  # nothing durable yet: nobody returned
        server.durable("v1", 10)
        assert w.returned(2.0).keys() >= set(range(1, 11))
        time.sleep(0.2)
        assert set(w.returned()) == set(range(1, 11))  # 11..16 are not covered
        server.durable("other", 99)  # another volume's point releases none of them
        time.sleep(0.2)
        assert set(w.returned()) == set(range(1, 11))
        server.durable("v1", 16, degraded=("dc",))
        assert w.returned(2.0) == dict.fromkeys(range(1, 17), True)
        assert gate.degraded == {"dc"}
        assert gate.wait("v1", 12)  # already durable: no request at all
        assert max(x["seq"] for x in server.lines) == 16
    finally:
        gate.close()
        server.close()


def test_no_gate_never_waits() -> None:
    """An async-only (or peerless) node serves with no gate: a write's replicated()
    returns at once."""
    class Vol:
        name = "v1"

    h = Handle(Vol(), False, lock=threading.Lock())  # type: ignore[arg-type]
    t = time.monotonic()
    for seq in range(1000):
        h.replicated(seq)
    assert time.monotonic() - t < 0.5


DC = {"name": "dc", "role": "secondary", "address": "192.0.2.12"}
DR = {"name": "dr", "role": "dr", "address": "192.0.2.13"}


def node(name: str, role: str, peers: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    # Automatic failover needs the peers' secret (its heartbeats are signed with it).
    return {"version": 1, "node": {"name": name, "role": role}, "peers": peers,
            "peerlink": {"secret_file": "/etc/nbdgw/peer.secret"}, **extra}


def test_the_plugin_is_told_whether_it_may_degrade_on_its_own(tmp_path: Path) -> None:
    peers = [{**DC, "mode": "sync", "sync_timeout": 2}, DR]
    auto = parse_config(node("main", "primary", peers)).with_overrides(data_dir=tmp_path)
    off = parse_config(node("main", "primary", peers, failover={"auto": False})
                       ).with_overrides(data_dir=tmp_path)
    assert has_failover_core(auto) and not has_failover_core(off)
    argv = nbdkit_argv(auto, ["v1"])
    assert "sync_timeout=2" in argv and "sync_peers=dc" in argv
    assert "sync_auto_degrade=false" in argv
    assert "sync_auto_degrade=true" in nbdkit_argv(off, ["v1"])
    # No sync peer: no gate at all, nothing ever waits.
    plain = parse_config(node("main", "primary", [DC, DR])).with_overrides(data_dir=tmp_path)
    assert not [a for a in nbdkit_argv(plain, ["v1"]) if a.startswith("sync_")]


def test_outdated_file(tmp_path: Path) -> None:
    assert read_outdated(tmp_path) == set()
    write_outdated(tmp_path, 0, ["dc"])
    assert read_outdated(tmp_path) == {"dc"}
    rec = json.loads(outdated_path(tmp_path).read_text())
    assert rec == {"kind": "outdated", "version": 1, "epoch": 0, "peers": ["dc"]}
    # Written before a failover this node took part in: about another primary's peers.
    nodestate.save(tmp_path, Role.PRIMARY, 2, "promoted", primary="main")
    assert read_outdated(tmp_path) == set()
    write_outdated(tmp_path, 2, {"dc", "x"})
    assert read_outdated(tmp_path) == {"dc", "x"}
    outdated_path(tmp_path).write_text('{"kind": "outdated", "version": 1, "peers": "dc"}')
    with pytest.raises(FormatError, match="expected an integer epoch and a list of peers"):
        read_outdated(tmp_path)


# -- the real gate (gateway/replication.py) ------------------------------------------------


class Node:
    """A primary's Replication on its own event loop thread; its one peer, dc, never
    answers (nothing listens on its port)."""

    def __init__(self, data_dir: Path, mode: str, sync_timeout: float, auto: bool) -> None:
        create_volume(data_dir, "v1", 16 << 20)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # closed again: dc is unreachable
        secret = data_dir.parent / "peer.secret"
        secret.write_text("s" * 32)
        self.cfg = parse_config({
            "version": 1, "node": {"name": "main", "role": "primary",
                                   "data_dir": str(data_dir)},
            "failover": {"auto": auto}, "peerlink": {"secret_file": str(secret)},
            "peers": [{"name": "dc", "role": "secondary", "address": "127.0.0.1",
                       "port": port, "mode": mode, "sync_timeout": sync_timeout},
                      {"name": "dr", "role": "dr", "address": "127.0.0.1", "port": port}]})
        self.rep = Replication(self.cfg)
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.started.wait(10)
        self.gate = SyncGate(gate_path(data_dir), sync_timeout, auto_degrade=not auto,
                             peers=("dc",), data_dir=data_dir)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.stop = asyncio.Event()

        async def main() -> None:
            task = asyncio.get_running_loop().create_task(self.rep.run(self.stop))
            while self.rep.gate is None:
                await asyncio.sleep(0.01)
            self.started.set()
            await task

        self.loop.run_until_complete(main())

    def tx(self, peer: str = "dc") -> Any:
        return next(t for t in self.rep.senders["v1"] if t.peer == peer)

    def ack(self, seq: int) -> None:
        """dc acknowledges ``seq`` durably (as its receiver's Ack would say)."""
        self.loop.call_soon_threadsafe(self.tx()._set_acked, seq)

    def live(self) -> dict[str, Any]:
        return self.tx().live()  # type: ignore[no-any-return]

    def close(self) -> None:
        self.gate.close()
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Any]:
    nodes: list[Node] = []

    def make(mode: str = "sync", sync_timeout: float = 30.0, auto: bool = True) -> Node:
        n = Node(tmp_path / f"n{len(nodes)}", mode, sync_timeout, auto)
        nodes.append(n)
        return n

    yield make
    for n in nodes:
        n.close()


def test_acks_release_the_waiters_they_cover_in_groups(make_node: Any) -> None:
    n = make_node()
    w = Waiters(n.gate, "v1", list(range(1, 13)))
    assert w.returned(0.3) == {}
    assert n.tx().want_seq == 12 and n.tx("dr").want_seq == 12  # every sender woken
    n.ack(4)
    assert set(w.returned(2.0)) >= {1, 2, 3, 4}
    time.sleep(0.2)
    assert set(w.returned()) == {1, 2, 3, 4}
    n.ack(12)
    assert w.returned(2.0) == dict.fromkeys(range(1, 13), True)
    assert n.live()["sync"] == "ok" and n.live()["stalled_since"] is None


def test_a_stalled_peer_holds_waiters_until_the_daemon_outdates_it(make_node: Any,
                                                                    tmp_path: Path) -> None:
    n = make_node(sync_timeout=0.3)
    w = Waiters(n.gate, "v1", [1, 2, 3])
    time.sleep(1.2)  # four times sync_timeout: stalled, and still nobody returned
    assert w.returned() == {}
    live = n.live()
    assert live["sync"] == "stalled" and live["stalled_since"] is not None
    assert live["mode"] == "sync" and live["degraded"] is None
    write_outdated(tmp_path / "n0", 0, ["dr"])  # another peer outdated: no permission
    time.sleep(0.5)
    assert w.returned() == {}
    t = time.monotonic()
    write_outdated(tmp_path / "n0", 0, ["dc"])
    assert w.returned(2.0) == {1: True, 2: True, 3: True}
    assert time.monotonic() - t < 1.0
    live = n.live()
    assert live["sync"] == "degraded" and live["state"] == "degraded"
    assert "outdated by the daemon" in live["degraded"]
    assert n.gate.degraded == {"dc"}
    t = time.monotonic()
    assert n.gate.wait("v1", 50)  # degraded: nobody waits for it
    assert time.monotonic() - t < 0.5


def test_without_a_failover_core_a_stalled_peer_degrades_on_its_own(make_node: Any) -> None:
    n = make_node(sync_timeout=0.5, auto=False)
    t = time.monotonic()
    w = Waiters(n.gate, "v1", [1, 2])
    assert w.returned(5.0) == {1: True, 2: True}
    assert 0.4 <= time.monotonic() - t < 2.0
    assert n.live()["sync"] == "degraded"
    assert "no failover core" in n.live()["degraded"]


def test_async_peers_hold_nobody(make_node: Any) -> None:
    n = make_node(mode="async")
    t = time.monotonic()
    for seq in range(1, 200):
        assert n.gate.wait("v1", seq)
    assert time.monotonic() - t < 2.0
    assert n.tx().want_seq == 199  # the senders were still woken to ship at once
    assert n.live()["sync"] is None and n.live()["stalled_since"] is None


def test_a_peerlink_leaving_removes_its_own_gate_socket_only(tmp_path: Path) -> None:
    """A peerlink that exits while a newer one has bound the gate's path (its socket
    replaced ours) leaves the newer one's socket alone: nbdkit reaches the gate there."""
    r = object.__new__(Replication)
    r.cfg = type("Cfg", (), {"data_dir": tmp_path})()
    path = gate_path(tmp_path)
    path.parent.mkdir()
    ours = socket.socket(socket.AF_UNIX)
    ours.bind(str(path))
    st = path.stat()
    r.gate_file = (st.st_dev, st.st_ino)
    path.unlink()  # the newer peerlink's bind replaces the path...
    theirs = socket.socket(socket.AF_UNIX)
    theirs.bind(str(path))  # ...while ours is still open (no inode reuse)
    r._unlink_gate()
    assert path.exists()
    ours.close()
    theirs.close()
    st = path.stat()
    r.gate_file = (st.st_dev, st.st_ino)  # now it is ours: it goes
    r._unlink_gate()
    assert not path.exists()
