# The file nbdkit loads (`nbdkit python .../nbd_plugin/plugin.py data_dir=DIR ...`).
# A shim: the literal nbdkit callbacks, each a line or two over nbd_plugin.server.
# nbdkit embeds /usr/bin/python3; NBDGW_SITE names the venv's site-packages so that
# the project and its dependencies import (set by `nbdgw serve`).
import errno
import os
import site
import time

for _d in filter(None, os.environ.get("NBDGW_SITE", "").split(os.pathsep)):
    site.addsitedir(_d)

import nbdkit  # noqa: E402  (provided by nbdkit's embedded interpreter)

from blockstore.clone import Clone  # noqa: E402
from nbd_plugin import iostats, threadstate  # noqa: E402
from nbd_plugin.handle import Handle  # noqa: E402
from nbd_plugin.server import Params, PluginError, Server  # noqa: E402
from nbdgw_common import logs  # noqa: E402

API_VERSION = 2

_params = Params()
_server: Server | None = None

_FUA = nbdkit.FLAG_FUA
_MAY_TRIM = nbdkit.FLAG_MAY_TRIM
_HOLE_ZERO = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
_PARALLEL: int = nbdkit.THREAD_MODEL_PARALLEL
_SERIALIZE_REQUESTS: int = nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS
_FUA_NATIVE: int = nbdkit.FUA_NATIVE
_CACHE_NONE: int = nbdkit.CACHE_NONE
# I/O counters (nbd_plugin/iostats.py): a clock read before and Handle.count after each
# successful request, on the connection's counters of that op (0 read, 1 write, 2 flush,
# 3 trim, 4 zero, as iostats.OPS); connections counted in open/close.
_clock = time.monotonic_ns


# Errnos a client can act on pass through (NBD carries only a few); EDQUOT is a full
# disk to the client; anything else (ENOENT, EBADF: our own trouble) is an I/O error.
_PASS = {errno.ENOSPC, errno.EIO, errno.EINVAL, errno.ENOMEM, errno.EPERM, errno.EROFS,
         errno.EOVERFLOW, errno.ENOTSUP, errno.ESHUTDOWN}
_MAP = {errno.EDQUOT: errno.ENOSPC}


def _fail(e: BaseException) -> None:
    err = getattr(e, "errno", None) or errno.EIO
    err = _MAP.get(err, err)
    nbdkit.set_error(err if err in _PASS else errno.EIO)


def config(key: str, value: str) -> None:
    _params.set(key, value)


def config_complete() -> None:
    global _server
    # Logs go to stderr as JSON lines: with `nbdkit -s` stdout carries the NBD protocol.
    logs.configure("json")
    logs.quiet_logged_errors()  # a write failed on a full disk: an event, no traceback
    try:
        _server = Server(_params)
    except PluginError:
        raise
    except Exception as e:
        raise PluginError(f"cannot start: {e}") from e


def thread_model() -> int:
    # nbdkit asks after config_complete.  Connections never wait for each other in
    # nbdkit (SERIALIZE_ALL_REQUESTS held its one lock across every handshake: a silent
    # connection froze every volume); each request takes its volume's lock for the
    # volume operation only (DESIGN.md §9).  Within a connection, without sync peers,
    # one request at a time: measured (bench/datapath), parallel threads of one
    # connection only fight over the GIL.  With sync peers every write waits for their
    # ack: a connection's requests run in parallel, so that writes in flight wait
    # together (group commit), never one behind another.
    if _server is not None and _server.gate is not None:
        return _PARALLEL
    return _SERIALIZE_REQUESTS


def cleanup() -> None:
    if _server is not None:
        _server.close()


def _served() -> Server:
    assert _server is not None, "nbdkit calls config_complete first"
    return _server


def list_exports(readonly: bool, is_tls: bool) -> list[tuple[str, str]]:
    return _served().list_exports()


def default_export(readonly: bool, is_tls: bool) -> str:
    return _served().default_export()


