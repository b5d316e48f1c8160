"""A fault-injecting TCP proxy for tests (asyncpg's ``TCPFuzzingProxy``, peerlink-aware).

    sender ──► FaultProxy(listen) ──► receiver(target)

It forwards bytes both ways and, on request: cuts every connection (``cut()``), stops
forwarding for a while (``stall()``; bytes wait in the proxy and TCP pushes back),
limits the rate per direction (``throttle()``), delays every chunk by a fixed time
(``set_delay()``: an added round trip, pipelined, as a long link would; this kernel has
no netem), and corrupts one byte of the next frame
body of at least ``min_body`` bytes going one way (``corrupt_next_body()``).  It follows
the peerlink frame layout (16-byte header with the body length at offset 8) only to aim
the flip inside a body, so a test can expect exactly a frame checksum error.

``ThreadedProxy`` runs one in a background thread with its own event loop, for tests that
drive real processes from synchronous code; every control is thread-safe.
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar

from peerlink.frames import HEADER_SIZE

Direction = Literal["up", "down"]  # up: client (sender) to target (receiver)
CHUNK: Final = 64 * 1024
_T = TypeVar("_T")


@dataclass
class _Arm:
    """A pending corruption of one direction, shared by its connections."""

    min_body: int | None = None  # flip in the next body of at least this many bytes
    flipped: int = 0


@dataclass
class _Aim:
    """Where the frame stream of one direction of one connection stands."""

    arm: _Arm
    header: bytearray = field(default_factory=bytearray)
    body_left: int = 0  # bytes of the current body still to pass
    flip_in: int | None = None  # body bytes to pass before the one to flip

    def feed(self, data: bytearray) -> None:
        """Walk ``data`` through the frame layout, flipping one byte when armed."""
        i = 0
        while i < len(data):
            if self.body_left:
                n = min(self.body_left, len(data) - i)
                if self.flip_in is not None:
                    if self.flip_in < n:
                        data[i + self.flip_in] ^= 0xFF
                        self.flip_in = None
                        self.arm.flipped += 1
                    else:
                        self.flip_in -= n
                self.body_left -= n
                i += n
                continue
            need = HEADER_SIZE - len(self.header)
            take = bytes(data[i:i + need])
            self.header += take
            i += len(take)
            if len(self.header) == HEADER_SIZE:
                body_len = struct.unpack_from("<I", self.header, 8)[0]
                self.header.clear()
                self.body_left = body_len
                if self.arm.min_body is not None and body_len >= self.arm.min_body:
                    self.arm.min_body, self.flip_in = None, body_len // 2


@dataclass(eq=False)  # hashed by identity: kept in a set
class _Pair:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    aim: dict[Direction, _Aim]
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class FaultProxy:
    """Forward ``listen`` to ``target`` with faults on demand (run on one event loop)."""

    def __init__(self, target: tuple[str, int], listen: tuple[str, int] = ("127.0.0.1", 0)
                 ) -> None:
        self.target = target
        self.listen = listen
        self.server: asyncio.AbstractServer | None = None
        self.pairs: set[_Pair] = set()
        self.unstalled = asyncio.Event()
        self.unstalled.set()
        self.rate: dict[Direction, float | None] = {"up": None, "down": None}
        self.delay: dict[Direction, float] = {"up": 0.0, "down": 0.0}
        self.arm: dict[Direction, _Arm] = {"up": _Arm(), "down": _Arm()}
        self.connections = 0
        self.bytes: dict[Direction, int] = {"up": 0, "down": 0}
        self.errors: list[BaseException] = []

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._accept, *self.listen)
        host, port = self.server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        await self.cut()

    async def cut(self) -> int:
        """Reset every connection (both sides see it at once); return how many."""
        pairs = list(self.pairs)
        for p in pairs:
            for w in (p.client, p.server):
                w.transport.abort()
        for p in pairs:
            await asyncio.gather(*p.tasks, return_exceptions=True)
        return len(pairs)

    def set_stalled(self, stalled: bool) -> None:
        if stalled:
            self.unstalled.clear()
        else:
            self.unstalled.set()

    async def stall(self, seconds: float) -> None:
        """Forward nothing either way for ``seconds``."""
        self.set_stalled(True)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.set_stalled(False)

    def throttle(self, bytes_per_second: float | None, direction: Direction | None = None
                 ) -> None:
        """Limit the rate of one direction (both when None); None lifts the limit."""
        for d in ("up", "down") if direction is None else (direction,):
            self.rate[d] = bytes_per_second

    def set_delay(self, seconds: float, direction: Direction | None = None) -> None:
        """Deliver every chunk of one direction (both when None) ``seconds`` after it was
        read, without slowing the stream otherwise (0: at once)."""
        for d in ("up", "down") if direction is None else (direction,):
            self.delay[d] = seconds

    def corrupt_next_body(self, direction: Direction = "up", min_body: int = 1024) -> None:
        """Flip the middle byte of the next frame body of at least ``min_body`` bytes."""
        self.arm[direction].min_body = min_body

    def flipped(self, direction: Direction = "up") -> int:
        return self.arm[direction].flipped

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        # Each connection's streams start at a frame boundary.
        pair = _Pair(writer, up_writer, {"up": _Aim(self.arm["up"]),
                                         "down": _Aim(self.arm["down"])})
        self.pairs.add(pair)
        loop = asyncio.get_running_loop()
        pair.tasks = [loop.create_task(self._pipe(pair, reader, up_writer, "up")),
                      loop.create_task(self._pipe(pair, up_reader, writer, "down"))]
        await asyncio.gather(*pair.tasks, return_exceptions=True)
        self.pairs.discard(pair)

    async def _pipe(self, pair: _Pair, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, d: Direction) -> None:
        aim = pair.aim[d]
        loop = asyncio.get_running_loop()
        delayed: asyncio.Queue[tuple[float, bytearray] | None] = asyncio.Queue()
        courier: asyncio.Task[None] | None = None
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                await self.unstalled.wait()
                buf = bytearray(data)
                aim.feed(buf)
                rate = self.rate[d]
                if rate:
                    await asyncio.sleep(len(buf) / rate)
                if self.delay[d] > 0 or courier is not None:
                    if courier is None:
                        courier = loop.create_task(self._courier(pair, delayed, writer, d))
                    delayed.put_nowait((loop.time() + self.delay[d], buf))
                    continue
                writer.write(buf)
                self.bytes[d] += len(buf)
                await writer.drain()
            if courier is not None:
                delayed.put_nowait(None)
                await courier
        except (ConnectionError, OSError):
            pass
        finally:
            if courier is not None:
                courier.cancel()
            # One side gone: take the other down too, as a real network path would.
            pair.client.transport.abort()
            pair.server.transport.abort()

    async def _courier(self, pair: _Pair,
                       delayed: asyncio.Queue[tuple[float, bytearray] | None],
                       writer: asyncio.StreamWriter, d: Direction) -> None:
        """Deliver delayed chunks in order, each at its time."""
        loop = asyncio.get_running_loop()
        try:
            while (item := await delayed.get()) is not None:
                at, buf = item
                if at > loop.time():
                    await asyncio.sleep(at - loop.time())
                writer.write(buf)
                self.bytes[d] += len(buf)
                await writer.drain()
        except (ConnectionError, OSError):
            pair.client.transport.abort()
            pair.server.transport.abort()


class ThreadedProxy:
    """A FaultProxy on its own event loop in a daemon thread (for synchronous tests)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._on_loop_error)
        self.thread = threading.Thread(target=self.loop.run_forever, name="fault-proxy",
                                       daemon=True)
        self.thread.start()
        self.proxy = FaultProxy(target)
        self.address = self._call(self._make_and_start())

    async def _make_and_start(self) -> tuple[str, int]:
        return await self.proxy.start()

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, ctx: dict[str, Any]) -> None:
        exc = ctx.get("exception")
        self.proxy.errors.append(exc if exc is not None else RuntimeError(ctx.get("message")))

    def _call(self, coro: Coroutine[Any, Any, _T], timeout: float = 30) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _sync(self, fn: Any, *args: Any) -> Any:
        async def run() -> Any:
            return fn(*args)
        return self._call(run())

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def connections(self) -> int:
        return int(self._sync(lambda: self.proxy.connections))

    def cut(self) -> int:
        return self._call(self.proxy.cut())

    def stall(self, seconds: float) -> None:
        self._sync(self.proxy.set_stalled, True)
        time.sleep(seconds)
        self._sync(self.proxy.set_stalled, False)

    def throttle(self, bytes_per_second: float | None) -> None:
        self._sync(self.proxy.throttle, bytes_per_second)

    def set_delay(self, seconds: float) -> None:
        """Each direction delayed by ``seconds``: a round trip longer by twice that."""
        self._sync(self.proxy.set_delay, seconds)

    def set_stalled(self, stalled: bool) -> None:
        self._sync(self.proxy.set_stalled, stalled)

    def corrupt_next_body(self, min_body: int = 1024) -> None:
        self._sync(self.proxy.corrupt_next_body, "up", min_body)

    def flipped(self) -> int:
        return int(self._sync(self.proxy.flipped, "up"))

    def close(self) -> None:
        try:
            self._call(self.proxy.close(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    def __enter__(self) -> ThreadedProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
