# The "bare" nbdkit Python plugin: the floor for any Python data path.
#
#   nbdkit python bench/bare_plugin.py file=PATH [thread_model=serialize_all_requests]
#                                      [journal=PATH] [pin=1]
#
# Each request is one os.pwrite / os.preadv on a plain file and nothing else, so the
# gap between this and nbdkit's C `file` plugin is the cost of nbdkit's Python
# binding (GIL, buffer objects, callback dispatch), and the gap between nbdgw and this
# is the cost of nbdgw's own work (journal record, CRCs, activity log, checks).
# `thread_model` lets bench/datapath measure SERIALIZE_ALL_REQUESTS against PARALLEL.
# `journal` adds the one thing a journaled design cannot leave out: each write also
# appended, as a 44-byte header and the payload in one os.pwritev, to a second file that
# wraps at 64 MiB (as nbdgw recycles its segments): the floor of two page-cache copies,
# no record format, CRC or bookkeeping (bench/wcost).
# `pin=1` keeps the connection's Python thread state from open to close, as nbdgw's
# plugin does (nbd_plugin/threadstate.py, the same calls): without it nbdkit's
# Python binding builds and destroys one for every request.
import ctypes
import errno
import os
import threading

import nbdkit

API_VERSION = 2

_MODELS = {
    "serialize_connections": nbdkit.THREAD_MODEL_SERIALIZE_CONNECTIONS,
    "serialize_all_requests": nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS,
    "serialize_requests": nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS,
    "parallel": nbdkit.THREAD_MODEL_PARALLEL,
}

_path: str | None = None
_model: int = nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS
_fd = -1
_size = 0
_journal: str | None = None
_jfd = -1
_jpos = 0
_JOURNAL_WRAP = 64 * 1024 * 1024
_HEADER = bytes(44)
_pin = False
_pinned: dict[int, int] = {}
_ensure = ctypes.pythonapi.PyGILState_Ensure
_ensure.restype = ctypes.c_int
_release = ctypes.pythonapi.PyGILState_Release
_release.argtypes = [ctypes.c_int]


def config(key: str, value: str) -> None:
    global _path, _model, _journal, _pin
    if key == "file":
        _path = value
    elif key == "pin":
        _pin = value == "1"
    elif key == "journal":
        _journal = value
    elif key == "thread_model":
        if value not in _MODELS:
            raise ValueError(f"thread_model must be one of {', '.join(_MODELS)}, got {value!r}")
        _model = _MODELS[value]
    else:
        raise ValueError(f"unknown parameter {key!r} (known: file, thread_model, journal, pin)")


def config_complete() -> None:
    global _fd, _size, _jfd
    if _path is None:
        raise ValueError("missing required parameter file")
    _fd = os.open(_path, os.O_RDWR)
    _size = os.fstat(_fd).st_size
    if _journal is not None:
        _jfd = os.open(_journal, os.O_RDWR | os.O_CREAT, 0o600)


def thread_model() -> int:
    return _model


def open(readonly: bool) -> int:  # the callback's literal name
    if _pin:
        _pinned[threading.get_ident()] = _ensure()
    return _fd


def close(h: int) -> None:
    state = _pinned.pop(threading.get_ident(), None)
    if state is not None:
        _release(state)


def get_size(h: int) -> int:
    return _size


def can_multi_conn(h: int) -> bool:
    return True


def pread(h: int, buf: bytearray, offset: int, flags: int) -> None:
    if os.preadv(h, [buf], offset) != len(buf):
        nbdkit.set_error(errno.EIO)
        raise OSError(errno.EIO, "short read")


def pwrite(h: int, buf: bytes, offset: int, flags: int) -> None:
    if os.pwrite(h, buf, offset) != len(buf):
        nbdkit.set_error(errno.EIO)
        raise OSError(errno.EIO, "short write")
    if _jfd >= 0:
        _append(buf)


def _append(buf: bytes) -> None:
    global _jpos
    if _jpos + 44 + len(buf) > _JOURNAL_WRAP:
        _jpos = 0
    if os.pwritev(_jfd, [_HEADER, buf], _jpos) != 44 + len(buf):
        nbdkit.set_error(errno.EIO)
        raise OSError(errno.EIO, "short journal write")
    _jpos += 44 + len(buf)


def flush(h: int, flags: int) -> None:
    os.fdatasync(h)
    if _jfd >= 0:
        os.fdatasync(_jfd)
