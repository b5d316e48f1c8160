"""Link.send_from_thread: a worker thread's frames (the receiver's Acks) and the loop's
share one connection without interleaving, and none overtakes one sent before it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from peerlink.link import Link, LinkClosed
from peerlink.messages import Ack, Message, VerifyResult

LOOPS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {
    "asyncio": asyncio.run, "uvloop": uvloop.run}


async def _pair() -> tuple[asyncio.AbstractServer, Link, Link]:
    loop = asyncio.get_running_loop()
    accepted: list[Link] = []

    def made() -> Link:
        accepted.append(Link())
        return accepted[-1]

    server = await loop.create_server(made, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, client = await loop.create_connection(Link, "127.0.0.1", port)
    while not accepted:
        await asyncio.sleep(0.001)
    await accepted[0].connected
    for link in (accepted[0], client):
        link.authenticated()
    return server, accepted[0], client


async def _recv(link: Link, n: int) -> list[Message]:
    return [await asyncio.wait_for(link.recv(), 10) for _ in range(n)]


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_frames_of_a_thread_and_of_the_loop_do_not_interleave(loop: str) -> None:
    n = 3000

    async def main() -> None:
        server, side, client = await _pair()
        assert side._fd is not None  # plaintext: the thread writes itself when it can

        def acks() -> None:
            for i in range(1, n + 1):
                side.send_from_thread(Ack("v", i))

        thread = threading.Thread(target=acks)
        thread.start()
        for i in range(1, n + 1):
            side.send(VerifyResult("v", i, i, (i,)))
            if i % 7 == 0:
                await asyncio.sleep(0)
        got = await _recv(client, 2 * n)
        thread.join()
        acks = [m.durable_seq for m in got if isinstance(m, Ack)]
        results = [m.token for m in got if isinstance(m, VerifyResult)]
        assert acks == list(range(1, n + 1))
        assert results == list(range(1, n + 1))
        side.abort(LinkClosed("done"))
        client.abort(LinkClosed("done"))
        server.close()

    LOOPS[loop](main())


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_thread_frame_waits_behind_the_transports_backlog(loop: str) -> None:
    """With frames queued in the transport (the peer reads nothing), a thread's frame is
    handed to the loop, after them and before anything the loop sends later."""

    async def main() -> None:
        server, side, client = await _pair()
        assert client.transport is not None and side.transport is not None
        client.transport.pause_reading()
        big = tuple(range(4096))
        sent = 0
        while side.transport.get_write_buffer_size() == 0:
            sent += 1
            side.send(VerifyResult("v", sent, 0, big))
        await asyncio.to_thread(side.send_from_thread, Ack("v", 7))
        side.send(VerifyResult("v", sent + 1, 0, ()))
        client.transport.resume_reading()
        got = await _recv(client, sent + 2)
        assert [type(m).__name__ for m in got[-3:]] == ["VerifyResult", "Ack", "VerifyResult"]
        assert [m.token for m in got if isinstance(m, VerifyResult)] == list(
            range(1, sent + 2))
        side.abort(LinkClosed("done"))
        client.abort(LinkClosed("done"))
        server.close()

    LOOPS[loop](main())


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_thread_frame_after_the_link_failed_is_dropped(loop: str) -> None:
    async def main() -> None:
        server, side, client = await _pair()
        side.abort(LinkClosed("gone"))
        await asyncio.to_thread(side.send_from_thread, Ack("v", 1))  # no error, no write
        with pytest.raises(LinkClosed):
            await asyncio.wait_for(client.recv(), 10)
        server.close()

    LOOPS[loop](main())
