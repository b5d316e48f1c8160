"""Mutual TLS for peerlink: both ends present a certificate signed by the cluster's CA.

Peers are addressed by IP and belong to one private CA, so identity is the CA's signature
on the certificate, not a host name: the chain is verified (CERT_REQUIRED on both sides),
the host name is not.  The HMAC handshake (a shared secret) may be used on top.
"""

from __future__ import annotations

import ssl
from pathlib import Path


def _context(purpose: ssl.Purpose, cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    for what, path in (("certificate", cert), ("key", key), ("CA certificate", ca)):
        if not path.is_file():
            raise ValueError(f"peerlink TLS: {what} file {path} does not exist")
    ctx = ssl.create_default_context(purpose, cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as e:
        raise ValueError(f"peerlink TLS: cannot load {cert} with {key}: {e.reason}") from None
    return ctx


def server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """The receiver's side: clients must present a certificate signed by ``ca``."""
    return _context(ssl.Purpose.CLIENT_AUTH, cert, key, ca)


def client_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """The sender's side: the receiver's certificate must be signed by ``ca``."""
    return _context(ssl.Purpose.SERVER_AUTH, cert, key, ca)
