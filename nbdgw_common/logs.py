"""structlog set-up, done once by each entry point (CLI, plugin, peerlink), and the mark
of an exception already logged as an event."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def configure(fmt: str = "auto", level: str = "info") -> None:
    """JSON lines when stderr is not a terminal (or fmt='json'), coloured console otherwise."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


# What an exception already logged as a structured event is printed as by nbdkit; the
# line is dropped from nbdkit's stderr by gateway/serve.py (NbdServer).
LOGGED_MARK = "[logged by nbdgw]"
LOGGED = "nbdgw_logged"  # attribute set on an exception already logged as an event


def mark_logged(e: BaseException) -> None:
    """``e`` was logged as a structured event where it happened: whoever prints
    exceptions (nbdkit prints every one a plugin callback raises) need not again."""
    setattr(e, LOGGED, True)


def was_logged(e: BaseException) -> bool:
    return bool(getattr(e, LOGGED, False))


def quiet_logged_errors() -> None:
    """In nbdkit's interpreter: print exceptions the data path logged already as one
    short marked line instead of a traceback.

    nbdkit prints every exception a plugin callback raises, traceback and all, through
    ``traceback.format_exception`` (plugins/python/errors.c), and a failed request can
    only be reported by raising.  A write refused on a full disk is logged by the volume
    as a rate-limited ``write_failed`` event (blockstore.volume.FailureLog) and marked
    (mark_logged); a client retrying it would otherwise add a
    traceback per request.  Every other exception is formatted as before."""
    import traceback

    original = traceback.format_exception
    if getattr(original, "nbdgw_quiet", False):
        return

    def format_exception(exc: Any, *args: Any, **kwargs: Any) -> list[str]:
        value = args[0] if args else kwargs.get("value", exc)
        if isinstance(value, BaseException) and was_logged(value):
            return [f"{value} {LOGGED_MARK}"]
        return original(exc, *args, **kwargs)

    format_exception.nbdgw_quiet = True  # type: ignore[attr-defined]
    traceback.format_exception = format_exception
