"""Helpers the unit tests share (imported as ``tests.unit.conftest``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import NodeConfig, parse_config
from gateway.errors import ConfigError


def refused(raw: Any) -> str:
    """The message parse_config refuses ``raw`` with."""
    with pytest.raises(ConfigError) as ei:
        parse_config(raw)
    return str(ei.value)


def write_config(tmp_path: Path, text: str) -> Path:
    """``text`` as tmp_path/nbdgw.yaml."""
    p = tmp_path / "nbdgw.yaml"
    p.write_text(text)
    return p


def config_of(**top: Any) -> NodeConfig:
    """The node config of ``{"version": 1, **top}``."""
    return parse_config({"version": 1, **top})


def refused_top(**top: Any) -> str:
    """The message parse_config refuses ``{"version": 1, **top}`` with."""
    return refused({"version": 1, **top})
