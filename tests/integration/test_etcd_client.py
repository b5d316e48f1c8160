"""The etcd client and shell (gateway/etcdclient.py) against a real etcd (Debian's
etcd-server, one member on loopback, started and stopped by the test): endpoints tried
in turn, leases that expire, the take transaction (create_revision == 0, bound to the
lease), the shell's answers, and `nbdgw fleet status`."""

from __future__ import annotations

import contextlib
import json
import queue
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.etcdclient import EtcdClient, EtcdShell, EtcdUnavailable, Tls
from gateway.etcdcore import Cmp, Delete, EtcdReply, Put, Txn, parse_group
from tests.conftest import run_nbdgw
from tests.integration.tlsfiles import issue, make_ca

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None,
                                reason="etcd-server is not installed (make setup)")

PREFIX = "/t/groups/g/"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def etcd_member(tmp_path: Path, tls: Tls | None = None) -> Iterator[str]:
    """One etcd member on loopback (with ``tls``: https, client certificates required,
    ``tls``'s files being the client's and the CA's, the server's beside them)."""
    client, peer = free_port(), free_port()
    url = f"{'https' if tls else 'http'}://127.0.0.1:{client}"
    argv = ["etcd", "--name", "t", "--data-dir", str(tmp_path / "etcd"),
            "--listen-client-urls", url, "--advertise-client-urls", url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"t=http://127.0.0.1:{peer}"]
    if tls is not None:
        assert tls.ca_file is not None and tls.cert_file is not None
        d = tls.cert_file.parent
        argv += ["--cert-file", str(d / "server-cert.pem"),
                 "--key-file", str(d / "server-key.pem"),
                 "--client-cert-auth", "--trusted-ca-file", str(tls.ca_file)]
    log = (tmp_path / "etcd.log").open("wb")
    p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        c = EtcdClient([url], tls or Tls())
        deadline = time.monotonic() + 30
        while True:
            try:
                c.get_prefix("/")
                break
            except EtcdUnavailable:
                assert p.poll() is None, (tmp_path / "etcd.log").read_text()[-500:]
                assert time.monotonic() < deadline, "etcd did not answer"
                time.sleep(0.1)
        yield url
    finally:
        p.terminate()
        p.wait(30)
        log.close()


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[str]:
    with etcd_member(tmp_path) as url:
        yield url


def take(node: str) -> Txn:
    return Txn((Cmp(PREFIX + "primary", "create", 0),),
               (Put(PREFIX + "primary", json.dumps({"node": node, "epoch": 1}), leased=True),
                Put(PREFIX + "state", json.dumps({"epoch": 1, "served": 0}))), PREFIX)


