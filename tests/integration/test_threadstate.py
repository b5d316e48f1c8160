"""Each NBD connection keeps one Python thread state from open to close
(nbd_plugin/threadstate.py), and gives it back however the connection ends.  (With sync
peers nbdkit's workers keep theirs too: test_sync_replication.py.)

Real `nbdgw serve` with nbdkit and libnbd clients; the plugin's own counters are read
through the control socket's ``stats`` op: ``pinned`` (thread states kept now) and
``lost`` (connections whose state was rebuilt between open and close all the same).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import nbd
import pytest

from blockstore.volume import volumes_dir
from nbdgw_common import control_socket as control
from tests.conftest import Served, run_nbdgw


def thread_states(s: Served) -> dict[str, int]:
    reply = control.request(volumes_dir(s.data_dir) / "v1", {"op": "stats"})
    return reply["thread_states"]  # type: ignore[no-any-return]


def settled(s: Served, pinned: int, timeout: float = 10) -> dict[str, int]:
    """The counters once ``pinned`` is reached (nbdkit closes a handle shortly after
    its client has gone), or as they stand at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        got = thread_states(s)
        if got["pinned"] == pinned or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


@pytest.fixture
def served(data_dir: Path) -> Served:
    for v in ("v1", "v2"):
        run_nbdgw("volume", "create", v, "--size", "16M", "--data-dir", str(data_dir))
    s = Served(data_dir, [])
    yield s
    s.stop()


def test_a_connection_keeps_its_thread_state_for_all_its_requests(served: Served) -> None:
    a, b = nbd.NBD(), nbd.NBD()
    a.connect_uri(served.uri("v1"))
    assert settled(served, 1) == {"pinned": 1, "workers": 0, "lost": 0}
    b.connect_uri(served.uri("v2"))
    assert settled(served, 2) == {"pinned": 2, "workers": 0, "lost": 0}
    blocks = {i: os.urandom(4096) for i in range(0, 4096, 7)}
    for i, data in blocks.items():
        a.pwrite(data, i * 4096)
        b.pwrite(data[::-1], i * 4096)
    a.flush()
    for i, data in blocks.items():
        assert a.pread(4096, i * 4096) == data
        assert b.pread(4096, i * 4096) == data[::-1]
    assert thread_states(served) == {"pinned": 2, "workers": 0, "lost": 0}
    a.shutdown()
    assert settled(served, 1) == {"pinned": 1, "workers": 0, "lost": 0}
    b.shutdown()
    assert settled(served, 0) == {"pinned": 0, "workers": 0, "lost": 0}


def test_thread_states_are_given_back_however_connections_end(served: Served) -> None:
    for i in range(40):
        h = nbd.NBD()
        h.connect_uri(served.uri("v1" if i % 2 else "v2"))
        h.pwrite(bytes([i]) * 4096, 4096 * i)
        if i % 3 == 0:
            h.shutdown()  # NBD_CMD_DISC
        del h  # otherwise the socket just closes: a client that vanished
    # An export that does not exist fails in open: nothing was kept for it.
    bad = nbd.NBD()
    with pytest.raises(nbd.Error):
        bad.connect_uri(served.uri("nosuch"))
    del bad
    assert settled(served, 0) == {"pinned": 0, "workers": 0, "lost": 0}
    h = nbd.NBD()
    h.connect_uri(served.uri("v1"))
    assert all(h.pread(4096, 4096 * i) == bytes([i]) * 4096 for i in range(1, 40, 2))
    h.shutdown()
    assert settled(served, 0) == {"pinned": 0, "workers": 0, "lost": 0}
