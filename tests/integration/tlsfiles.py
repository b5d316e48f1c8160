"""Key and certificate files for the TLS tests: an NBD PSK file, a throwaway CA and the
certificates it issues (openssl)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def psk_file(path: Path, user: str = "alice") -> Path:
    """A key file in nbdkit's --tls-psk format: ``username:hexkey`` lines."""
    path.write_text(f"{user}:{os.urandom(32).hex()}\n")
    path.chmod(0o600)
    return path


def openssl(*args: str, cwd: Path) -> None:
    p = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=60, check=False)
    assert p.returncode == 0, f"openssl {' '.join(args)} failed:\n{p.stderr}"


def make_ca(d: Path, name: str) -> None:
    """A self-signed CA (EC P-256, valid 2 days) as d/ca-cert.pem + d/ca-key.pem."""
    d.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2",
            "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def issue(ca: Path, out: Path, stem: str, cn: str, usage: str) -> None:
    """out/<stem>-cert.pem + out/<stem>-key.pem signed by the CA in ``ca``."""
    out.mkdir(parents=True, exist_ok=True)
    ext = out / f"{stem}.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                   "keyUsage=critical,digitalSignature\n"
                   f"extendedKeyUsage={usage}\n")
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{stem}-key.pem", "-out", f"{stem}.csr",
            "-subj", f"/CN={cn}", cwd=out)
    openssl("x509", "-req", "-in", f"{stem}.csr", "-CA", str(ca / "ca-cert.pem"),
            "-CAkey", str(ca / "ca-key.pem"), "-CAcreateserial", "-days", "2",
            "-extfile", str(ext), "-out", f"{stem}-cert.pem", cwd=out)
    (out / f"{stem}-key.pem").chmod(0o600)
