"""The gateway exception hierarchy."""

from __future__ import annotations

from collections.abc import Sequence


class GatewayError(Exception):
    """Base class of every error raised by the gateway (config, CLI, supervision)."""


class ConfigError(GatewayError):
    """The node config is malformed; the message names the key and what was expected."""


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
