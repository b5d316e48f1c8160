"""etcd v3 for the daemon: a client over etcd's JSON gateway (etcd3gw) that tries every
endpoint of the cluster in turn, and the shell that performs the etcd requests of the
etcd node core (gateway/etcdcore.py) off the daemon's main loop.

The client: etcd3gw (OpenStack's client of the JSON gateway, maintained, pinned in
pyproject.toml) does the HTTP, TLS and error mapping; this module builds the few
requests the core needs (lease grant and keepalive, one transaction with a range read of
the group's keys at its end) and turns the answers into the core's ``KV`` and
``EtcdReply``.  A request that fails to connect or times out on one endpoint is tried
on the next (a member that lost its peers answers nothing in time); the endpoint that
answered is tried first next time.  The environment is not trusted (no proxy, no
REQUESTS_CA_BUNDLE): the CA is ``coordinator.ca_file``, else the system's.  etcd's
64-bit integers arrive as JSON strings and its bytes as base64.

The shell: keepalives on threads of their own (a slow transaction never delays one;
when several are queued only the newest is sent, the others answered as superseded:
each is anchored at its own send time, so the newest is worth most), hedged across the
endpoints (``EtcdShell``), transactions in order on another.  Every request is answered
(``ok`` False with the error when etcd did not answer in time), posted to the daemon's
queue as an ``EtcdReply``.

The node's lease (``NodeLease``, the groups parent's): one lease per node for all its
groups, kept alive by the parent, which also reads every group's keys with one range
read every ``poll_interval``; it publishes both to each group's child in a file of the
group's run dir (``NODE_LEASE_FILE``, written whole and renamed over the old one), which
the child reads at its ticks (``read_node_lease``).  The file says until when, on the
host's monotonic clock, etcd cannot have expired the lease: a child whose parent is
frozen or dead gets no newer time and fences at that one by its own clock.  The file
carries the kernel's boot id: after a reboot its times mean nothing and it is ignored.
"""

from __future__ import annotations

import base64
import json
import math
import os
import queue
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import structlog
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import ConnectionFailedError, ConnectionTimeoutError, Etcd3Exception

from .etcdcore import (
    KV,
    Cmp,
    Delete,
    EtcdReply,
    LeaseKeeper,
    Put,
    Shared,
    Txn,
    group_prefix,
    groups_prefix,
)

log = structlog.get_logger(component="etcd")

REQUEST_TIMEOUT: Final = 1.0  # s per endpoint (below the core's REQUEST_LOST_AFTER)
HEDGE_AFTER: Final = 0.2  # s: a keepalive unanswered this long also goes to the others
SLOTS: Final = 2  # keepalives in flight to one endpoint at most (EtcdShell's workers)
NODE_LEASE_FILE: Final = "etcd-node-lease.json"  # in a group's run dir (NodeLease)
NODE_LEASE_ENV: Final = "NBDGW_NODE_LEASE"  # set by the groups parent for its children
KEEPER_TICK: Final = 0.05  # s between the node lease keeper's looks at what is due
NODE_LEASE_VERSION: Final = 1
TARGETS: Final = {"create": ("CREATE", "create_revision"), "mod": ("MOD", "mod_revision"),
                  "value": ("VALUE", "value")}


def system_cafile() -> str | None:
    path = ssl.get_default_verify_paths().cafile
    return path if path and os.path.exists(path) else None


class EtcdUnavailable(Exception):
    """No endpoint answered in time."""


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def unb64(text: str) -> str:
    return base64.b64decode(text).decode(errors="replace")


def prefix_end(prefix: str) -> str:
    """The range_end that makes a range read every key starting with ``prefix``."""
    raw = prefix.encode()
    return base64.b64encode(raw[:-1] + bytes([raw[-1] + 1])).decode()


@dataclass(frozen=True)
class Tls:
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


