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
