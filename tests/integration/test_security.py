"""TLS (PSK and X.509) and the client allow-list, through `nbdgw serve` flags and config.

Real nbdkit TLS (GnuTLS) against real libnbd clients: the right credentials read and
write, plaintext clients and wrong credentials are refused.  The allow-list is checked
with TCP clients whose source address the test picks inside 127.0.0.0/8 (loopback only).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import nbd
import pytest

from tests.conftest import NBDGW, Served, run_nbdgw
from tests.integration.tlsfiles import issue, make_ca, psk_file

MiB = 1 << 20
VOL_SIZE = 64 * MiB


def write_read(h: nbd.NBD, tag: int) -> None:
    """A write and a read-back that must both work on an accepted connection."""
    data = bytes([tag]) * 65536
    h.pwrite(data, tag * MiB)
    h.flush()
    assert h.pread(65536, tag * MiB) == data
    assert h.get_size() == VOL_SIZE


def attempt(connect: Callable[[nbd.NBD], None], tag: int = 0) -> str | None:
    """Connect a fresh handle; None if served (after a write/read check), else the error.

    The handle is always dropped here: a connection left open keeps nbdkit from
    exiting on SIGTERM.
    """
    h = nbd.NBD()
    h.set_export_name("v1")
    try:
        connect(h)
    except nbd.Error as e:
        refused = str(e)
    else:
        write_read(h, tag)
        h.shutdown()
        refused = None
    del h
    return refused


# -- PSK ------------------------------------------------------------------------------


def test_tls_psk_require(data_dir: Path, volume: str, tmp_path: Path, serve) -> None:
    """With --tls require --tls-psk: the key holder is served over TLS; a plaintext client
    and a client with another key for the same user are refused."""
    keys = psk_file(tmp_path / "server.psk")
    wrong = psk_file(tmp_path / "wrong.psk")
    s: Served = serve("--tls", "require", "--tls-psk", str(keys))
    assert any(x.startswith("nbdgw: export v1: nbds+unix:///v1?socket=") for x in s.lines)

    def tls_client(key: Path, mode: int = nbd.TLS_REQUIRE) -> Callable[[nbd.NBD], None]:
        def connect(h: nbd.NBD) -> None:
            h.set_tls(mode)
            h.set_tls_psk_file(str(key))
            h.set_tls_username("alice")
            h.connect_unix(str(s.sock))
            assert h.get_tls_negotiated()
        return connect

    assert attempt(tls_client(keys), tag=1) is None

    plain = attempt(lambda h: (h.set_tls(nbd.TLS_DISABLE), h.connect_unix(str(s.sock))))
    assert plain is not None
    assert "server requires TLS" in plain

    bad = attempt(tls_client(wrong))
    assert bad is not None
    assert "gnutls_handshake" in bad
    # TLS_ALLOW would fall back to plaintext if the server allowed it; it must not.
    assert attempt(tls_client(wrong, nbd.TLS_ALLOW)) is not None
    assert s.proc.poll() is None  # refusals do not hurt the server
    assert attempt(tls_client(keys), tag=2) is None
    assert s.stop() == 0


def test_tls_missing_psk_file_fails_serve(data_dir: Path, volume: str, tmp_path: Path) -> None:
    """A PSK file that does not exist stops `serve` with an error naming it (it never
    falls back to plaintext)."""
    missing = tmp_path / "missing.psk"
    p = subprocess.run([NBDGW, "--log-format", "json", "serve", "--data-dir", str(data_dir),
                        "--listen", f"unix:{data_dir}/nbd.sock", "--tls", "require",
                        "--tls-psk", str(missing)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode != 0
    assert str(missing) in p.stderr


# -- X.509 ----------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """Directories laid out as nbdkit (server) and libnbd (clients) expect them."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (Debian package: openssl)")
    root = tmp_path / "pki"
    make_ca(root / "ca", "nbdgw test CA")
    make_ca(root / "other-ca", "some other CA")
    server = root / "server"
    issue(root / "ca", server, "server", "localhost", "serverAuth")
    shutil.copy(root / "ca" / "ca-cert.pem", server / "ca-cert.pem")
    with_cert = root / "client"  # trusts the CA and holds a client certificate
    issue(root / "ca", with_cert, "client", "alice", "clientAuth")
    shutil.copy(root / "ca" / "ca-cert.pem", with_cert / "ca-cert.pem")
    ca_only = root / "ca-only"  # trusts the CA, no client certificate
    ca_only.mkdir()
    shutil.copy(root / "ca" / "ca-cert.pem", ca_only / "ca-cert.pem")
    stranger = root / "stranger"  # trusts another CA only
    stranger.mkdir()
    shutil.copy(root / "other-ca" / "ca-cert.pem", stranger / "ca-cert.pem")
    return {"server": server, "client": with_cert, "ca_only": ca_only,
            "stranger": stranger}


