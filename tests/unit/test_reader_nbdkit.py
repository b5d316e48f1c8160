"""The nbdkit a secondary's daemon runs for readers (gateway/serve.py, replicas_only):
it takes neither the write lease nor the sync gate, asks clients for the same TLS as a
primary's, and skips a listen address the node does not have (the service address lives
on the primary)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway import serve
from gateway.config import Listen, parse_config
from gateway.serve import NbdServer, nbdkit_argv


def config(tmp_path: Path, listen: list[str], me: str = "dc", role: str = "secondary",
           peer: str = "main", peer_role: str = "primary") -> Any:
    peers = [{"name": peer, "role": peer_role, "address": "192.0.2.11", "mode": "sync",
              "sync_timeout": 2}]
    tls = {"mode": "require", "psk_file": "/etc/nbdgw/tls.psk"}
    return parse_config({"version": 1, "node": {"name": me, "role": role},
                         "peers": peers, "nbd": {"listen": listen, "tls": tls},
                         "peerlink": {"secret_file": "/etc/nbdgw/peer.secret"}}
                        ).with_overrides(data_dir=tmp_path)


def test_readers_take_no_lease_and_no_sync_gate(tmp_path: Path) -> None:
    # The same node as a primary with a sync peer: what a writer's nbdkit takes.
    cfg = config(tmp_path, ["tcp:127.0.0.1:0"], "main", "primary", "dc", "secondary")
    writer = nbdkit_argv(cfg, None)
    assert any(a.startswith("lease=") for a in writer)
    assert any(a.startswith("sync_socket=") for a in writer)
    reader = nbdkit_argv(cfg, None, replicas_only=True)
    assert "replicas_only=true" in reader and "-r" not in reader  # clones stay writable
    assert not [a for a in reader if a.startswith(("lease=", "sync_"))]
    tls = ["--tls=require", "--tls-psk=/etc/nbdgw/tls.psk"]  # readers authenticate alike
    assert [a for a in writer if a.startswith("--tls")] == tls
    assert [a for a in reader if a.startswith("--tls")] == tls


class FakeChild:
    def __init__(self, argv: list[str], **_kw: Any) -> None:
        self.argv = argv

    def start(self) -> None:
        pass


@pytest.mark.parametrize("replicas_only", [False, True])
def test_an_address_the_node_lacks_is_skipped_for_readers_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, replicas_only: bool) -> None:
    monkeypatch.setattr(serve, "ChildProcess", FakeChild)
    sock = tmp_path / "nbd.sock"
    # 192.0.2.1 (TEST-NET-1) is on no interface here: bind fails with EADDRNOTAVAIL.
    cfg = config(tmp_path, ["tcp:192.0.2.1:10809", f"unix:{sock}"])
    server = NbdServer(cfg, [], discover=True, replicas_only=replicas_only)
    if not replicas_only:
        with pytest.raises(OSError, match="Cannot assign requested address"):
            server.start()
        return
    server.start()
    assert server.addresses == [Listen("unix", path=str(sock))]
    only_missing = NbdServer(config(tmp_path, ["tcp:192.0.2.1:10809"]), [], discover=True,
                             replicas_only=True)
    with pytest.raises(serve.GatewayError, match=r"no address of nbd\.listen"):
        only_missing.start()
