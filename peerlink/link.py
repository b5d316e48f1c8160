"""The asyncio shell around the pure codec: one peerlink connection (asyncpg's BaseProtocol).

``Link`` is an ``asyncio.Protocol``.  Bytes received go through a ``FrameDecoder`` and
``decode()``; the messages wait in a queue for ``recv()``.  A ``Ping`` is answered here
at once, whatever the consumer is doing, so a busy receiver still looks alive.  A bad frame
or message (``PeerProtocolError``) closes the connection at once: nothing received after
the first bad byte is ever handed out, and ``recv()`` raises the error.

Backpressure both ways (asyncpg ``writing_allowed``): ``pause_writing``/``resume_writing``
gate an event that ``drain()`` awaits; and when the decoded messages waiting for
``recv()`` pass ``max_queued`` bytes, reading from the socket pauses until the consumer
catches up, so a slow consumer bounds memory and TCP pushes back on the peer.

Liveness is measured in whole frames (PROTOCOL.md): a corrupted length can make the
decoder wait for bytes that never come, so ``watchdog()`` closes a link that delivered no
complete frame for ``timeout`` seconds, however many bytes it received.

Until the session says the peer has proved itself (``authenticated()``), a link does
little for it: frames of at most ``PREAUTH_MAX_BODY`` bytes, none compressed, one message
at a time (reading pauses while one waits for ``recv()``), no Pong; an accepting link is
closed if it is not authenticated ``handshake_timeout`` seconds after it connected, and
an ``AdmissionGate`` bounds how many unauthenticated connections one source address, and
all together, may hold.  Afterwards a frame larger than ``OFFLOAD_BYTES`` is decompressed
and decoded on a worker thread, in order, so that one large Batch does not hold the
event loop.

A worker thread may send too (``send_from_thread``: the receiver's apply thread sends
its Ack the moment the replica's ``fdatasync`` returned, without waking the event loop
first).  On a plaintext link with nothing queued in the transport it writes the frame
itself, on its own duplicate of the socket's descriptor; otherwise (TLS, a backlog, a
partial write) the loop writes what is left, before anything else it sends.  A lock
orders the two: every write of the link, the loop's too, is made holding it, so frames
never interleave and none overtakes one sent before it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, cast

import structlog

from blockstore.errors import BlockstoreError, JournalGap

from .errors import Fenced, PeerAuthError, PeerlinkError, PeerProtocolError, PeerRefused
from .frames import (
    DEFAULT_MAX_BODY,
    FLAG_ZSTD,
    NEED_DATA,
    PREAUTH_MAX_BODY,
    FrameDecoder,
    RawFrame,
    encode_frame,
    unpack_body,
)
from .messages import Message, Ping, Pong, decode

log = structlog.get_logger(component="peerlink")

DEFAULT_MAX_QUEUED: Final = 96 << 20
WRITE_HIGH: Final = 4 << 20  # transport buffer above which writers wait in drain()
WRITE_LOW: Final = 1 << 20
# A frame whose body is larger than this is unpacked and decoded on a worker thread: a
# Batch of 16384 records takes tens of ms to check, a 64 MiB zstd body as long to inflate.
OFFLOAD_BYTES: Final = 256 << 10
# Unauthenticated connections an accepting side holds at once, per source address and in
# all (more are closed at once; each holds at most one PREAUTH_MAX_BODY frame).
PREAUTH_PER_SOURCE: Final = 8
PREAUTH_TOTAL: Final = 64

_decode_pool: ThreadPoolExecutor | None = None


def _offload(raw: RawFrame) -> Message:
    """Unpack and decode a large frame (worker thread)."""
    return decode(unpack_body(raw))


def _pool() -> ThreadPoolExecutor:
    global _decode_pool  # one pool per process, made on first use
    if _decode_pool is None:
        _decode_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peerlink-decode")
    return _decode_pool


class AdmissionGate:
    """How many unauthenticated connections an accepting side holds: at most
    ``per_source`` from one address and ``total`` in all (a link leaves when it
    authenticates or closes)."""

    def __init__(self, per_source: int = PREAUTH_PER_SOURCE,
                 total: int = PREAUTH_TOTAL) -> None:
        self.per_source = per_source
        self.total = total
        self.waiting: dict[str, set[Link]] = {}

    def enter(self, link: Link, source: str) -> str | None:
        """Admit ``link`` from ``source``; else why not."""
        held = self.waiting.get(source, set())
        if len(held) >= self.per_source:
            return (f"{len(held)} unauthenticated connections from {source} already "
                    f"(at most {self.per_source})")
        if sum(len(x) for x in self.waiting.values()) >= self.total:
            return f"{self.total} unauthenticated connections already (at most {self.total})"
        self.waiting.setdefault(source, set()).add(link)
        return None

    def leave(self, link: Link, source: str) -> None:
        held = self.waiting.get(source)
        if held is not None:
            held.discard(link)
            if not held:
                del self.waiting[source]

    @property
    def count(self) -> int:
        return sum(len(x) for x in self.waiting.values())


class LinkClosed(PeerlinkError):
    """The connection is gone (peer closed, reset, or this side closed it)."""


class LinkTimeout(LinkClosed):
    """No complete frame from the peer within the liveness timeout."""


class Refused(PeerlinkError):
    """This node refused the peer (a Refuse was sent to it); carries the reason."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


