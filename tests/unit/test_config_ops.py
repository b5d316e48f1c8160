"""The metrics: and control: config sections: defaults, values, every message word for word."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import ControlConfig, MetricsConfig
from tests.unit.conftest import config_of, refused_top

cfg = config_of
refused = refused_top


def test_defaults() -> None:
    c = cfg()
    assert c.metrics == MetricsConfig(listen=None)
    assert c.control == ControlConfig(group=None)


def test_values() -> None:
    c = cfg(metrics={"listen": "0.0.0.0:9810"}, control={"group": "root"})
    assert c.metrics.listen == ("0.0.0.0", 9810)
    assert c.control.group == "root"
    assert cfg(metrics={"listen": "[::1]:9810"}).metrics.listen == ("::1", 9810)


@pytest.mark.parametrize(("top", "message"), [
    ({"metrics": {"listen": "localhost:9810"}},
     "expected 'HOST:PORT' with an IP address and a port 1..65535 for metrics.listen, "
     "got 'localhost:9810'"),
    ({"metrics": {"listen": "0.0.0.0:0"}},
     "expected 'HOST:PORT' with an IP address and a port 1..65535 for metrics.listen, "
     "got '0.0.0.0:0'"),
    ({"metrics": {"listen": 9810}}, "expected 'HOST:PORT' for metrics.listen"),
    ({"metrics": {"port": 9810}}, "unknown key 'port' in metrics (known: listen)"),
    ({"metrics": "on"}, "expected a mapping for metrics"),
    ({"control": {"group": "no-such-group-here"}},
     "no group named 'no-such-group-here' on this host for control.group"),
    ({"control": {"group": ""}}, "expected a non-empty string for control.group"),
    ({"control": {"mode": "0660"}}, "unknown key 'mode' in control (known: group)"),
])
def test_messages(top: dict[str, Any], message: str) -> None:
    assert refused(**top) == message
