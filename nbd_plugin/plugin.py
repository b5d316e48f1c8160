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

from gateway import logs  # noqa: E402
from nbd_plugin import iostats  # noqa: E402
from nbd_plugin.server import Params, PluginError, Server  # noqa: E402

API_VERSION = 2

_params = Params()
_server = None
_lock = None  # _server.lock, bound once: the snapshot control thread takes it too

_FUA = nbdkit.FLAG_FUA
_MAY_TRIM = nbdkit.FLAG_MAY_TRIM
_HOLE_ZERO = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
# I/O counters (nbd_plugin/iostats.py): a clock read before and one call after each
# successful request, on the handle's counters of that op (h.io[op]: 0 read, 1 write,
# 2 flush, 3 trim, 4 zero, as iostats.OPS); connections counted in open/close.
_clock = time.monotonic_ns
_io = iostats.count


# Errnos a client can act on pass through (NBD carries only a few); EDQUOT is a full
# disk to the client; anything else (ENOENT, EBADF: our own trouble) is an I/O error.
_PASS = {errno.ENOSPC, errno.EIO, errno.EINVAL, errno.ENOMEM, errno.EPERM, errno.EROFS,
         errno.EOVERFLOW, errno.ENOTSUP, errno.ESHUTDOWN}
_MAP = {errno.EDQUOT: errno.ENOSPC}


def _fail(e):
    err = getattr(e, "errno", None) or errno.EIO
    err = _MAP.get(err, err)
    nbdkit.set_error(err if err in _PASS else errno.EIO)


def config(key, value):
    _params.set(key, value)


def config_complete():
    global _server, _lock
    # Logs go to stderr as JSON lines: with `nbdkit -s` stdout carries the NBD protocol.
    logs.configure("json")
    logs.quiet_logged_errors()  # a write failed on a full disk: an event, no traceback
    try:
        _server = Server(_params)
        _lock = _server.lock
    except PluginError:
        raise
    except Exception as e:
        raise PluginError(f"cannot start: {e}") from e


def thread_model():
    # nbdkit asks after config_complete.  Without sync peers, measured (bench/datapath):
    # one request at a time beats parallel threads that only fight over the GIL; the work
    # per request is a few syscalls.  With sync peers every write waits for their ack:
    # requests run in parallel, each taking the server lock for its volume operation
    # only, so writes in flight wait together (group commit), never one behind another.
    if _server is not None and _server.gate is not None:
        return nbdkit.THREAD_MODEL_PARALLEL
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS


def cleanup():
    if _server is not None:
        _server.close()


def list_exports(readonly, is_tls):
    return _server.list_exports()


def default_export(readonly, is_tls):
    return _server.default_export()


def open(readonly):
    try:
        h = _server.open(nbdkit.export_name(), readonly)
    except OSError as e:
        _fail(e)
        raise
    h.io = iostats.opened(h.vol.name)
    return h


def close(h):
    iostats.closed(h.vol.name)
    _server.close_handle(h)


def export_description(h):
    return f"nbdgw {'snapshot' if '@' in h.vol.name else 'volume'} {h.vol.name}"


def get_size(h):
    return h.vol.size


def block_size(h):
    return (1, 4096, 32 * 1024 * 1024)


def is_rotational(h):
    return False


def can_write(h):
    return not h.readonly


def can_flush(h):
    return True


def can_trim(h):
    return not h.readonly


def can_zero(h):
    return not h.readonly


def can_fast_zero(h):
    return not h.readonly


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_multi_conn(h):
    # Safe: every connection shares one Volume, and FLUSH syncs its one journal.
    return True


def can_extents(h):
    return True


def can_cache(h):
    return nbdkit.CACHE_NONE


def pread(h, buf, offset, flags):
    t = _clock()
    try:
        with _lock:
            h.vol.read_into(buf, offset)
            _io(h.io[0], len(buf), _clock() - t)
    except OSError as e:
        _fail(e)
        raise


# Writes: the volume operation under the lock; then, with sync peers (h.gate), the wait
# for their acks outside it, and the count under it again (requests run in parallel).

def pwrite(h, buf, offset, flags):
    t = _clock()
    try:
        h.check_lease()
        with _lock:
            seq = h.vol.write(buf, offset, flags & _FUA)
            if h.gate is None:
                _io(h.io[1], len(buf), _clock() - t)
                return
        h.replicated(seq)
    except OSError as e:
        _fail(e)
        raise
    with _lock:
        _io(h.io[1], len(buf), _clock() - t)


def flush(h, flags):
    t = _clock()
    try:
        with _lock:
            h.vol.flush()
            if h.gate is None:
                _io(h.io[2], 0, _clock() - t)
                return
            seq = h.vol.last_seq
        h.replicated(seq, write=False)
    except OSError as e:
        _fail(e)
        raise
    with _lock:
        _io(h.io[2], 0, _clock() - t)


def trim(h, count, offset, flags):
    t = _clock()
    try:
        h.check_lease()
        with _lock:
            seq = h.vol.trim(offset, count, flags & _FUA)
            if h.gate is None:
                _io(h.io[3], count, _clock() - t)
                return
        h.replicated(seq)
    except OSError as e:
        _fail(e)
        raise
    with _lock:
        _io(h.io[3], count, _clock() - t)


def zero(h, count, offset, flags):
    t = _clock()
    try:
        h.check_lease()
        with _lock:
            seq = h.vol.zero(offset, count, flags & _MAY_TRIM, flags & _FUA)
            if h.gate is None:
                _io(h.io[4], count, _clock() - t)
                return
        h.replicated(seq)
    except OSError as e:
        _fail(e)
        raise
    with _lock:
        _io(h.io[4], count, _clock() - t)


def extents(h, count, offset, flags):
    try:
        with _lock:
            found = h.vol.extents(offset, count)
        return [(o, n, 0 if alloc else _HOLE_ZERO) for o, n, alloc in found]
    except OSError as e:
        _fail(e)
        raise
