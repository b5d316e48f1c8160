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
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any, Final, cast

import structlog

from blockstore.errors import BlockstoreError, JournalGap

from .errors import PeerAuthError, PeerlinkError, PeerProtocolError, PeerRefused
from .frames import FLAG_ZSTD, NEED_DATA, FrameDecoder, encode_frame
from .messages import Message, Ping, Pong, decode

log = structlog.get_logger(component="peerlink")

DEFAULT_MAX_QUEUED: Final = 96 << 20
WRITE_HIGH: Final = 4 << 20  # transport buffer above which writers wait in drain()
WRITE_LOW: Final = 1 << 20


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

    def __init__(self, *, max_queued: int = DEFAULT_MAX_QUEUED) -> None:
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.peername = "?"
        self.max_queued = max_queued
        self._queue: collections.deque[tuple[Message, int]] = collections.deque()
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

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peername = f"{peer[0]}:{peer[1]}"
        self.last_frame = time.monotonic()
        if not self.connected.done():
            self.connected.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        self.bytes_in += len(data)
        try:
            self.decoder.feed(data)
            while True:
                body = self.decoder.next_frame()
                if body is NEED_DATA:
                    break
                self.last_frame = time.monotonic()
                msg = decode(body)
                if isinstance(msg, Ping):
                    with contextlib.suppress(LinkClosed):
                        self.send(Pong(msg.t))
                    continue
                self._queue.append((msg, len(body)))
                self._queued_bytes += len(body)
        except PeerProtocolError as e:
            self._fail(e)
            return
        if self._queue:
            self._wakeup.set()
        if self._queued_bytes > self.max_queued and not self._reading_paused:
            self._reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
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
        self._queue.clear()
        self._queued_bytes = 0
        self._wakeup.set()
        self._writing_allowed.set()
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
        self.transport.writelines(bufs)
        self.bytes_out += sum(len(b) for b in bufs)

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
        msg, n = self._queue.popleft()
        self._queued_bytes -= n
        if self._reading_paused and self._queued_bytes <= self.max_queued // 2:
            self._reading_paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
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
