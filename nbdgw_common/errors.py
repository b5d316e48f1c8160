"""The root of nbdgw's own errors above the storage core, and an external command's
failure.  blockstore and peerlink keep their own roots (BlockstoreError, PeerlinkError)."""

from __future__ import annotations

from collections.abc import Sequence


class GatewayError(Exception):
    """Base class of every error raised by the gateway (config, CLI, supervision) and the
    iSCSI bridge."""


class CommandError(GatewayError):
    """An external command failed; carries argv, exit status and stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-3:] if stderr else []
        super().__init__(
            f"{' '.join(self.argv)} exited with status {returncode}"
            + (": " + " / ".join(tail) if tail else "")
        )