def x509_client(certs: Path, sock: Path | None = None,
                port: int | None = None) -> Callable[[nbd.NBD], None]:
    """A libnbd client with certificates from ``certs``, over the unix socket or TCP.

    libnbd checks the server certificate only when it knows a host name, that is over
    TCP (it skips the check on unix sockets), so the CA-trust cases go over TCP.
    """
    def connect(h: nbd.NBD) -> None:
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(str(certs))
        h.set_tls_verify_peer(True)
        if port is not None:
            h.connect_tcp("127.0.0.1", str(port))
        else:
            h.connect_unix(str(sock))
        assert h.get_tls_negotiated()
    return connect


def test_tls_x509_require(data_dir: Path, volume: str, pki: dict[str, Path], serve) -> None:
    """--tls require --tls-certificates: a client trusting the CA is served; a plaintext
    client and a client that trusts only another CA are refused."""
    s: Served = serve("--listen", "tcp:127.0.0.1:0",
                      "--tls", "require", "--tls-certificates", str(pki["server"]))
    port = tcp_port(s)
    assert attempt(x509_client(pki["ca_only"], port=port), tag=3) is None
    assert attempt(x509_client(pki["client"], port=port), tag=4) is None
    assert attempt(x509_client(pki["ca_only"], sock=s.sock), tag=5) is None

    for plain_connect in (lambda h: h.connect_unix(str(s.sock)),
                          lambda h: h.connect_tcp("127.0.0.1", str(port))):
        plain = attempt(lambda h, c=plain_connect: (h.set_tls(nbd.TLS_DISABLE), c(h)))
        assert plain is not None
        assert "server requires TLS" in plain
    stranger = attempt(x509_client(pki["stranger"], port=port))
    assert stranger is not None
    assert "certificate" in stranger.lower(), stranger
    assert s.proc.poll() is None
    assert s.stop() == 0


def test_tls_x509_verify_peer_from_config(data_dir: Path, volume: str, tmp_path: Path,
                                          pki: dict[str, Path], serve) -> None:
    """nbd.tls.verify_peer in the config: only clients with a CA-signed certificate."""
    cfg = tmp_path / "nbdgw.yaml"
    cfg.write_text(
        "version: 1\n"
        f"node:\n  data_dir: {data_dir}\n"
        "nbd:\n"
        f"  listen: ['unix:{data_dir}/nbd.sock']\n"
        "  tls:\n"
        "    mode: require\n"
        f"    certificates_dir: {pki['server']}\n"
        "    verify_peer: true\n"
    )
    run_nbdgw("-c", str(cfg), "config", "check")
    s: Served = serve(config=cfg)
    assert attempt(x509_client(pki["client"], sock=s.sock), tag=6) is None
    no_cert = attempt(x509_client(pki["ca_only"], sock=s.sock))
    assert no_cert is not None
    plain = attempt(lambda h: (h.set_tls(nbd.TLS_DISABLE), h.connect_unix(str(s.sock))))
    assert plain is not None
    assert s.stop() == 0


# -- allow-list -----------------------------------------------------------------------

CONNECT_TIMEOUT = 3.0


