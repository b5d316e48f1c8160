"""Exec a program with inherited listening sockets in systemd socket-activation form.

``python -m gateway.sockact FD[,FD...] PROGRAM ARG...`` moves the given descriptors to
3, 4, ..., sets LISTEN_FDS and LISTEN_PID (the pid stays the same across exec), and
execs PROGRAM.  This lets `nbdgw serve` bind every listen address itself (port 0 works,
several addresses work) and hand them all to one nbdkit process.
"""

from __future__ import annotations

import fcntl
import os
import sys


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit("usage: python -m gateway.sockact FD[,FD...] PROGRAM ARG...")
    fds = [int(x) for x in argv[0].split(",") if x]
    # Out of the way of 3.. first (F_DUPFD: a number >= 100, never one of the targets,
    # so the dup2 below never lands a descriptor on itself and then closes it).
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100 + len(fds)) for fd in fds]
    for fd in fds:
        os.close(fd)
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i, inheritable=True)
        os.close(fd)
    env = dict(os.environ, LISTEN_FDS=str(len(fds)), LISTEN_PID=str(os.getpid()))
    os.execvpe(argv[1], argv[1:], env)


if __name__ == "__main__":
    main(sys.argv[1:])
