"""The iSCSI bridge's exceptions: one base class, under nbdgw_common.errors.GatewayError."""

from __future__ import annotations

from nbdgw_common.errors import GatewayError


class BridgeError(GatewayError):
    """Base class of every error raised by the iSCSI bridge."""


class InvalidName(BridgeError):
    """A name that cannot be an iSCSI name (IQN, EUI or NAA), or a target built from it."""


class TgtdError(BridgeError):
    """tgtd did not start, stop or answer as expected."""


class FuseError(BridgeError):
    """A FUSE mount (in nbdkit, nbdgw-fuse or nbdfuse) did not come up, or could not be served or
    taken down."""
