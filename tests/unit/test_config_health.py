"""The health: config section: defaults, values, every message word for word, and the
example config documents it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import HealthConfig, load_config
from tests.unit.conftest import config_of, refused_top

ROOT = Path(__file__).resolve().parents[2]


cfg = config_of
refused = refused_top


def test_defaults_and_values() -> None:
    assert cfg().health == HealthConfig(15.0, 5.0, 60.0, 60)
    h = cfg(health={"warn_free_percent": 20, "critical_free_percent": 2.5, "interval": 30,
                    "max_disk_temperature": 55}).health
    assert h == HealthConfig(20.0, 2.5, 30.0, 55)
    assert cfg(health={"warn_free_percent": 0, "critical_free_percent": 0}).health == \
        HealthConfig(0.0, 0.0, 60.0, 60)


@pytest.mark.parametrize(("health", "message"), [
    ({"warn_free_percent": 100}, "expected a percentage >= 0 and < 100 for "
                                 "health.warn_free_percent"),
    ({"warn_free_percent": -1}, "expected a percentage >= 0 and < 100 for "
                                "health.warn_free_percent"),
    ({"critical_free_percent": "5%"}, "expected a percentage >= 0 and < 100 for "
                                      "health.critical_free_percent"),
    ({"critical_free_percent": True}, "expected a percentage >= 0 and < 100 for "
                                      "health.critical_free_percent"),
    ({"warn_free_percent": 4}, "health.critical_free_percent must be at most "
                               "health.warn_free_percent"),
    ({"interval": 0}, "expected a number of seconds > 0 and at most 86400 for health.interval"),
    ({"max_disk_temperature": 20}, "expected integer between 30 and 100 for "
                                   "health.max_disk_temperature"),
    ({"smart": False}, "unknown key 'smart' in health (known: critical_free_percent, "
                       "interval, max_disk_temperature, warn_free_percent)"),
])
def test_messages(health: Any, message: str) -> None:
    assert refused(health=health) == message
    assert refused(health="on") == "expected a mapping for health"


def test_example_documents_health() -> None:
    example = ROOT / "examples" / "nbdgw.yaml"
    assert load_config(example).health == HealthConfig()
    text = example.read_text()
    for key in ("health", "warn_free_percent", "critical_free_percent", "interval",
                "max_disk_temperature"):
        assert f"{key}:" in text
