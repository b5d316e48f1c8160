"""One peerlink port for every volume group of a node (DESIGN §6a, PROTOCOL.md "Route").

A group runs in processes of its own (its daemon, its peerlink); a node that receives
many groups on one port puts a *front* before them.  A sender of a group opens its TCP
connection with a plaintext route preamble, ``NBDGW-GROUP <group>\\n``, then speaks
peerlink (TLS included) as it would on a port of the group's own.  The front reads the
preamble and nothing more (``PreambleParser.want`` never asks for a byte past the
newline), and passes the connected socket to the group's peerlink process over a unix
datagram socket with SCM_RIGHTS; that process serves it as if it had accepted it
(``ReceiverServer.adopt_socket``).  So TLS, the proofs, the session and the data stay
end to end between the two peerlink processes: the front is trusted with routing only.
A preamble that lies about the group lands in a receiver that proves the session for
its own group (auth.py's realm): the sender's proof, made for another group, fails.

Isolation: a handover is one non-blocking ``sendmsg``.  A group whose process is stopped,
restarting or stalled has no socket to send to, or a full queue: the connection is
dropped (the sender reconnects with its backoff) and the front goes on with the others.
A stranger holds little: the preamble has a deadline and a bounded length, and the
connections still in their preamble are capped in all and per source address.

``PreambleParser`` is pure; ``Front`` (the listener, run by the groups parent) and
``HandoffReceiver`` (in a group's peerlink process) are the asyncio shells.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Final

import structlog

from .errors import PeerProtocolError

log = structlog.get_logger(component="peerlink-front")

PREFIX: Final = b"NBDGW-GROUP "
MAX_GROUP: Final = 32  # gateway/config.py: 1-32 of a-z, 0-9, '-', starting alphanumeric
GROUP_RE: Final = re.compile(rb"[a-z0-9][a-z0-9-]{0,31}")
DEADLINE: Final = 5.0  # seconds for the whole preamble, from accept
MAX_PENDING: Final = 64  # connections still in their preamble, in all
MAX_PENDING_PER_SOURCE: Final = 8
HANDOFF_FILE: Final = "peerlink-front.sock"  # in a group's <data_dir>/run/
HANDOFF_BATCH: Final = 64  # sockets taken per wake-up of the group's loop
COUNTERS: Final = ("handed", "garbage", "unknown_group", "silent", "over_capacity",
                   "group_unavailable", "group_busy")


class PreambleError(PeerProtocolError):
    """A connection's first bytes are not a route preamble: close it."""


def preamble(group: str) -> bytes:
    """The line a sender writes first on a connection to a node's shared port."""
    data = group.encode()
    if not GROUP_RE.fullmatch(data):
        raise ValueError(f"group name {group!r} cannot be routed (1-{MAX_GROUP} of a-z, "
                         "0-9, '-', starting with a letter or digit)")
    return PREFIX + data + b"\n"


class PreambleParser:
    """The route preamble, fed as it arrives; never consumes a byte past it.

    ``want()`` is how many bytes may be read next: the rest of the fixed prefix, then
    one at a time (the name's end is the newline, and what follows it is the peer's TLS
    or peerlink, which belongs to the group's process).  ``feed`` returns the group name
    once the newline came, None while more is needed, and raises ``PreambleError`` at the
    first byte that cannot be part of a preamble (so garbage is refused as it arrives)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def want(self) -> int:
        return max(1, len(PREFIX) - len(self.buf))

    def feed(self, data: bytes) -> str | None:
        if len(data) > self.want():
            raise ValueError(f"fed {len(data)} bytes, {self.want()} wanted")
        for byte in data:
            self.buf.append(byte)
            n = len(self.buf)
            if n <= len(PREFIX):
                if self.buf != PREFIX[:n]:
                    raise PreambleError(f"not a route preamble (starts {bytes(self.buf)!r})")
                continue
            if byte == ord("\n"):
                return self._name(bytes(self.buf[len(PREFIX):-1]))
            if n - len(PREFIX) > MAX_GROUP:
                raise PreambleError(f"route preamble: group name over {MAX_GROUP} bytes")
        return None

    @staticmethod
    def _name(name: bytes) -> str:
        if not GROUP_RE.fullmatch(name):
            raise PreambleError(f"route preamble: bad group name {name[:MAX_GROUP]!r}")
        return name.decode()


def connect_routed(host: str, port: int, timeout: float, line: bytes) -> socket.socket:
    """A sender's connection to a shared port (blocking: run it on a thread), its route
    preamble ``line`` written; non-blocking, for the event loop, from then on."""
    sock = socket.create_connection((host, port), timeout)
    try:
        sock.sendall(line)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def _reachable(path: Path) -> Iterator[str]:
    """A name for the unix socket ``path`` that fits sun_path however deep the data
    directory is: through a descriptor of its directory (as nbd_plugin.control does)."""
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{dfd}/{path.name}"
    finally:
        os.close(dfd)


def handoff_path(data_dir: Path) -> Path:
    """Where a group's peerlink process takes sockets from the front."""
    return Path(data_dir) / "run" / HANDOFF_FILE


