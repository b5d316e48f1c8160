"""The front of a node's shared peerlink port (peerlink/front.py) on real sockets, without
a lab: what it hands over arrives at the group's end as the connected socket, with the
bytes after the preamble untouched; strangers, unknown groups, a group that does not
read and connections past the caps are closed and counted, and none of them holds up
the handover to another group."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

from peerlink.front import Front, HandoffReceiver, handoff_path, preamble


class Running:
    """A Front on 127.0.0.1 (any port) in this loop, and its bound address."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.stop = asyncio.Event()
        self.bound: asyncio.Future[tuple[str, int]] = (
            asyncio.get_running_loop().create_future())
        self.task = asyncio.get_running_loop().create_task(
            front.serve("127.0.0.1", 0, self.stop, self.bound.set_result))

    async def connect(self, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = await self.bound
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(data)
        await writer.drain()
        return reader, writer

    async def close(self) -> None:
        self.stop.set()
        await self.task


@contextlib.asynccontextmanager
async def front_in(tmp_path: Path, **kw: float) -> AsyncIterator[Running]:
    """A Front routing g1 and g2 to their handoff sockets under ``tmp_path``."""
    r = Running(Front({"g1": handoff_path(tmp_path / "g1"),
                       "g2": handoff_path(tmp_path / "g2")}, **kw))  # type: ignore[arg-type]
    try:
        yield r
    finally:
        await r.close()


async def closed_within(reader: asyncio.StreamReader, timeout: float) -> bool:
    """The front closed the connection within ``timeout`` seconds."""
    try:
        return await asyncio.wait_for(reader.read(1), timeout) == b""
    except ConnectionResetError:
        return True


async def handed(queue: asyncio.Queue[socket.socket]) -> socket.socket:
    return await asyncio.wait_for(queue.get(), 5)


def test_a_routed_connection_arrives_whole_at_its_group(tmp_path: Path) -> None:
    asyncio.run(routed(tmp_path))


async def routed(tmp_path: Path) -> None:
    got: asyncio.Queue[socket.socket] = asyncio.Queue()
    rx = HandoffReceiver(handoff_path(tmp_path / "g1"), got.put_nowait)
    rx.start()
    try:
        async with front_in(tmp_path) as front:
            # the preamble and the peer's first bytes in one segment: the front must not
            # read past the newline, so the group sees "NGPL..." as the first bytes
            reader, writer = await front.connect(preamble("g1") + b"NGPL hello")
            sock = await handed(got)
            loop = asyncio.get_running_loop()
            assert await asyncio.wait_for(loop.sock_recv(sock, 100), 5) == b"NGPL hello"
            await loop.sock_sendall(sock, b"from g1")
            assert await reader.readexactly(7) == b"from g1"
            sock.close()
            writer.close()
            assert front.front.counts["handed"] == 1
    finally:
        rx.close()


def test_strangers_are_closed_and_counted(tmp_path: Path) -> None:
    asyncio.run(strangers(tmp_path))


async def strangers(tmp_path: Path) -> None:
    async with front_in(tmp_path, deadline=0.5) as front:
        for data, why in ((b"GET / HTTP/1.0\r\n\r\n", "garbage"),
                          (b"NBDGW-GROUP nope\n", "unknown_group"),
                          (b"", "silent"),
                          (preamble("g2"), "group_unavailable")):  # nobody reads g2's
            reader, writer = await front.connect(data)
            assert await closed_within(reader, 3), why
            writer.close()
            assert front.front.counts[why] == 1, (why, front.front.counts)
        assert front.front.counts["handed"] == 0


def test_a_group_that_does_not_read_holds_up_nobody(tmp_path: Path) -> None:
    asyncio.run(stalled_group(tmp_path))


async def stalled_group(tmp_path: Path) -> None:
    """g1's end is bound but never read (a stopped process): once its queue is full the
    front drops g1's connections at once, and g2's are still handed over."""
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = handoff_path(tmp_path / "g1")
    path.parent.mkdir(parents=True)
    stalled.bind(str(path))
    got: asyncio.Queue[socket.socket] = asyncio.Queue()
    rx = HandoffReceiver(handoff_path(tmp_path / "g2"), got.put_nowait)
    rx.start()
    try:
        async with front_in(tmp_path, per_source=4) as front:
            qlen = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
            for _ in range(qlen + 3):
                reader, _writer = await front.connect(preamble("g1"))
                await asyncio.sleep(0.01)
            assert await closed_within(reader, 3)  # the last: dropped, not queued
            assert front.front.counts["group_busy"] >= 1, front.front.counts
            _, w2 = await front.connect(preamble("g2"))
            (await handed(got)).close()
            w2.close()
    finally:
        rx.close()
        stalled.close()


def test_connections_past_the_cap_per_source_are_closed(tmp_path: Path) -> None:
    asyncio.run(over_cap(tmp_path))


async def over_cap(tmp_path: Path) -> None:
    async with front_in(tmp_path, per_source=2) as front:
        conns = [await front.connect(b"") for _ in range(2)]
        await asyncio.sleep(0.2)  # both accepted and waiting for their preamble
        reader, writer = await front.connect(b"")
        assert await closed_within(reader, 2)
        assert front.front.counts["over_capacity"] == 1
        for _, w in conns:
            w.close()
        writer.close()
