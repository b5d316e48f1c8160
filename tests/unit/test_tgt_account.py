"""Issue 20, point 8: the CHAP secret never on a command line.

tgtadm takes the secret only as ``--password`` (visible to every local user in
/proc/PID/cmdline while it runs, and in the CommandError of a failure).  Tgtadm now
sends that one request over tgtd's control socket itself.  These tests pin the bytes
against the real tgtadm binary (it talks to a fake tgtd here, through its
TGT_IPC_SOCKET override) and the answers, without a tgtd.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from iscsi_bridge import tgt
from iscsi_bridge.errors import TgtdError
from iscsi_bridge.tgt import Tgtadm, account_new_request
from tests.conftest import need

SECRET = "initiator-secret-1"  # noqa: S105 - a test value


class FakeTgtd:
    """A unix socket that reads one request and answers it with ``err``."""

    def __init__(self, path: Path, err: int = 0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.err = err
        self.request = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            head = b""
            while len(head) < 120:
                head += conn.recv(120 - len(head))
            total = int.from_bytes(head[72:76], "little")
            body = b""
            while len(head) + len(body) < total:
                body += conn.recv(total - len(head) - len(body))
            self.request = head + body
            conn.sendall(self.err.to_bytes(4, "little") + (8).to_bytes(4, "little"))

    def close(self) -> bytes:
        self.thread.join(10)
        self.sock.close()
        return self.request


@pytest.fixture
def fake_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(tgt, "TGTD_SOCKET_DIR", tmp_path)
    return tmp_path


def test_the_request_is_the_one_tgtadm_sends(tmp_path: Path) -> None:
    """Byte for byte what `tgtadm --mode account --op new` writes to tgtd's socket."""
    need("tgtd")
    fake = FakeTgtd(tmp_path / "socket.4242")
    p = subprocess.run(["tgtadm", "-C", "4242", "--lld", "iscsi", "--mode", "account",
                        "--op", "new", "--user", "sqlhosts", "--password", SECRET],
                       env=dict(os.environ, TGT_IPC_SOCKET=str(tmp_path / "socket")),
                       capture_output=True, text=True, timeout=30, check=False)
    assert p.returncode == 0, p.stderr
    assert account_new_request("sqlhosts", SECRET) == fake.close()


def test_new_account_sends_it_without_a_process(fake_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[list[str]] = []
    monkeypatch.setattr(tgt, "run", lambda argv, **kw: ran.append(list(argv)) or "")
    fake = FakeTgtd(fake_dir / "socket.77")
    Tgtadm(77).new_account("sqlhosts", SECRET)
    req = fake.close()
    assert ran == []  # no tgtadm, so no command line at all
    assert req.endswith(f"user=sqlhosts,password={SECRET}".encode() + b"\0")


def test_a_refusal_names_the_user_not_the_secret(fake_dir: Path) -> None:
    fake = FakeTgtd(fake_dir / "socket.78", err=14)  # TGTADM_USER_EXIST
    with pytest.raises(TgtdError) as ei:
        Tgtadm(78).new_account("sqlhosts", SECRET)
    fake.close()
    assert str(ei.value) == ("tgtd refused the new CHAP account sqlhosts: this account "
                             "already exists")


def test_no_tgtd(fake_dir: Path) -> None:
    with pytest.raises(TgtdError) as ei:
        Tgtadm(79).new_account("sqlhosts", SECRET)
    assert str(ei.value) == (f"cannot create CHAP account sqlhosts in tgtd "
                             f"({fake_dir}/socket.79): No such file or directory")
    assert SECRET not in str(ei.value)


@pytest.mark.parametrize("user", ["a,b", "a=b", ""])
def test_users_tgtd_cannot_parse(user: str) -> None:
    with pytest.raises(TgtdError, match="cannot be sent to tgtd"):
        account_new_request(user, SECRET)