class Front:
    """The listener of a node's shared peerlink port: preamble, then handover.

    ``routes`` maps a group to its handoff socket (``handoff_path`` of the group's data
    directory); ``set_routes`` replaces them (the groups parent's reload)."""

    def __init__(self, routes: Mapping[str, Path], *, deadline: float = DEADLINE,
                 max_pending: int = MAX_PENDING,
                 per_source: int = MAX_PENDING_PER_SOURCE) -> None:
        self.routes = dict(routes)
        self.deadline = deadline
        self.max_pending = max_pending
        self.per_source = per_source
        self.counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.pending: collections.Counter[str] = collections.Counter()
        self.tasks: set[asyncio.Task[None]] = set()
        self.listener: socket.socket | None = None
        self.out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.out.setblocking(False)

    def set_routes(self, routes: Mapping[str, Path]) -> None:
        self.routes = dict(routes)
        log.info("front_routes", groups=sorted(self.routes))

    async def serve(self, host: str, port: int, stop: asyncio.Event,
                    bound: Callable[[tuple[str, int]], None] | None = None) -> None:
        """Listen on host:port until ``stop``; ``bound`` is told the address bound."""
        loop = asyncio.get_running_loop()
        self.listener = socket.create_server((host, port), family=_family(host),
                                             backlog=128, reuse_port=False)
        self.listener.setblocking(False)
        addr = self.listener.getsockname()
        log.info("front_listening", address=f"{addr[0]}:{addr[1]}", groups=sorted(self.routes))
        if bound is not None:
            bound((str(addr[0]), int(addr[1])))
        acceptor = loop.create_task(self._accept_loop())
        try:
            await stop.wait()
        finally:
            acceptor.cancel()
            for t in list(self.tasks):
                t.cancel()
            await asyncio.gather(acceptor, *self.tasks, return_exceptions=True)
            self.listener.close()
            self.out.close()
            log.info("front_stopped", **self.counts)

    async def _accept_loop(self) -> None:
        assert self.listener is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(self.listener)
            except OSError as e:  # EMFILE and the like: wait, do not spin
                log.warning("front_accept_failed", error=str(e))
                await asyncio.sleep(0.1)
                continue
            source = str(addr[0])
            if (sum(self.pending.values()) >= self.max_pending
                    or self.pending[source] >= self.per_source):
                conn.close()
                self._drop("over_capacity", source, f"{sum(self.pending.values())} "
                           f"connections in their preamble ({self.pending[source]} from "
                           f"{source}; at most {self.max_pending}, {self.per_source} per "
                           "source)")
                continue
            self.pending[source] += 1
            task = loop.create_task(self._route(conn, source))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _route(self, conn: socket.socket, source: str) -> None:
        """One connection: its preamble within the deadline, then the handover; the
        front's copy of the socket is closed either way."""
        try:
            with conn:
                conn.setblocking(False)
                try:
                    group = await asyncio.wait_for(_read_preamble(conn), self.deadline)
                except TimeoutError:
                    self._drop("silent", source, f"no route preamble within "
                               f"{self.deadline:g} s")
                    return
                except PreambleError as e:
                    self._drop("garbage", source, str(e))
                    return
                except OSError as e:
                    self._drop("garbage", source, f"connection failed: {e}")
                    return
                self._hand(conn, group, source)
        finally:
            self.pending[source] -= 1
            if self.pending[source] <= 0:
                del self.pending[source]

    def _hand(self, conn: socket.socket, group: str, source: str) -> None:
        path = self.routes.get(group)
        if path is None:
            self._drop("unknown_group", source, f"no group {group!r} on this node", group)
            return
        try:
            with _reachable(path) as name:
                # sendmsg, not socket.send_fds: that drops its flags and address
                self.out.sendmsg([group.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                     array.array("i", [conn.fileno()]))],
                                 socket.MSG_DONTWAIT, name)
        except BlockingIOError:
            self._drop("group_busy", source, "the group's peerlink takes no more "
                       "connections now (stopped or stalled)", group)
            return
        except OSError as e:  # no socket there: the group's peerlink is not running
            self._drop("group_unavailable", source, f"the group's peerlink is not "
                       f"receiving: {e.strerror or e}", group)
            return
        self.counts["handed"] += 1
        log.info("front_handed", group=group, peer_addr=source, handed=self.counts["handed"])

    def _drop(self, why: str, source: str, reason: str, group: str | None = None) -> None:
        self.counts[why] += 1
        log.warning("front_dropped", why=why, peer_addr=source, group=group, reason=reason,
                    count=self.counts[why])


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