def open(readonly: bool) -> Handle:
    try:
        h = _served().open(nbdkit.export_name(), readonly)
    except OSError as e:
        _fail(e)
        raise
    h.io = iostats.opened(h.vol.name)
    # This thread's Python thread state lives until close: not rebuilt for each
    # request (nbd_plugin/threadstate.py); with sync peers, those of nbdkit's workers too.
    threadstate.pin()
    if h.gate is not None:
        h.workers = threadstate.Workers()
    return h


def close(h: Handle) -> None:
    try:
        iostats.closed(h.vol.name, h.io)
        _served().close_handle(h)
    finally:
        if h.workers is not None:
            h.workers.release()
        threadstate.unpin()


def export_description(h: Handle) -> str:
    kind = ("clone" if isinstance(h.vol, Clone) else
            "snapshot" if "@" in h.vol.name else "volume")
    return f"nbdgw {kind} {h.vol.name}"


def get_size(h: Handle) -> int:
    return h.vol.size


def block_size(h: Handle) -> tuple[int, int, int]:
    return (1, 4096, 32 * 1024 * 1024)


def is_rotational(h: Handle) -> bool:
    return False


def can_write(h: Handle) -> bool:
    return not h.readonly


def can_flush(h: Handle) -> bool:
    return True


def can_trim(h: Handle) -> bool:
    return not h.readonly


def can_zero(h: Handle) -> bool:
    return not h.readonly


def can_fast_zero(h: Handle) -> bool:
    # A clone writes its zeros (a hole would show its base): not fast.
    return not h.readonly and not isinstance(h.vol, Clone)


def can_fua(h: Handle) -> int:
    return _FUA_NATIVE


def can_multi_conn(h: Handle) -> bool:
    # Safe: every connection shares one Volume, and FLUSH syncs its one journal.
    return True


def can_extents(h: Handle) -> bool:
    return True


def can_cache(h: Handle) -> int:
    return _CACHE_NONE


def pread(h: Handle, buf: bytearray, offset: int, flags: int) -> None:
    t = _clock()
    if h.workers is not None:
        h.workers.pin()
    try:
        with h.lock:
            h.vol.read_into(buf, offset)
    except OSError as e:
        _fail(e)
        raise
    h.count(0, len(buf), t)


# Writes: the volume operation under the volume's lock; FUA's fdatasync and, with sync
# peers (h.gate), the wait for their acks outside it (other requests go on meanwhile).

def pwrite(h: Handle, buf: bytes | memoryview, offset: int, flags: int) -> None:
    # The hot path of every write: the lease check and written() only when they have
    # something to do (each call is a cold Python frame per request: bench/wcost).
    t = _clock()
    if h.workers is not None:
        h.workers.pin()
    try:
        if h.lease is not None:
            h.check_lease()
        with h.lock:
            seq = h.writable.write(buf, offset)
        if flags & _FUA or h.gate is not None:
            h.written(seq, flags & _FUA)
    except OSError as e:
        _fail(e)
        raise
    h.count(1, len(buf), t)


def flush(h: Handle, flags: int) -> None:
    t = _clock()
    if h.workers is not None:
        h.workers.pin()
    try:
        h.flushed()
    except OSError as e:
        _fail(e)
        raise
    h.count(2, 0, t)


def trim(h: Handle, count: int, offset: int, flags: int) -> None:
    t = _clock()
    try:
        h.check_lease()
        with h.lock:
            seq = h.writable.trim(offset, count)
        h.written(seq, flags & _FUA)
    except OSError as e:
        _fail(e)
        raise
    h.count(3, count, t)


def zero(h: Handle, count: int, offset: int, flags: int) -> None:
    t = _clock()
    try:
        h.check_lease()
        with h.lock:
            seq = h.writable.zero(offset, count, flags & _MAY_TRIM)
        h.written(seq, flags & _FUA)
    except OSError as e:
        _fail(e)
        raise
    h.count(4, count, t)


def extents(h: Handle, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    try:
        with h.lock:
            found = h.vol.extents(offset, count)
        return [(o, n, 0 if alloc else _HOLE_ZERO) for o, n, alloc in found]
    except OSError as e:
        _fail(e)
        raise