def test_a_dead_endpoint_is_skipped_and_the_one_that_answered_is_kept(etcd: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    c = EtcdClient([dead, etcd])
    lease, ttl = c.grant(5)
    assert lease > 0 and ttl == 5
    assert c.current == 1
    with pytest.raises(EtcdUnavailable, match="no etcd endpoint answered"):
        EtcdClient([dead]).grant(5)


def test_the_take_is_a_compare_and_swap_bound_to_the_lease_which_expires(etcd: str) -> None:
    c = EtcdClient([etcd])
    a, _ = c.grant(2)
    b, _ = c.grant(10)
    ok, rev, kvs = c.txn(take("a"), a)
    assert ok
    v = parse_group(PREFIX, rev, kvs)
    assert v.primary is not None and v.primary.node == "a" and v.primary.lease == a
    ok, _, kvs = c.txn(take("b"), b)
    assert not ok  # held: the failure branch reads the group as it is
    assert parse_group(PREFIX, 0, kvs).primary.node == "a"  # type: ignore[union-attr]
    assert c.keepalive(a) == 2
    deadline = time.monotonic() + 8
    while c.get_prefix(PREFIX + "primary")[1]:
        assert time.monotonic() < deadline, "the key outlived its lease"
        time.sleep(0.1)
    assert c.keepalive(a) == 0  # gone
    ok, _, kvs = c.txn(take("b"), b)
    assert ok and parse_group(PREFIX, 0, kvs).primary.node == "b"  # type: ignore[union-attr]
    # delete-if-mine: compared on the key's mod_revision
    mod = parse_group(PREFIX, 0, kvs).primary.mod_revision  # type: ignore[union-attr]
    ok, _, _ = c.txn(Txn((Cmp(PREFIX + "primary", "mod", mod + 1),),
                         (Delete(PREFIX + "primary"),), PREFIX), b)
    assert not ok
    ok, _, kvs = c.txn(Txn((Cmp(PREFIX + "primary", "mod", mod),),
                           (Delete(PREFIX + "primary"),), PREFIX), b)
    assert ok and parse_group(PREFIX, 0, kvs).primary is None


def test_the_shell_answers_every_request(etcd: str) -> None:
    answers: queue.Queue[Any] = queue.Queue()
    shell = EtcdShell(EtcdClient([etcd]), answers.put)
    try:
        shell.submit({"req_id": 1, "op": "grant", "ttl": 5})
        r = answers.get(timeout=10)
        assert isinstance(r, EtcdReply) and r.ok and r.req_id == 1 and r.lease
        for i in range(2, 6):
            shell.submit({"req_id": i, "op": "keepalive", "lease": r.lease})
        shell.submit({"req_id": 9, "op": "txn", "lease": r.lease, "txn": take("a")})
        shell.submit({"req_id": 10, "op": "txn", "lease": 12345, "txn": take("b")})
        got = {}
        for _ in range(6):
            a = answers.get(timeout=10)
            got[a.req_id] = a
        assert got[5].ok and got[5].ttl == 5  # the newest keepalive is always sent
        assert got[9].ok and got[9].succeeded
        assert got[10].ok and not got[10].succeeded  # held by a: no lease needed to fail
    finally:
        shell.stop()


def test_fleet_status_shows_each_group(etcd: str, tmp_path: Path) -> None:
    c = EtcdClient([etcd])
    lease, _ = c.grant(30)
    for g, node in (("g1", "alpha"), ("g2", "beta")):
        p = f"/nbdgw/groups/{g}/"
        c.txn(Txn((), (Put(p + "primary", json.dumps({"node": node, "epoch": 3}), True),
                       Put(p + "state", json.dumps({"epoch": 3, "served": 3,
                                                    "outdated": ["gamma"]})),
                       Put(p + "members/" + node, json.dumps(
                           {"state": "primary", "consistent": True, "data_epoch": 3,
                            "role": "primary"}), True)), p), lease)
    cfg = tmp_path / "nbdgw.yaml"
    cfg.write_text(yaml.safe_dump({"version": 1, "coordinator": {
        "kind": "etcd", "endpoints": [etcd]}}))
    report = json.loads(run_nbdgw("-c", str(cfg), "fleet", "status", "--json").stdout)
    groups = {g["group"]: g for g in report["groups"]}
    assert set(groups) == {"g1", "g2"}
    assert groups["g1"]["primary"]["node"] == "alpha"
    assert 0 < groups["g1"]["primary"]["lease_ttl_s"] <= 30
    assert groups["g2"]["outdated"] == ["gamma"]
    assert groups["g2"]["members"]["beta"]["state"] == "primary"
    text = run_nbdgw("-c", str(cfg), "fleet", "status").stdout
    assert "group g1: primary alpha on epoch 3" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"version": 1, "coordinator": {
        "kind": "etcd", "endpoints": [f"http://127.0.0.1:{free_port()}"]}}))
    p = run_nbdgw("-c", str(bad), "fleet", "status", check=False)
    assert p.returncode != 0 and "no etcd endpoint answered" in p.stderr


def test_https_with_client_certificates(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """coordinator.ca_file, cert_file and key_file: etcd checks the client's certificate,
    nbdgw etcd's; without a client certificate etcd refuses the connection.  A CA bundle
    named by the environment does not replace ca_file (requests' REQUESTS_CA_BUNDLE did:
    this test failed with 'unable to get local issuer certificate' before)."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    ca = tmp_path / "ca"
    make_ca(ca, "etcd test CA")
    # etcd's JSON gateway dials etcd's own gRPC with the server certificate: clientAuth too
    issue(ca, tmp_path / "certs", "server", "etcd", "serverAuth,clientAuth")
    issue(ca, tmp_path / "certs", "client", "nbdgw", "clientAuth")
    certs = tmp_path / "certs"
    tls = Tls(ca / "ca-cert.pem", certs / "client-cert.pem", certs / "client-key.pem")
    with etcd_member(tmp_path, tls) as url:
        lease, ttl = EtcdClient([url], tls).grant(5)
        assert lease and ttl == 5
        with pytest.raises(EtcdUnavailable):
            EtcdClient([url], Tls(ca / "ca-cert.pem")).grant(5)
        cfg = tmp_path / "nbdgw.yaml"
        cfg.write_text(yaml.safe_dump({"version": 1, "coordinator": {
            "kind": "etcd", "endpoints": [url], "ca_file": str(tls.ca_file),
            "cert_file": str(tls.cert_file), "key_file": str(tls.key_file)}}))
        report = json.loads(run_nbdgw("-c", str(cfg), "fleet", "status", "--json").stdout)
        assert report["groups"] == [] and report["revision"] >= 1