async def _read_preamble(conn: socket.socket) -> str:
    loop = asyncio.get_running_loop()
    parser = PreambleParser()
    while True:
        data = await loop.sock_recv(conn, parser.want())
        if not data:
            raise PreambleError("closed before the end of the route preamble")
        group = parser.feed(data)
        if group is not None:
            return group


class HandoffReceiver:
    """A group's end of the handover: a unix datagram socket at ``path`` (mode 0600:
    only root, the front's user, may send to it) from which each connected socket is
    given to ``adopt``.  Its queue is the kernel's (net.unix.max_dgram_qlen): when this
    process does not read it, the front's send fails at once instead of waiting."""

    def __init__(self, path: Path, adopt: Callable[[socket.socket], None]) -> None:
        self.path = path
        self.adopt = adopt
        self.sock: socket.socket | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        old = os.umask(0o177)
        try:
            with _reachable(self.path) as name:
                s.bind(name)
        except BaseException:
            s.close()
            raise
        finally:
            os.umask(old)
        s.setblocking(False)
        self.sock = s
        asyncio.get_running_loop().add_reader(s.fileno(), self._ready)
        log.info("handoff_listening", path=str(self.path))

    def _ready(self) -> None:
        assert self.sock is not None
        for _ in range(HANDOFF_BATCH):
            try:
                _msg, fds, _flags, _addr = socket.recv_fds(self.sock, 64, 4)
            except BlockingIOError:
                return
            for fd in fds:
                conn = socket.socket(fileno=fd)
                if conn.type != socket.SOCK_STREAM or conn.family not in (
                        socket.AF_INET, socket.AF_INET6):
                    log.warning("handoff_refused", reason=f"not a TCP socket ({conn.family})")
                    conn.close()
                    continue
                conn.setblocking(False)
                self.adopt(conn)

    def close(self) -> None:
        if self.sock is None:
            return
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
        self.sock = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class FrontThread:
    """A ``Front`` on a thread of its own, with its own event loop, for a parent whose
    main loop is not asyncio (the groups parent, gateway/daemon.py).  A port it cannot
    bind (still held by a process that is stopping) is tried again every ``RETRY``
    seconds until it is stopped: the groups run meanwhile, their routed peers retry."""

    RETRY: Final = 2.0

    def __init__(self, front: Front, host: str, port: int) -> None:
        self.front = front
        self.host, self.port = host, port
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping: asyncio.Event | None = None
        self.ready = threading.Event()  # the loop runs: set_routes and stop may call in
        self.thread = threading.Thread(target=self._run, name="peerlink-front", daemon=True)

    def start(self) -> None:
        self.thread.start()
        self.ready.wait(5.0)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        self.ready.set()
        while not self.stopping.is_set():
            try:
                await self.front.serve(self.host, self.port, self.stopping)
            except OSError as e:
                log.error("front_failed", address=f"{self.host}:{self.port}", error=str(e),
                          retry=self.RETRY)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), self.RETRY)

    def set_routes(self, routes: Mapping[str, Path]) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.front.set_routes, dict(routes))

    def stop(self, timeout: float = 5.0) -> None:
        if self.loop is not None and self.stopping is not None:
            self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(timeout)