def tcp_port(s: Served) -> int:
    """The TCP port serve reports ('nbdgw: listening on tcp:127.0.0.1:PORT')."""
    for line in s.lines:
        m = re.fullmatch(r"nbdgw: listening on tcp:127\.0\.0\.1:(\d+)\n?", line)
        if m:
            return int(m.group(1))
    raise AssertionError(f"no TCP listen line in {s.lines}")


def from_address(port: int, source: str) -> Callable[[nbd.NBD], None]:
    """Connect over TCP from ``source`` (a loopback address) and hand the socket to libnbd.

    A refusal is either a dropped connection (nbd.Error) or no connection at all within
    CONNECT_TIMEOUT (a filter may drop the SYN); both count as refused.
    """
    def connect(h: nbd.NBD) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT,
                                            source_address=(source, 0))
        except (TimeoutError, ConnectionRefusedError) as e:
            raise nbd.Error(f"TCP connect from {source} failed: {e}", 110) from None
        sock.settimeout(None)
        h.connect_socket(sock.detach())
    return connect


def test_allow_list_single_address(data_dir: Path, volume: str, serve) -> None:
    """--allow 127.0.0.2: a TCP client from 127.0.0.1 is refused, one from 127.0.0.2 is
    served.  Unix-socket clients are not subject to the (IP) allow-list: access to the
    socket is governed by its file mode, and local bridges (tgtd via nbdfuse) use it,
    as examples/nbdgw.yaml says ("refuses every other TCP client")."""
    s: Served = serve("--listen", "tcp:127.0.0.1:0", "--allow", "127.0.0.2")
    port = tcp_port(s)
    assert attempt(from_address(port, "127.0.0.1")) is not None
    assert attempt(from_address(port, "127.0.0.2"), tag=7) is None
    assert attempt(lambda h: h.connect_unix(str(s.sock)), tag=8) is None
    assert s.proc.poll() is None
    assert s.stop() == 0


def test_allow_list_cidr(data_dir: Path, volume: str, serve) -> None:
    """--allow 127.0.0.0/8 serves TCP clients from 127.0.0.1 and 127.0.0.3;
    --allow 10.0.0.0/8 refuses them."""
    s: Served = serve("--listen", "tcp:127.0.0.1:0", "--allow", "127.0.0.0/8")
    port = tcp_port(s)
    assert attempt(from_address(port, "127.0.0.1"), tag=9) is None
    assert attempt(from_address(port, "127.0.0.3"), tag=10) is None
    assert s.stop() == 0

    s = serve("--listen", "tcp:127.0.0.1:0", "--allow", "10.0.0.0/8")
    port = tcp_port(s)
    assert attempt(from_address(port, "127.0.0.1")) is not None
    assert s.stop() == 0


# -- open by default, but not silently (issue 20, point 6) --------------------------------

OPEN_WARNING = ("nbdgw: warning: NBD on tcp:0.0.0.0:0 accepts any client that reaches it "
                "(TLS off, no allow-list): anyone there can read and overwrite every served "
                "volume; set nbd.allow to the client networks or nbd.tls.mode: require "
                "(SECURITY.md)")


def test_serve_warns_when_open_to_the_network(data_dir: Path, volume: str, serve) -> None:
    """A TCP listener on every address with neither TLS nor an allow-list: one line on
    stderr and one structured warning, before serving; with --allow, neither."""
    s: Served = serve("--listen", "tcp:0.0.0.0:0")
    err = s.stderr()
    assert err.count(OPEN_WARNING + "\n") == 1, err
    events = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    (ev,) = [e for e in events if e["event"] == "nbd_open_to_network"]
    assert (ev["level"], ev["listen"], ev["tls"]) == ("warning", ["tcp:0.0.0.0:0"], "off")
    assert s.stop() == 0

    s = serve("--listen", "tcp:0.0.0.0:0", "--allow", "127.0.0.0/8")
    assert "nbd_open_to_network" not in s.stderr()
    assert "nbdgw: warning" not in s.stderr()
    assert s.stop() == 0
