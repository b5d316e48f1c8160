"""``python -m peerlink receive|send``: run one end of a replication link in the foreground.

    python -m peerlink receive --data-dir D --volume V --listen HOST:PORT [--secret-file F]
    python -m peerlink send --data-dir D --volume V --peer NAME=HOST:PORT [--secret-file F]
                            [--rate-limit RATE]

The receiver prints ``peerlink: listening on HOST:PORT`` (the real port when asked for 0)
once it accepts connections.  SIGTERM or SIGINT stops either end cleanly (the receiver
closes its volume).  Logs are JSON lines on stderr.  The work is done by ``Receiver`` and
``Sender``; this module only parses arguments, sets up logging, signals and uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import ssl
import sys
from collections.abc import Callable
from pathlib import Path

import structlog
import uvloop

from blockstore.errors import BlockstoreError
from nbdgw_common.logs import configure

from .auth import MIN_SECRET
from .errors import PeerlinkError
from .link import format_addr, parse_addr
from .ratelimit import RateSchedule, RateWindow, parse_rate, window
from .receiver import Receiver
from .sender import Sender, SenderConfig
from .tls import client_context, server_context

log = structlog.get_logger(component="peerlink")


def read_secret(path: Path) -> bytes:
    """The shared secret: the file's bytes without surrounding whitespace."""
    secret = path.read_bytes().strip()
    if len(secret) < MIN_SECRET:
        raise ValueError(f"secret file {path}: the secret must be at least {MIN_SECRET} "
                         f"bytes, got {len(secret)}")
    return secret


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m peerlink", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=Path, required=True)
    common.add_argument("--volume", required=True)
    common.add_argument("--secret-file", type=Path, default=None)
    common.add_argument("--tls-cert", type=Path, default=None,
                        help="this node's certificate (PEM); with --tls-key and --tls-ca: "
                             "mutual TLS, both ends signed by the cluster's CA")
    common.add_argument("--tls-key", type=Path, default=None)
    common.add_argument("--tls-ca", type=Path, default=None)
    common.add_argument("--node", default=socket.gethostname(),
                        help="this node's name (default: the host name)")
    common.add_argument("--timeout", type=float, default=15.0,
                        help="liveness timeout in seconds (no complete frame)")
    r = sub.add_parser("receive", parents=[common], help="listen and apply to a replica")
    r.add_argument("--listen", required=True, help="HOST:PORT (port 0: any free port)")
    r.add_argument("--role", choices=["secondary", "dr"], default="secondary")
    s = sub.add_parser("send", parents=[common], help="ship the journal to a peer")
    s.add_argument("--peer", required=True, help="NAME=HOST:PORT")
    s.add_argument("--batch-bytes", type=int, default=SenderConfig.batch_bytes)
    s.add_argument("--window-bytes", type=int, default=SenderConfig.window_bytes)
    s.add_argument("--compress", type=int, default=SenderConfig.compress,
                   help="zstd level, 0 = off (default 3)")
    s.add_argument("--max-backoff", type=float, default=SenderConfig.max_backoff)
    s.add_argument("--rate-limit", type=_rate, default=0, metavar="RATE",
                   help="bandwidth cap on the wire, bytes per second: a whole number with an "
                        "optional binary unit K, M, G (K = 1024), '/s' optional, any value "
                        "(no 4096 multiple needed), e.g. 10M or 512K/s; 0 = unlimited "
                        "(default); counted after compression")
    s.add_argument("--rate-window", type=_rate_window, action="append", default=[],
                   metavar="'DAYS HH:MM-HH:MM RATE'",
                   help="another cap inside a window of local time, e.g. 'mon-fri "
                        "08:00-18:00 20M' (repeatable; the first that covers the minute "
                        "wins; --rate-limit outside them)")
    s.add_argument("--rate-burst", type=_rate, default=None, metavar="SIZE",
                   help="token bucket size in bytes, same units (default: a quarter second "
                        "of the rate, at least 64K)")
    return p


def _tls(args: argparse.Namespace,
         make: Callable[[Path, Path, Path], ssl.SSLContext]) -> ssl.SSLContext | None:
    files = (args.tls_cert, args.tls_key, args.tls_ca)
    if not any(files):
        return None
    if not all(files):
        raise ValueError("TLS needs all three of --tls-cert, --tls-key and --tls-ca")
    return make(args.tls_cert, args.tls_key, args.tls_ca)


def _rate(text: str) -> int:
    try:
        return parse_rate(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _rate_window(text: str) -> RateWindow:
    try:
        days, span, rate = text.split()
        start, _, end = span.partition("-")
        return window(days, start, end, rate)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"--rate-window {text!r}: {e} (expected 'DAYS HH:MM-HH:MM RATE', e.g. "
            f"'mon-fri 08:00-18:00 20M')") from None


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def receive(args: argparse.Namespace, secret: bytes | None) -> int:
    host, port = parse_addr(args.listen, "--listen")
    stop = asyncio.Event()
    _stop_on_signals(stop)
    rx = Receiver(args.data_dir, args.volume, node=args.node, role=args.role, secret=secret,
                  timeout=args.timeout, tls=_tls(args, server_context))
    try:
        bound = await rx.start(host, port)
        print(f"peerlink: listening on {format_addr(*bound)}", flush=True)
        stopper = asyncio.get_running_loop().create_task(stop.wait())
        failed = asyncio.get_running_loop().create_task(rx.failed.wait())
        await asyncio.wait([stopper, failed], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        failed.cancel()
    finally:
        await rx.close()
    return 1 if rx.fatal is not None else 0


async def send(args: argparse.Namespace, secret: bytes | None) -> int:
    name, sep, addr = args.peer.partition("=")
    if not sep or not name:
        raise ValueError(f"--peer: expected NAME=HOST:PORT, got {args.peer!r}")
    host, port = parse_addr(addr, "--peer")
    cfg = SenderConfig(timeout=args.timeout, ping_interval=min(2.0, args.timeout / 3),
                       batch_bytes=args.batch_bytes, window_bytes=args.window_bytes,
                       compress=args.compress, max_backoff=args.max_backoff,
                       rate_limit=args.rate_limit, rate_burst=args.rate_burst or None,
                       rate_schedule=(RateSchedule(tuple(args.rate_window), args.rate_limit)
                                      if args.rate_window else None))
    stop = asyncio.Event()
    _stop_on_signals(stop)
    tx = Sender(args.data_dir, args.volume, node=args.node, peer=name, host=host, port=port,
                secret=secret, config=cfg, tls=_tls(args, client_context))
    print(f"peerlink: sending volume {args.volume} to {name} at {format_addr(host, port)}",
          flush=True)
    await tx.run(stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure(fmt="json")
    try:
        secret = read_secret(args.secret_file) if args.secret_file else None
        runner = receive if args.cmd == "receive" else send
        return uvloop.run(runner(args, secret))
    except (BlockstoreError, PeerlinkError, ValueError, OSError) as e:
        log.error("peerlink_failed", error=str(e))
        print(f"peerlink: error: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
