"""The plugin's side of sync replication: after every write (and after a FLUSH or a FUA
write is durable locally) a request waits until every synchronous peer that holds
waiters has the volume's journal through that request's seq, durably.

Protocol (PROTOCOL.md, "Sync mode"; the server is gateway/replication.py): one unix
socket per nbdkit process, JSON lines.  ``{"op": "written", "volume": V, "seq": S}``
tells peerlink that V is written through S and a client waits for it (its senders wake
and ship at once); peerlink answers, whenever the durable point moves past what it last
said, ``{"op": "durable", "volume": V, "through": T, "degraded": [peer...]}``.

Requests wait *together*, never one behind another: nbdkit runs them in parallel when a
gate is configured (plugin.py ``thread_model``), each sends its seq (only if above what
was sent already) and waits on a lock of its own; whichever waiter finds nobody
reading the socket reads it (leader/follower: no extra thread, no extra wake-up at queue
depth 1) and wakes the waiters a reply covers.  One ``through`` line releases every
waiter it covers, and only those.

A stalled peer keeps waiters waiting (peerlink decides when one may be degraded), so a
request may wait long; nothing here times it out.  If peerlink itself cannot be reached
(not started yet, restarting):

- ``auto_degrade`` (no failover core on this node: ``failover.auto: false`` or no
  peers): the gate waits up to ``timeout`` for it, once; after that it is *down*:
  requests complete at local durability and each later request tries one quick
  reconnect, so sync resumes as soon as peerlink is back;
- otherwise requests keep waiting for peerlink, unless the daemon has had every sync
  peer outdated (``<data_dir>/run/outdated.json``): then they complete without them.

Both transitions are logged.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from _thread import allocate_lock as _allocate_lock
from collections.abc import Callable
from pathlib import Path

import structlog

from blockstore.errors import BlockstoreError
from blockstore.node_state import read_outdated

log = structlog.get_logger(component="nbd_plugin")

RECONNECT_POLL = 0.05
READ_POLL = 0.5  # a waiting reader wakes this often (nothing is wrong; it reads again)
OUTDATED_POLL = 0.1
_TIMEVAL = struct.pack("ll", int(READ_POLL), int(READ_POLL % 1 * 1e6))


class _Waiter:
    """One request waiting: its seq, and a lock of its own that the gate releases to wake
    it (a Condition would build a Python object per request and a lock per wait).
    ``woken`` (changed only under the gate's lock) says the lock is released: a wake-up
    not yet consumed, which the next wait returns at once for (the caller re-checks)."""

    __slots__ = ("lock", "seq", "woken")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.lock = _allocate_lock()
        self.lock.acquire()
        self.woken = False

    def notify(self) -> None:
        """Wake it (the gate's lock held)."""
        if not self.woken:
            self.woken = True
            self.lock.release()

    def wait(self, gate_lock: threading.Lock, timeout: float) -> None:
        """Release the gate's lock until woken or ``timeout``; hold it again."""
        gate_lock.release()
        try:
            got = self.lock.acquire(True, timeout)
        finally:
            gate_lock.acquire()
        if got:
            self.woken = False


class SyncGate:
    """Waits for the sync peers' durable acks (module docstring); thread-safe.  Each
    waiter has a lock of its own to be woken by: a reply wakes only the waiters it covers
    (and, when the reader leaves, one other to read next), never all of them."""

    def __init__(self, path: Path, timeout: float, *, auto_degrade: bool = True,
                 peers: tuple[str, ...] = (), data_dir: Path | None = None) -> None:
        self.path = path
        self.timeout = timeout
        self.auto_degrade = auto_degrade
        self.peers = frozenset(peers)
        self.data_dir = data_dir
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.buf = b""
        self.reading = False
        self.durable: dict[str, int] = {}  # volume -> seq durable on every holding peer
        self.waiters: dict[str, list[_Waiter]] = {}  # volume -> requests waiting now
        self.sent: dict[str, int] = {}  # volume -> highest seq sent on this connection
        self.heads: dict[str, bytes] = {}  # volume -> its `written` line up to the seq
        self.down_since: float | None = None
        self.outdated_checked = 0.0
        self.degraded: frozenset[str] = frozenset()

    # -- the connection (every method here runs with self.lock held) ------------------------

    def _connect(self) -> bool:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(self.path))
        except OSError:
            s.close()
            return False
        # A blocking socket whose kernel timeouts bound a recv or a send (EAGAIN after
        # READ_POLL): Python's own timeout would poll before every recv and send, one
        # more system call and one more release of the GIL per request.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL)
        self.sock, self.buf, self.sent = s, b"", {}
        if self.down_since is not None:
            log.warning("sync_gate_back", down_s=round(time.time() - self.down_since, 1))
            self.down_since = None
        return True

    def _drop(self, sock: socket.socket) -> None:
        """Forget a broken connection; waiters send their seqs again on the next one."""
        if sock is self.sock:
            self.sock, self.buf, self.sent = None, b"", {}
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes a reader blocked in recv
        if not self.reading:
            sock.close()
        self._wake(everyone=True)

    def _wake(self, everyone: bool = False) -> None:
        """Wake the waiters whose seq is durable now (or every one)."""
        for volume, ws in self.waiters.items():
            durable = self.durable.get(volume, 0)
            for w in ws:
                if everyone or w.seq <= durable:
                    w.notify()

    def _hand_over(self) -> None:
        """The reader is leaving: wake one waiter to read next."""
        for ws in self.waiters.values():
            if ws:
                ws[0].notify()
                return

    def _tell(self, volume: str, seq: int) -> None:
        sock = self.sock
        if sock is None or self.sent.get(volume, 0) >= seq:
            return
        head = self.heads.get(volume)
        if head is None:  # the line as json.dumps writes it, up to the seq
            head = self.heads[volume] = json.dumps(
                {"op": "written", "volume": volume, "seq": 0}).encode()[:-2]
        try:
            sock.sendall(b"%s%d}\n" % (head, seq))
        except OSError:
            self._drop(sock)
            return
        self.sent[volume] = seq

    def _read(self) -> None:
        """Read what peerlink said (the lock is released while blocked in recv)."""
        sock = self.sock
        assert sock is not None and not self.reading
        self.reading = True
        self.lock.release()
        try:
            data: bytes | None = sock.recv(65536)
        except (BlockingIOError, TimeoutError):  # SO_RCVTIMEO: nothing said meanwhile
            data = None
        except OSError:
            data = b""
        finally:
            self.lock.acquire()
            self.reading = False
        if sock is not self.sock:  # dropped meanwhile (a failed send)
            sock.close()
            self._wake(everyone=True)
            return
        if data is None:
            return
        if not data:
            self._drop(sock)
            return
        *lines, self.buf = (self.buf + data).split(b"\n")
        for line in lines:
            try:
                msg = json.loads(line)
                volume, through = str(msg["volume"]), int(msg["through"])
                degraded = frozenset(str(p) for p in msg.get("degraded", ()))
            except (ValueError, KeyError, TypeError):
                log.error("sync_gate_bad_reply", reply=line[:200].decode("utf-8", "replace"))
                self._drop(sock)
                return
            if through > self.durable.get(volume, 0):
                self.durable[volume] = through
            if degraded != self.degraded:
                log.warning("sync_peers_changed", degraded=sorted(degraded))
                self.degraded = degraded
        self._wake()

    def _unreachable(self, first_failure: float) -> bool:
        """peerlink cannot be reached: True when the request may complete without the
        sync peers (module docstring), False to keep waiting."""
        now = time.monotonic()
        if self.auto_degrade:
            if self.down_since is None and now - first_failure < self.timeout:
                return False
            if self.down_since is None:
                self.down_since = time.time()
                log.error("sync_gate_unreachable", path=str(self.path),
                          note="writes complete at local durability until peerlink "
                               "answers again (no failover core: failover.auto is off)")
            return True
        if self.down_since is None:
            self.down_since = time.time()
            log.error("sync_gate_unreachable", path=str(self.path),
                      note="writes wait for peerlink (or for the daemon to have the sync "
                           "peers outdated)")
        if self.data_dir is not None and now - self.outdated_checked >= OUTDATED_POLL:
            self.outdated_checked = now
            try:
                outdated = read_outdated(self.data_dir)
            except (BlockstoreError, OSError, ValueError) as e:
                log.warning("outdated_unreadable", error=str(e))
                return False
            if self.peers and self.peers <= outdated:
                log.error("sync_gate_outdated", peers=sorted(self.peers),
                          note="peerlink is unreachable and every sync peer is outdated: "
                               "writes complete at local durability")
                return True
        return False

    # -- the API ---------------------------------------------------------------------------

    def wait(self, volume: str, seq: int, alone: Callable[[], None] | None = None) -> bool:
        """Return once every holding sync peer has ``volume`` through ``seq`` durably
        (True), or when the request may complete without them (False: peerlink is
        unreachable, module docstring).  ``alone`` runs once, after the seq was sent and
        without the lock, if no other request of the volume is waiting (the plugin makes
        the local journal durable meanwhile: a FLUSH after a lone write is then free)."""
        with self.lock:
            if self.durable.get(volume, 0) >= seq:
                return True
            w = _Waiter(seq)
            ws = self.waiters.setdefault(volume, [])
            ws.append(w)
            try:
                return self._wait(volume, w, alone)
            finally:
                ws.remove(w)
                if not self.reading:
                    self._hand_over()

    def _wait(self, volume: str, w: _Waiter, alone: Callable[[], None] | None) -> bool:
        """wait() with the lock held (once: _read and ``alone`` release it)."""
        first_failure: float | None = None
        while self.durable.get(volume, 0) < w.seq:
            if self.sock is None and not self._connect():
                if self.auto_degrade and self.down_since is not None:
                    return False  # down: one quick try per request
                if first_failure is None:
                    first_failure = time.monotonic()
                if self._unreachable(first_failure):
                    return False
                w.wait(self.lock, RECONNECT_POLL)
                continue
            self._tell(volume, w.seq)
            if self.sock is None:
                continue
            if alone is not None:
                if len(self.waiters[volume]) == 1:
                    self.lock.release()
                    try:
                        alone()
                    finally:
                        self.lock.acquire()
                alone = None
                continue
            if self.reading:
                w.wait(self.lock, READ_POLL)
            else:
                self._read()
        return True

    def close(self) -> None:
        with self.lock:
            if self.sock is not None:
                self._drop(self.sock)
