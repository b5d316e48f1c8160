"""The etcd shell's keepalives (gateway/etcdclient.py ``EtcdShell``) against stand-in
endpoints on loopback: one that answers at once as etcd's JSON gateway does, one that
takes the connection and never answers (a leaderless member, or one whose host lost
power behind a kernel that still completes handshakes), one that refuses.  A keepalive
held by one member must be answered by another within the hedge delay, not after the
per-endpoint timeout; a fast member must get one request per keepalive and no more."""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from gateway.etcdclient import EtcdClient, EtcdShell
from gateway.etcdcore import EtcdReply

# The hedge delay (0.2 s) plus room for a loaded machine; well below the 1 s a request
# waits for a member that does not answer (REQUEST_TIMEOUT).
HEDGED_WITHIN = 0.6


class Member(ThreadingHTTPServer):
    """etcd's JSON gateway, as far as a keepalive goes: ``answer`` is the body."""

    daemon_threads = True

    def __init__(self, answer: dict[str, Any]) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.answer = answer
        self.hits = 0
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: Member

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.hits += 1
        body = json.dumps(self.server.answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


RENEWED = {"result": {"header": {}, "ID": "7", "TTL": "3"}}


@pytest.fixture
def members() -> Iterator[list[Member]]:
    made: list[Member] = []
    yield made
    for m in made:
        m.shutdown()
        m.server_close()


@pytest.fixture
def silent() -> Iterator[str]:
    """A member that takes connections and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


def refused() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def member(members: list[Member], answer: dict[str, Any] = RENEWED) -> str:
    members.append(Member(answer))
    return members[-1].url


def keepalive(rid: int) -> dict[str, Any]:
    return {"req_id": rid, "op": "keepalive", "lease": 7}


def answer(answers: queue.Queue[EtcdReply], rid: int, limit: float = 5.0) -> EtcdReply:
    while True:
        r = answers.get(timeout=limit)
        if r.req_id == rid:
            return r


def test_a_keepalive_held_by_one_member_is_answered_by_another_within_the_hedge_delay(
        members: list[Member], silent: str) -> None:
    answers: queue.Queue[EtcdReply] = queue.Queue()
    shell = EtcdShell(EtcdClient([silent, member(members)]), answers.put)
    try:
        t0 = time.monotonic()
        shell.submit(keepalive(1))
        r = answer(answers, 1)
        took = time.monotonic() - t0
        assert r.ok and r.ttl == 3, r
        assert took < HEDGED_WITHIN, f"answered after {took:.3f} s"
        assert members[0].hits == 1
        # The member that answered is asked first from now on: no hedge, one request.
        t0 = time.monotonic()
        shell.submit(keepalive(2))
        assert answer(answers, 2).ok
        assert time.monotonic() - t0 < 0.15
        assert members[0].hits == 2 and shell.count == 3
    finally:
        shell.stop()


def test_a_member_that_answers_fast_gets_one_request_per_keepalive(
        members: list[Member]) -> None:
    """The steady state: hedging adds no request (bench/fleet counts them)."""
    answers: queue.Queue[EtcdReply] = queue.Queue()
    shell = EtcdShell(EtcdClient([member(members), member(members), member(members)]),
                      answers.put)
    try:
        for rid in range(1, 11):
            shell.submit(keepalive(rid))
            assert answer(answers, rid).ttl == 3
        assert [m.hits for m in members] == [10, 0, 0]
        assert shell.count == 10
    finally:
        shell.stop()


def test_a_refused_member_is_passed_over_at_once(members: list[Member]) -> None:
    answers: queue.Queue[EtcdReply] = queue.Queue()
    shell = EtcdShell(EtcdClient([refused(), member(members)]), answers.put)
    try:
        t0 = time.monotonic()
        shell.submit(keepalive(1))
        assert answer(answers, 1).ttl == 3
        assert time.monotonic() - t0 < 0.15  # not a hedge delay
    finally:
        shell.stop()


def test_a_member_that_cannot_renew_says_nothing_of_the_lease(
        members: list[Member]) -> None:
    """An error in the stream (no leader, a timeout) is that member's failure: the next
    one is asked, and the lease is not taken for expired."""
    answers: queue.Queue[EtcdReply] = queue.Queue()
    noleader = member(members, {"error": {"grpc_code": 14, "message": "no leader"}})
    shell = EtcdShell(EtcdClient([noleader, member(members)]), answers.put)
    try:
        shell.submit(keepalive(1))
        r = answer(answers, 1)
        assert r.ok and r.ttl == 3, r
    finally:
        shell.stop()


def test_a_keepalive_stuck_on_a_member_does_not_hold_back_the_next(
        members: list[Member], silent: str) -> None:
    """The newer keepalive goes to a free member at once, not after the stuck one."""
    answers: queue.Queue[EtcdReply] = queue.Queue()
    shell = EtcdShell(EtcdClient([silent, member(members)]), answers.put)
    try:
        shell.submit(keepalive(1))
        time.sleep(0.05)
        t0 = time.monotonic()
        shell.submit(keepalive(2))
        r = answer(answers, 2)
        assert r.ok and r.ttl == 3
        assert time.monotonic() - t0 < 0.15, "waited for the stuck one"
        assert not answer(answers, 1).ok  # superseded: it went nowhere else
    finally:
        shell.stop()


def test_no_member_answers_every_keepalive_is_answered_and_stop_joins(silent: str) -> None:
    answers: queue.Queue[EtcdReply] = queue.Queue()
    shell = EtcdShell(EtcdClient([silent, refused()]), answers.put)
    shell.submit(keepalive(1))
    r = answer(answers, 1)
    assert not r.ok and "no etcd endpoint answered" in r.error
    shell.submit(keepalive(2))
    time.sleep(0.1)
    t0 = time.monotonic()
    shell.stop()
    assert time.monotonic() - t0 < 2.0
    assert not any(t.is_alive() for t in shell.threads)
    assert not answer(answers, 2).ok


def test_a_grant_queued_behind_a_keepalive_is_sent_at_once_and_never_hedged(
        members: list[Member]) -> None:
    """A grant goes to one member at a time (two would grant two leases)."""
    answers: queue.Queue[EtcdReply] = queue.Queue()
    shell = EtcdShell(EtcdClient([member(members), member(members)]), answers.put,
                      hedge=0.0)
    try:
        t0 = time.monotonic()
        shell.submit(keepalive(1))
        shell.submit({"req_id": 2, "op": "grant", "ttl": 3})
        assert answer(answers, 2).ok
        assert answer(answers, 1).ok
        assert time.monotonic() - t0 < 0.5
        deadline = time.monotonic() + 2
        while members[0].hits + members[1].hits < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        # The keepalive (hedged at once) to both, the grant to one.
        assert members[0].hits + members[1].hits == shell.count == 3
    finally:
        shell.stop()