class EtcdClient:
    def __init__(self, endpoints: Sequence[str], tls: Tls = Tls(),
                 timeout: float = REQUEST_TIMEOUT) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoint")
        self.endpoints = list(endpoints)
        self.clients = []
        for url in endpoints:
            u = urlsplit(url)
            self.clients.append(Etcd3Client(
                host=u.hostname or "", port=u.port or 2379, protocol=u.scheme,
                ca_cert=str(tls.ca_file) if tls.ca_file else None,
                cert_cert=str(tls.cert_file) if tls.cert_file else None,
                cert_key=str(tls.key_file) if tls.key_file else None,
                timeout=timeout, api_path="/v3/"))  # etcd >= 3.4
            # Not the environment's: requests lets REQUESTS_CA_BUNDLE override the
            # session's CA (coordinator.ca_file was ignored where it is set), and etcd is
            # reached directly, never through HTTP(S)_PROXY.
            session = self.clients[-1].session
            session.trust_env = False
            if tls.ca_file is None:  # the system's CAs (OpenSSL's), not certifi's copy
                session.verify = system_cafile() or True
        self.current = 0
        self.lock = threading.Lock()

    def post_to(self, n: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to ``path`` on endpoint ``n`` only (raises as etcd3gw does)."""
        c = self.clients[n]
        out = c.post(c.get_url(path), json=body)
        return out if isinstance(out, dict) else {}

    def answered(self, n: int) -> None:
        """Endpoint ``n`` answered: it is tried first next time."""
        with self.lock:
            if n != self.current:
                log.info("etcd_endpoint", endpoint=self.endpoints[n])
            self.current = n

    def order(self) -> list[int]:
        """The endpoints in the order to try them: the one that answered last first."""
        with self.lock:
            start = self.current
        return [(start + i) % len(self.clients) for i in range(len(self.clients))]

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to ``path`` on the endpoint that answered last, else the next."""
        errors = []
        for n in self.order():
            try:
                out = self.post_to(n, path, body)
            except (ConnectionFailedError, ConnectionTimeoutError) as e:
                errors.append(f"{self.endpoints[n]}: {type(e).__name__}")
                continue
            self.answered(n)
            return out
        raise EtcdUnavailable("no etcd endpoint answered: " + "; ".join(errors))

    # -- the requests -------------------------------------------------------------------

    def grant(self, ttl: int) -> tuple[int, int]:
        r = self.call("lease/grant", {"TTL": ttl, "ID": 0})
        if r.get("error"):
            raise Etcd3Exception(str(r.get("error")))
        return int(r.get("ID", 0)), int(r.get("TTL", 0))

    def keepalive(self, lease: int) -> int:
        """Seconds left on ``lease`` after renewing it; 0 when etcd no longer has it."""
        return keepalive_ttl(self.call("lease/keepalive", {"ID": lease}))

    def txn(self, t: Txn, lease: int) -> tuple[bool, int, tuple[KV, ...]]:
        """(compare held, revision, the keys under ``t.prefix`` after it)."""
        def op(o: Put | Delete) -> dict[str, Any]:
            if isinstance(o, Put):
                put: dict[str, Any] = {"key": b64(o.key), "value": b64(o.value)}
                if o.leased:
                    put["lease"] = lease
                return {"request_put": put}
            return {"request_delete_range": {"key": b64(o.key)}}

        read = {"request_range": {"key": b64(t.prefix), "range_end": prefix_end(t.prefix)}}
        body = {"compare": [cmp(c) for c in t.compare],
                "success": [*map(op, t.success), read],
                "failure": [*map(op, t.failure), read]}
        r = self.call("kv/txn", body)
        revision = int(r.get("header", {}).get("revision", 0))
        kvs: tuple[KV, ...] = ()
        for resp in r.get("responses", []):
            rng = resp.get("response_range")
            if rng is not None:
                kvs = tuple(kv_of(kv) for kv in rng.get("kvs", []))
        return bool(r.get("succeeded", False)), revision, kvs

    def get_prefix(self, prefix: str) -> tuple[int, tuple[KV, ...]]:
        r = self.call("kv/range", {"key": b64(prefix), "range_end": prefix_end(prefix)})
        return (int(r.get("header", {}).get("revision", 0)),
                tuple(kv_of(kv) for kv in r.get("kvs", [])))

    def lease_ttl(self, lease: int) -> int:
        """Seconds left on ``lease``, rounded down (-1: etcd no longer has it).  The JSON
        gateway leaves out a field that is zero: no ``TTL`` is a lease with less than a
        second left, not a lease gone (etcd says -1 for that)."""
        r = self.call("lease/timetolive", {"ID": lease})
        return int(r.get("TTL", 0))

    def members(self) -> list[dict[str, Any]]:
        return list(self.call("cluster/member/list", {}).get("members", []))


def keepalive_ttl(r: dict[str, Any]) -> int:
    """The TTL a keepalive's answer says (0: etcd no longer has the lease).  The JSON
    gateway streams the answer: ``{"result": {...}}``, or ``{"error": {...}}`` when the
    member could not renew (no leader, a timeout), which says nothing of the lease and is
    raised, not read as an expiry."""
    res = r.get("result", r)
    if r.get("error") or not isinstance(res, dict):
        raise Etcd3Exception(str(r.get("error") or r)[:200])
    return int(res.get("TTL", 0))


def cmp(c: Cmp) -> dict[str, Any]:
    target, field = TARGETS[c.target]
    value = b64(str(c.value)) if c.target == "value" else str(c.value)
    return {"key": b64(c.key), "result": "EQUAL", "target": target, field: value}


def kv_of(kv: dict[str, Any]) -> KV:
    return KV(unb64(kv.get("key", "")), unb64(kv.get("value", "")),
              int(kv.get("create_revision", 0)), int(kv.get("mod_revision", 0)),
              int(kv.get("lease", 0)))


def perform(client: EtcdClient, args: dict[str, Any]) -> EtcdReply:
    """One request of the core (an ``etcd`` action's arguments), answered."""
    rid = int(args["req_id"])
    op = args["op"]
    try:
        if op == "grant":
            lease, ttl = client.grant(int(args["ttl"]))
            return EtcdReply(time.monotonic(), rid, True, lease=lease, ttl=ttl)
        if op == "keepalive":
            ttl = client.keepalive(int(args["lease"]))
            return EtcdReply(time.monotonic(), rid, True, ttl=ttl)
        ok, rev, kvs = client.txn(args["txn"], int(args.get("lease", 0)))
        return EtcdReply(time.monotonic(), rid, True, succeeded=ok, revision=rev, kvs=kvs)
    except (EtcdUnavailable, Etcd3Exception, ValueError, KeyError) as e:
        return EtcdReply(time.monotonic(), rid, False, error=str(e)[:300])


@dataclass(eq=False)
class Hedged:
    """One keepalive under way (``EtcdShell``): the endpoints it went to, how many of
    those have not answered yet, what failed, its answer once one came."""

    args: dict[str, Any]
    tried: set[int]
    errors: list[str]
    hedge_at: float = math.inf  # then it also goes to every other endpoint free
    running: int = 0
    ttl: int | None = None  # the first answer's (None: none yet)
    by: int = -1  # the endpoint that gave it
    stale: bool = False  # a newer keepalive is under way: this one goes nowhere new


class EtcdShell:
    """Performs the core's etcd requests on threads of its own; answers go to ``post``.

    Transactions in order on one thread.  Keepalives are hedged: one goes to the endpoint
    that answered last; unanswered after ``hedge`` s (at once while an older keepalive is
    still unanswered: etcd is in trouble) it also goes to every other endpoint in
    parallel, and the first answer is the answer.  A keepalive is idempotent, etcd renews
    a lease only on its leader (a follower forwards the renewal), and an answer with a
    TTL means the leader renewed the lease after the keepalive was sent, whichever
    member passed it on: it is anchored, as always, at the core's send time
    (docs/DESIGN.md §6b).  An endpoint that refuses or fails at once is passed over at
    once; one that failed since it last answered, or holds a keepalive past the hedge
    delay, is tried last.  ``SLOTS`` worker threads per endpoint, one request each: a
    member that holds keepalives until the timeout holds its workers only, and later
    keepalives go to the others without waiting.  When the endpoint asked first answers
    within the hedge delay nothing more is sent: one request per keepalive, as before.
    Grants are never hedged (two members would grant two leases)."""

    def __init__(self, client: EtcdClient, post: Callable[[Any], None],
                 hedge: float = HEDGE_AFTER) -> None:
        self.client = client
        self.post = post
        self.hedge = hedge
        self.txns: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.cv = threading.Condition()
        self.pending: deque[dict[str, Any]] = deque()  # grants and keepalives, in order
        self.active: list[Hedged] = []
        n = len(client.clients)
        self.jobs: list[Hedged | None] = [None] * (n * SLOTS)  # each worker's
        self.started = [0.0] * (n * SLOTS)  # when its job went out
        self.failed = [False] * n  # each endpoint: failed since it last answered
        self.stopping = False
        self.count = 0  # requests sent (the daemon's metrics and the bench read it)
        self.threads = [threading.Thread(target=self._leases, name="etcd-lease", daemon=True),
                        threading.Thread(target=self._txns, name="etcd-txn", daemon=True)]
        self.threads += [threading.Thread(target=self._worker, args=(k,),
                                          name=f"etcd-lease-{k // SLOTS}", daemon=True)
                         for k in range(n * SLOTS)]
        for t in self.threads:
            t.start()

    def submit(self, args: dict[str, Any]) -> None:
        if args["op"] in ("grant", "keepalive"):
            with self.cv:
                self.pending.append(args)
                self.cv.notify_all()
        else:
            self.txns.put(args)

    def _leases(self) -> None:
        """Takes grants and keepalives in order, sends keepalives to the endpoints'
        workers (``_send``) and answers them (``_ended``)."""
        while True:
            out: list[EtcdReply] = []
            grant = None
            with self.cv:
                stopped = self.stopping
                if stopped:
                    out = [EtcdReply(time.monotonic(), int(a["req_id"]), False,
                                     error="etcd shell stopped")
                           for a in [*self.pending, *(h.args for h in self.active)]]
                    self.pending.clear()
                    self.active.clear()
                elif self.pending and self.pending[0]["op"] == "grant":
                    grant = self.pending.popleft()
                elif self.pending:
                    args = self.pending.popleft()
                    # Only the newest queued one is worth sending: each is anchored at
                    # its own send time.
                    while self.pending and self.pending[0]["op"] == "keepalive":
                        out.append(EtcdReply(time.monotonic(), int(args["req_id"]), False,
                                             error="superseded by a newer keepalive"))
                        args = self.pending.popleft()
                    for h in self.active:
                        h.stale = True
                    self.active.append(Hedged(args, set(), []))
                now = time.monotonic()
                wake = self._send(now)
                out += self._ended(now)
                if not out and grant is None and not stopped and not self.pending:
                    self.cv.wait(None if wake == math.inf else max(0.0, wake - now))
            for r in out:
                self.post(r)
            if grant is not None:
                self.count += 1
                self.post(perform(self.client, grant))
            if stopped:
                return

    def _order(self, now: float) -> list[int]:
        """The endpoints to try: the one that answered last first, as the client's
        order, but any that failed since it last answered, or holds a keepalive longer
        than the hedge delay, after those that do not."""
        def suspect(n: int) -> bool:
            return self.failed[n] or any(
                self.jobs[k] is not None and now - self.started[k] > self.hedge
                for k in range(n * SLOTS, (n + 1) * SLOTS))
        return sorted(self.client.order(), key=suspect)

    def _slot(self, n: int) -> int | None:
        return next((k for k in range(n * SLOTS, (n + 1) * SLOTS) if self.jobs[k] is None),
                    None)

    def _send(self, now: float) -> float:
        """Gives each keepalive under way to the workers it should go to now; the next
        time a hedge is due.  A keepalive goes to one endpoint, hedged after the hedge
        delay, or at once while an older one is still unanswered (etcd is in trouble)."""
        order = self._order(now)
        trouble = any(h.stale and h.ttl is None and h.running for h in self.active)
        wake = math.inf
        for h in self.active:
            if h.ttl is not None or h.stale:
                continue
            if not h.tried:
                h.hedge_at = now if trouble else now + self.hedge
            free = [n for n in order if n not in h.tried and self._slot(n) is not None]
            if now >= h.hedge_at:
                pass  # hedged: every endpoint it has not been to, with a worker free
            elif not h.tried or h.running == 0:
                free = free[:1]  # the first, or the next at once after one failed
            else:
                free = []
            for n in free:
                k = self._slot(n)
                assert k is not None
                h.tried.add(n)
                h.running += 1
                self.jobs[k] = h
                self.started[k] = now
                self.count += 1
            if free:
                self.cv.notify_all()
            if h.running and h.hedge_at > now:
                wake = min(wake, h.hedge_at)
        return wake

    def _ended(self, now: float) -> list[EtcdReply]:
        """The answers of keepalives that have one, or that no endpoint will answer."""
        out = []
        for h in list(self.active):
            rid = int(h.args["req_id"])
            if h.ttl is not None:
                self.client.answered(h.by)
                out.append(EtcdReply(now, rid, True, ttl=h.ttl))
            elif h.running == 0 and (h.stale or len(h.tried) == len(self.failed)):
                out.append(EtcdReply(now, rid, False, error=(
                    "no etcd endpoint answered: " + "; ".join(h.errors))[:300]))
            else:
                continue
            self.active.remove(h)
        return out

    def _worker(self, k: int) -> None:
        """Keepalives to endpoint ``k // SLOTS``, one at a time."""
        n = k // SLOTS
        with self.cv:
            while True:
                h = self.jobs[k]
                if h is None:
                    if self.stopping:
                        return
                    self.cv.wait()
                    continue
                self.cv.release()
                ttl: int | None = None
                error = ""
                try:
                    ttl = keepalive_ttl(self.client.post_to(
                        n, "lease/keepalive", {"ID": int(h.args["lease"])}))
                except Exception as e:  # noqa: BLE001 - any failure is this endpoint's
                    error = f"{self.client.endpoints[n]}: {type(e).__name__} {e}".strip()[:150]
                finally:
                    self.cv.acquire()
                self.jobs[k] = None
                h.running -= 1
                self.failed[n] = ttl is None
                if ttl is None:
                    h.errors.append(error)
                elif h.ttl is None:
                    h.ttl, h.by = ttl, n
                self.cv.notify_all()

    def _txns(self) -> None:
        while (args := self.txns.get()) is not None:
            self.count += 1
            self.post(perform(self.client, args))

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify_all()
        self.txns.put(None)
        for t in self.threads:
            t.join(REQUEST_TIMEOUT * 4)


# -- the node's lease, kept by the groups parent --------------------------------------------


def boot_id() -> str:
    """This boot of the kernel (monotonic times of another boot mean nothing)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def write_node_lease(path: Path, sh: Shared, boot: str) -> None:
    """The file a group's child reads, replaced whole (a reader sees the old or the new).
    Not fsynced: it means something only during this boot (its boot id says which)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({
        "version": NODE_LEASE_VERSION, "boot": boot, "lease": sh.lease, "until": sh.until,
        "revision": sh.revision,
        "kvs": [[kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.lease]
                for kv in sh.kvs]}))
    os.replace(tmp, path)


