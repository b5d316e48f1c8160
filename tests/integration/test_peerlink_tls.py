"""peerlink over mutual TLS: both ends signed by the cluster CA replicate; a sender with a
certificate from another CA, or without TLS, is refused and nothing is applied."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.integration.peerenv import Env, replica_state
from tests.integration.tlsfiles import issue, make_ca

MiB = 1 << 20


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (Debian package: openssl)")
    root = tmp_path / "pki"
    make_ca(root / "ca", "nbdgw cluster CA")
    make_ca(root / "other", "someone else's CA")
    issue(root / "ca", root / "nodes", "receiver", "dc", "serverAuth,clientAuth")
    issue(root / "ca", root / "nodes", "sender", "main", "serverAuth,clientAuth")
    issue(root / "other", root / "nodes", "rogue", "main", "serverAuth,clientAuth")
    return {"ca": root / "ca" / "ca-cert.pem", "nodes": root / "nodes"}


def tls_args(certs: dict[str, Path], stem: str) -> list[str]:
    n = certs["nodes"]
    return ["--tls-cert", str(n / f"{stem}-cert.pem"), "--tls-key", str(n / f"{stem}-key.pem"),
            "--tls-ca", str(certs["ca"])]


def test_mutual_tls_replicates(env: Env, certs: dict[str, Path]) -> None:
    rx = env.receiver(0, *tls_args(certs, "receiver"))
    tx = env.sender(rx.port, *tls_args(certs, "sender"))
    h = env.served.connect("v1")
    h.pwrite(os.urandom(4 * MiB), 0)
    h.flush()
    env.wait_caught_up()
    assert (tx.stop(), rx.stop()) == (0, 0)
    p, r = env.checksums()
    assert p == r


@pytest.mark.parametrize("who", ["rogue", "plaintext"])
def test_sender_outside_the_ca_is_refused(env: Env, certs: dict[str, Path],
                                          who: str) -> None:
    rx = env.receiver(0, *tls_args(certs, "receiver"))
    extra = [] if who == "plaintext" else tls_args(certs, "rogue")
    tx = env.sender(rx.port, *extra)
    h = env.served.connect("v1")
    h.pwrite(os.urandom(MiB), 0)
    h.flush()
    time.sleep(3)  # several connection attempts, all refused
    assert env.acked() == -1, "nothing was acknowledged"
    assert (tx.stop(), rx.stop()) == (0, 0)
    state = replica_state(env.replica)
    assert (state["upstream_seq"], state["inconsistent"]) == (0, True), "nothing applied"


def test_certificates_rotate_without_a_resync(env: Env, tmp_path: Path) -> None:
    """The documented rotation (SECURITY.md): both ends trust the old and the new CA, then
    take certificates of the new one, then drop the old CA; each end restarted one at a
    time (what a daemon's SIGHUP does to peerlink) while a client writes.  Every session
    resumes streaming where the last one stopped: no resync, no refused handshake, and
    the replica ends equal to the primary.  A sender still on the old CA alone is refused
    once the receiver has dropped it, so the test can tell trust from no check."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (Debian package: openssl)")
    pki = tmp_path / "pki"
    make_ca(pki / "old", "nbdgw cluster CA 2025")
    make_ca(pki / "new", "nbdgw cluster CA 2026")
    for ca in ("old", "new"):
        issue(pki / ca, pki / "nodes", f"receiver-{ca}", "dc", "serverAuth,clientAuth")
        issue(pki / ca, pki / "nodes", f"sender-{ca}", "main", "serverAuth,clientAuth")
    both = pki / "both.pem"
    both.write_bytes((pki / "old" / "ca-cert.pem").read_bytes()
                     + (pki / "new" / "ca-cert.pem").read_bytes())

    def args(stem: str, ca: Path) -> list[str]:
        n = pki / "nodes"
        return ["--tls-cert", str(n / f"{stem}-cert.pem"), "--tls-key",
                str(n / f"{stem}-key.pem"), "--tls-ca", str(ca)]

    h = env.served.connect("v1")
    written = 0

    def write(n: int = 8) -> None:
        nonlocal written
        for _ in range(n):
            h.pwrite(os.urandom(256 * 1024), (written % 64) * 256 * 1024)
            written += 1
        h.flush()

    old_ca = pki / "old" / "ca-cert.pem"
    rx = env.receiver(0, *args("receiver-old", old_ca))
    port = rx.port
    tx = env.sender(port, *args("sender-old", old_ca))
    write()
    env.wait_caught_up()
    steps = [("receiver-old", "sender-old", both),   # 1. trust both CAs
             ("receiver-new", "sender-new", both),   # 2. certificates of the new CA
             ("receiver-new", "sender-new", pki / "new" / "ca-cert.pem")]  # 3. old CA gone
    senders = [tx]
    for rx_stem, tx_stem, ca in steps:
        assert rx.stop() == 0
        rx = env.receiver(port, *args(rx_stem, ca))
        write()
        assert tx.stop() == 0
        tx = env.sender(port, *args(tx_stem, ca))
        senders.append(tx)
        write()
        acked = env.wait_caught_up()
        assert acked == env.last_seq()
    sessions = [e for s in senders for e in s.events() if e.get("event") in ("streaming",
                                                                              "resync")]
    assert sessions and all(e["event"] == "streaming" for e in sessions), sessions
    # The receiver on the new CA alone refuses a sender that still has the old one.
    rogue = env.sender(port, *args("sender-old", old_ca), node="p1")
    time.sleep(2)
    assert not [e for e in rogue.events() if e.get("event") in ("streaming", "resync")]
    assert (rogue.stop(), tx.stop(), rx.stop()) == (0, 0, 0)
    p, r = env.checksums()
    assert p == r
