"""The gateway's own exceptions; the root, GatewayError, is nbdgw_common.errors'."""

from __future__ import annotations

from nbdgw_common.errors import GatewayError


class ConfigError(GatewayError):
    """The node config is malformed; the message names the key and what was expected."""