def read_node_lease(path: Path, now: float, boot: str) -> Shared | None:
    """What the node's keeper published for this group.  None when there is nothing to
    go by: no file yet, one of another boot or format, or one that does not parse (the
    parent replaces it whole, so that is not a reader's race); the core then keeps the
    lease time it has, which only runs out."""
    try:
        d = json.loads(path.read_text())
        if d.get("boot") != boot or d.get("version") != NODE_LEASE_VERSION:
            return None
        return Shared(now, int(d["lease"]), float(d["until"]), int(d["revision"]),
                      tuple(KV(str(k), str(v), int(c), int(m), int(le))
                            for k, v, c, m, le in d["kvs"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class NodeLease:
    """The groups parent's etcd work (module docstring): the node's lease and one read of
    every group's keys (a ``LeaseKeeper``), published to ``files`` (group -> its child's
    file).  A parent restarted within the lease's TTL adopts the lease its files name,
    so its groups' keys stay theirs."""

    def __init__(self, client: EtcdClient, ttl: int, poll: float, prefix: str,
                 files: Mapping[str, Path]) -> None:
        self.prefix = prefix
        self.files = dict(files)
        self.boot = boot_id()
        self.lock = threading.Lock()
        self.written: dict[str, tuple[Any, ...]] = {}
        self.next_id = 0
        self.keeper = LeaseKeeper(ttl, time.monotonic(), lease=self._previous(),
                                  poll=poll, prefix=groups_prefix(prefix))
        self.stopping = threading.Event()
        self.shell = EtcdShell(client, self._answer)
        self.thread = threading.Thread(target=self._run, name="etcd-node-lease",
                                       daemon=True)
        self.thread.start()

    def _previous(self) -> int:
        for path in self.files.values():
            sh = read_node_lease(path, 0.0, self.boot)
            if sh is not None and sh.lease:
                log.info("etcd_node_lease_adopted", lease=f"{sh.lease:x}")
                return sh.lease
        return 0

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _run(self) -> None:
        while not self.stopping.wait(KEEPER_TICK):
            with self.lock:
                due = self.keeper.due(time.monotonic(), self._new_id)
            for args in due:
                self.shell.submit(args)

    def _answer(self, r: EtcdReply) -> None:
        with self.lock:
            said = self.keeper.answer(r)
            if said is not None:
                getattr(log, said[0])(said[1], **said[2])
            self._publish()

    def _publish(self) -> None:
        """Each group's file, rewritten when the lease's time or the group's keys moved
        (not for a write elsewhere in etcd, which only moves the revision)."""
        sh = self.keeper.published(time.monotonic())
        for group, path in self.files.items():
            keys = group_prefix(self.prefix, group)
            kvs = tuple(kv for kv in sh.kvs if kv.key.startswith(keys))
            said = (sh.lease, sh.until, kvs)
            if self.written.get(group) == said:
                continue
            try:
                write_node_lease(path, Shared(sh.now, sh.lease, sh.until, sh.revision, kvs),
                                 self.boot)
            except OSError as e:
                log.error("etcd_node_lease_unwritten", group=group, error=str(e))
                continue
            self.written[group] = said

    def set_files(self, files: Mapping[str, Path]) -> None:
        """The groups changed (a reload): publish to these from now on."""
        with self.lock:
            self.files = dict(files)
            self._publish()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(KEEPER_TICK * 10)
        self.shell.stop()
