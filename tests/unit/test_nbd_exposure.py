"""Issue 20, point 6: NBD open to the network is said out loud at start.

`serve` and the daemon call `warn_if_open` once before serving: when a TCP address other
than loopback takes plaintext clients and no allow-list is set, a structured warning
(nbd_open_to_network) and one line on stderr, word for word.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import structlog

from gateway.config import parse_config
from gateway.serve import open_to_network, warn_if_open

OPEN_LINE = (
    "nbdgw: warning: NBD on tcp:0.0.0.0:10809 accepts any client that reaches it (TLS "
    "off, no allow-list): anyone there can read and overwrite every served volume; set "
    "nbd.allow to the client networks or nbd.tls.mode: require (SECURITY.md)")


def cfg(**nbd: Any) -> Any:
    return parse_config({"version": 1, "nbd": nbd} if nbd else {"version": 1})


def test_the_default_is_open_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    with structlog.testing.capture_logs() as logs:
        assert warn_if_open(cfg()) == OPEN_LINE
    assert capsys.readouterr().err == OPEN_LINE + "\n"
    assert logs == [{"event": "nbd_open_to_network", "log_level": "warning",
                     "component": "serve", "listen": ["tcp:0.0.0.0:10809"], "tls": "off",
                     "allow": [],
                     "fix": "set nbd.allow or nbd.tls.mode: require"}]
    json.dumps(logs)  # structured: plain values only


def test_tls_on_still_takes_plaintext(capsys: pytest.CaptureFixture[str]) -> None:
    c = cfg(listen=["tcp:192.0.2.10:10809", "tcp:[::]:10809", "unix:/run/nbdgw/nbd.sock"],
            tls={"mode": "on", "psk_file": "/etc/nbdgw/tls.psk"})
    assert warn_if_open(c) == (
        "nbdgw: warning: NBD on tcp:192.0.2.10:10809, tcp:[::]:10809 accepts any client "
        "that reaches it (TLS not required, no allow-list): anyone there can read and "
        "overwrite every served volume; set nbd.allow to the client networks or "
        "nbd.tls.mode: require (SECURITY.md)")


@pytest.mark.parametrize("nbd", [
    {"allow": ["192.0.2.0/24"]},
    {"tls": {"mode": "require", "psk_file": "/etc/nbdgw/tls.psk"}},
    {"listen": ["tcp:127.0.0.1:10809", "tcp:[::1]:10809", "unix:/run/nbdgw/nbd.sock"]},
])
def test_quiet_when_closed(nbd: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    c = cfg(**nbd)
    assert open_to_network(c) == []
    with structlog.testing.capture_logs() as logs:
        assert warn_if_open(c) is None
    assert logs == [] and capsys.readouterr().err == ""