# What ended a session, as (log event, level); the first matching class wins.
_SESSION_ENDS: Final[tuple[tuple[type[BaseException], str, str], ...]] = (
    (Refused, "peer_refused_by_us", "warning"),
    (PeerRefused, "refused_by_peer", "warning"),
    (PeerAuthError, "auth_failed", "warning"),
    (Fenced, "batch_fenced", "warning"),
    (PeerProtocolError, "protocol_error", "error"),
    (LinkTimeout, "link_timeout", "warning"),
    (JournalGap, "needs_resync", "error"),
    (BlockstoreError, "journal_error", "error"),
)


def session_ended(logger: Any, exc: BaseException) -> bool:
    """Log why a session ended; return False for an exception that is not a link's
    ordinary fate (the caller re-raises it)."""
    for cls, event, level in _SESSION_ENDS:
        if isinstance(exc, cls):
            reason = exc.reason if isinstance(exc, (Refused, PeerRefused)) else str(exc)
            getattr(logger, level)(event, reason=reason)
            return True
    if isinstance(exc, (LinkClosed, OSError)):
        logger.info("link_down", reason=str(exc) or type(exc).__name__)
        return True
    return False


class Link(asyncio.Protocol):
    """One peerlink connection: frames in and out, with backpressure."""

    def __init__(self, *, max_queued: int = DEFAULT_MAX_QUEUED,
                 gate: AdmissionGate | None = None,
                 handshake_timeout: float | None = None) -> None:
        self.decoder = FrameDecoder(PREAUTH_MAX_BODY, compressed=False)
        self.transport: asyncio.Transport | None = None
        self.peername = "?"
        self.peer_host = "?"
        self.max_queued = max_queued
        self.is_authenticated = False
        self.gate = gate
        self._gated = False
        self.handshake_timeout = handshake_timeout
        # The group a connection handed over by a node's front is for (front.py): the
        # receiving group's own name, never the peer's word; both proofs cover it.
        self.realm = ""
        self._deadline: asyncio.TimerHandle | None = None
        self._queue: collections.deque[tuple[Message | asyncio.Future[Message], int]] = \
            collections.deque()
        self._queued_bytes = 0
        self._reading_paused = False
        self._wakeup: asyncio.Event = asyncio.Event()
        self._writing_allowed = asyncio.Event()
        self._writing_allowed.set()
        self._error: PeerlinkError | None = None
        self._lingering = False  # close() is flushing a last word (a Refuse)
        self.connected = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.last_frame = time.monotonic()
        self.bytes_in = 0
        self.bytes_out = 0
        # send_from_thread (module docstring): the write lock, this link's own duplicate
        # of the socket's descriptor (plaintext, once authenticated; closed with the
        # link: a stranger's connection never holds a second descriptor), what a
        # thread could not write itself and the loop must write first, and the loop.
        self._wlock = threading.RLock()  # reentrant: a write error may fail the link
        self._fd: int | None = None
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peername = format_addr(str(peer[0]), int(peer[1]))
            self.peer_host = str(peer[0])
        self.last_frame = time.monotonic()
        if self.gate is not None and not self.is_authenticated:
            why = self.gate.enter(self, self.peer_host)
            if why is not None:
                log.warning("peer_dropped", peer_addr=self.peername, reason=why)
                self._fail(LinkClosed(f"connection refused: {why}"))
                return
            self._gated = True
        if self.handshake_timeout is not None and not self.is_authenticated:
            self._deadline = asyncio.get_running_loop().call_later(
                self.handshake_timeout, self._handshake_expired)
        if not self.connected.done():
            self.connected.set_result(None)

    def _handshake_expired(self) -> None:
        if not self.is_authenticated:
            self._fail(LinkTimeout(f"the peer did not authenticate within "
                                   f"{self.handshake_timeout:g} s of connecting"))

    def authenticated(self) -> None:
        """The session checked the peer's proof: raise the limits for this link."""
        if self.is_authenticated:
            return
        self.is_authenticated = True
        self.decoder.allow(DEFAULT_MAX_BODY, compressed=True)
        transport = self.transport
        if (transport is not None and self._error is None and not transport.is_closing()
                and transport.get_extra_info("ssl_object") is None):
            sock = transport.get_extra_info("socket")
            with contextlib.suppress(OSError, ValueError, AttributeError), self._wlock:
                self._fd = os.dup(sock.fileno())  # for send_from_thread (plaintext only)
        self._leave_gate()
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._pump()

    def _leave_gate(self) -> None:
        if self._gated and self.gate is not None:
            self._gated = False
            self.gate.leave(self, self.peer_host)

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        self.bytes_in += len(data)
        self.decoder.feed(data)
        self._pump()

    def _pump(self) -> None:
        """Decode what is buffered into the queue; pause reading when it is full (before
        authentication: as soon as one message waits)."""
        if self._error is not None:
            return
        try:
            while self.is_authenticated or not self._queue:
                raw = self.decoder.next_raw()
                if raw is NEED_DATA:
                    break
                self.last_frame = time.monotonic()
                if self.is_authenticated and raw.size > OFFLOAD_BYTES:
                    fut = asyncio.get_running_loop().run_in_executor(_pool(), _offload, raw)
                    fut.add_done_callback(_retrieve)
                    self._queue.append((fut, raw.size))
                    self._queued_bytes += raw.size
                    continue
                msg = decode(self.decoder.unpack(raw))
                if isinstance(msg, Ping) and self.is_authenticated:
                    with contextlib.suppress(LinkClosed):
                        self.send(Pong(msg.t))
                    continue
                self._queue.append((msg, raw.size))
                self._queued_bytes += raw.size
        except PeerProtocolError as e:
            self._fail(e)
            return
        if self._queue:
            self._wakeup.set()
        full = (self._queued_bytes > self.max_queued if self.is_authenticated
                else bool(self._queue))
        if full and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._close_fd()
        self._leave_gate()
        if self._deadline is not None:
            self._deadline.cancel()
        if self._error is None:
            why = f"connection lost ({exc})" if exc else "connection closed by peer"
            self._error = LinkClosed(why)
        self._wakeup.set()
        self._writing_allowed.set()  # writers wake up and find the link closed
        if not self.connected.done():
            self.connected.set_exception(self._error)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._writing_allowed.clear()

    def resume_writing(self) -> None:
        self._writing_allowed.set()

    # -- the API used by sender and receiver -------------------------------------------------

    @property
    def error(self) -> PeerlinkError | None:
        return self._error

    def _fail(self, err: PeerlinkError) -> None:
        """Close at once (abort: buffered output is dropped) and remember why.  Messages
        not yet taken by ``recv()`` are dropped too: after an error nothing more from
        this connection is handed out."""
        if self._error is None:
            self._error = err
        self._close_fd()
        self._queue.clear()
        self._queued_bytes = 0
        self._wakeup.set()
        self._writing_allowed.set()
        self._leave_gate()
        if self.transport is not None:
            self.transport.abort()
        else:
            # Never connected (a TLS handshake still running, or failed: asyncio then calls
            # neither connection_made nor connection_lost): settle the waiters here.
            if not self.connected.done():
                self.connected.set_exception(self._error)
            if not self.closed.done():
                self.closed.set_result(None)

    def abort(self, err: PeerlinkError) -> None:
        """Drop the connection now, for ``err`` (which ``recv()`` will raise)."""
        self._fail(err)

    def release(self, err: PeerlinkError) -> None:
        """End of a session: abort, unless close() is already flushing a last word."""
        if not self._lingering:
            self.abort(err)

    def close(self, linger: float = 5.0) -> None:
        """Close after flushing what is buffered (a Refuse must reach the peer), but
        abort after ``linger`` seconds if the peer does not read it."""
        with self._wlock:  # no thread writes after this
            if self._error is None:
                self._error = LinkClosed("connection closed by this node")
        self._wakeup.set()
        if self.transport is not None and not self._lingering:
            self._lingering = True
            transport = self.transport
            transport.close()
            asyncio.get_running_loop().call_later(linger, transport.abort)

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error
        if self.transport is None or self.transport.is_closing():
            raise LinkClosed("connection is closing")

    def send(self, msg: Message, compress: bool | int = False) -> None:
        """Frame and queue one message (no waiting; call drain() for backpressure)."""
        self.send_frame(encode_frame(msg.encode(), compress))

    def send_frame(self, bufs: list[bytes | memoryview]) -> None:
        """Queue the buffers of one frame, as ``encode_frame`` returned them."""
        self._check_open()
        assert self.transport is not None
        with self._wlock:
            if self._pending:
                self._write_pending()
            self.transport.writelines(bufs)
            self.bytes_out += sum(len(b) for b in bufs)

    def send_from_thread(self, msg: Message) -> None:
        """Send one small message from a thread other than the loop's (module
        docstring): written at once when the link is plaintext and the transport holds
        nothing, else handed to the loop.  Dropped silently once the link failed or is
        closing, as a ``send`` caught for ``LinkClosed`` would be."""
        data = b"".join(encode_frame(msg.encode(), False))
        with self._wlock:
            transport = self.transport
            if self._error is not None or transport is None:
                return
            if self._fd is not None and not self._pending and (
                    transport.get_write_buffer_size() == 0):
                try:
                    n = os.write(self._fd, data)
                except OSError:  # EAGAIN, or a broken socket the loop will notice
                    n = 0
                self.bytes_out += n
                data = data[n:]
                if not data:
                    return
            self._pending.append(data)
        self._loop.call_soon_threadsafe(self._flush_pending)

    def _flush_pending(self) -> None:
        with self._wlock:
            if self._pending:
                self._write_pending()

    def _write_pending(self) -> None:
        """Hand what threads could not write to the transport (loop, lock held)."""
        data, self._pending = self._pending, []
        if self._error is not None or self.transport is None or self.transport.is_closing():
            return
        self.transport.writelines(data)
        self.bytes_out += sum(len(b) for b in data)

    def _close_fd(self) -> None:
        with self._wlock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its low-water mark."""
        await self._writing_allowed.wait()
        self._check_open()

    async def recv(self) -> Message:
        """The next message from the peer; raises the error that closed the link."""
        while not self._queue:
            if self._error is not None:
                raise self._error
            self._wakeup.clear()
            await self._wakeup.wait()
        item, n = self._queue[0]
        if isinstance(item, asyncio.Future):
            try:
                msg = await asyncio.shield(item)
            except PeerProtocolError as e:
                self._fail(e)
                raise
            if self._error is not None:  # failed meanwhile: nothing more is handed out
                raise self._error
        else:
            msg = item
        self._queue.popleft()
        self._queued_bytes -= n
        if self._reading_paused and (self._queued_bytes <= self.max_queued // 2
                                     if self.is_authenticated else not self._queue):
            self._reading_paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
            self._pump()  # what was buffered while paused
        return msg

    async def recv_within(self, timeout: float, what: str) -> Message:
        """``recv()`` bounded in time (the handshake): LinkTimeout names ``what``."""
        try:
            return await asyncio.wait_for(self.recv(), timeout)
        except TimeoutError:
            err = LinkTimeout(f"no {what} from the peer within {timeout:g} s")
            self.abort(err)
            raise err from None

    async def watchdog(self, timeout: float) -> None:
        """Abort the link when no complete frame arrived for ``timeout`` seconds."""
        while self._error is None:
            idle = time.monotonic() - self.last_frame
            if idle >= timeout:
                self.abort(LinkTimeout(f"no frame from the peer for {idle:.1f} s "
                                       f"(liveness timeout {timeout:g} s)"))
                return
            await asyncio.sleep(min(timeout - idle, timeout / 4) + 0.01)

    async def wait_closed(self) -> None:
        with contextlib.suppress(Exception):
            await self.closed


def _retrieve(fut: asyncio.Future[Message]) -> None:
    """A decode whose link failed meanwhile is never awaited: consume its outcome."""
    if not fut.cancelled():
        fut.exception()


def is_compressed(bufs: list[bytes | memoryview]) -> bool:
    """Did ``encode_frame`` send this frame's body compressed?"""
    return bool(bufs[0][5] & FLAG_ZSTD)


def format_addr(host: str, port: int) -> str:
    """HOST:PORT, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_addr(text: str, what: str) -> tuple[str, int]:
    """Parse HOST:PORT (``[v6]:port`` for IPv6); ValueError names ``what``."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what}: expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)
