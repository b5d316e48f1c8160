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

from nbd_plugin import iostats  # noqa: E402
from nbd_plugin.server import Params, PluginError, Server  # noqa: E402
from nbdgw_common import logs  # noqa: E402

API_VERSION = 2

_params = Params()
_server = None

_FUA = nbdkit.FLAG_FUA
_MAY_TRIM = nbdkit.FLAG_MAY_TRIM
_HOLE_ZERO = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
# I/O counters (nbd_plugin/iostats.py): a clock read before and Handle.count after each
# successful request, on the connection's counters of that op (0 read, 1 write, 2 flush,
# 3 trim, 4 zero, as iostats.OPS); connections counted in open/close.
_clock = time.monotonic_ns


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


def thread_model():
    # nbdkit asks after config_complete.  Connections never wait for each other in
    # nbdkit (SERIALIZE_ALL_REQUESTS held its one lock across every handshake: a silent
    # connection froze every volume); each request takes its volume's lock for the
    # volume operation only (DESIGN.md §9).  Within a connection, without sync peers,
    # one request at a time: measured (bench/datapath), parallel threads of one
    # connection only fight over the GIL.  With sync peers every write waits for their
    # ack: a connection's requests run in parallel, so that writes in flight wait
    # together (group commit), never one behind another.
    if _server is not None and _server.gate is not None:
        return nbdkit.THREAD_MODEL_PARALLEL
    return nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS


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
    iostats.closed(h.vol.name, h.io)
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
        with h.lock:
            h.vol.read_into(buf, offset)
    except OSError as e:
        _fail(e)
        raise
    h.count(0, len(buf), t)


# Writes: the volume operation under the volume's lock; FUA's fdatasync and, with sync
# peers (h.gate), the wait for their acks outside it (other requests go on meanwhile).

def pwrite(h, buf, offset, flags):
    t = _clock()
    try:
        h.check_lease()
        with h.lock:
            seq = h.vol.write(buf, offset)
        h.written(seq, flags & _FUA)
    except OSError as e:
        _fail(e)
        raise
    h.count(1, len(buf), t)


def flush(h, flags):
    t = _clock()
    try:
        h.flushed()
    except OSError as e:
        _fail(e)
        raise
    h.count(2, 0, t)


def trim(h, count, offset, flags):
    t = _clock()
    try:
        h.check_lease()
        with h.lock:
            seq = h.vol.trim(offset, count)
        h.written(seq, flags & _FUA)
    except OSError as e:
        _fail(e)
        raise
    h.count(3, count, t)


def zero(h, count, offset, flags):
    t = _clock()
    try:
        h.check_lease()
        with h.lock:
            seq = h.vol.zero(offset, count, flags & _MAY_TRIM)
        h.written(seq, flags & _FUA)
    except OSError as e:
        _fail(e)
        raise
    h.count(4, count, t)


def extents(h, count, offset, flags):
    try:
        with h.lock:
            found = h.vol.extents(offset, count)
        return [(o, n, 0 if alloc else _HOLE_ZERO) for o, n, alloc in found]
    except OSError as e:
        _fail(e)
        raise
