"""The one way nbdgw runs external commands: argv lists, never shell strings.  A
long-running one (a server, a daemon) is a supervise.ChildProcess."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from .errors import CommandError


def run(argv: Sequence[str], *, timeout: float = 60, input_: bytes | None = None) -> str:
    """Run ``argv``; return its stdout; raise CommandError on a non-zero exit."""
    try:
        p = subprocess.run(list(argv), input=input_, capture_output=True, timeout=timeout,
                           check=False)
    except FileNotFoundError:
        raise CommandError(argv, 127, f"{argv[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise CommandError(argv, -1, f"timed out after {timeout} s") from None
    if p.returncode != 0:
        raise CommandError(argv, p.returncode, p.stderr.decode(errors="replace"))
    return p.stdout.decode(errors="replace")


def output(argv: Sequence[str], *, timeout: float = 60) -> tuple[int, str, str]:
    """Run ``argv``; return (exit status, stdout, stderr) whatever the status, for tools
    that report findings in it (smartctl's status is a bit mask).  Raise CommandError
    only when it cannot run (not installed: status 127; not executable: 126) or times
    out."""
    try:
        p = subprocess.run(list(argv), capture_output=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise CommandError(argv, 127, f"{argv[0]}: command not found") from None
    except OSError as e:  # not executable by this user (EACCES on a directory of PATH)
        raise CommandError(argv, 126, f"{argv[0]}: {e.strerror}") from None
    except subprocess.TimeoutExpired:
        raise CommandError(argv, -1, f"timed out after {timeout} s") from None
    return (p.returncode, p.stdout.decode(errors="replace"),
            p.stderr.decode(errors="replace"))
