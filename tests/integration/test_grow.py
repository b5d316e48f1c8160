"""`nbdgw volume grow` on a live, replicated volume under load: the writer sees no error,
a new connection sees the new size and writes into it, every site ends bit-identical
and the same size."""

from __future__ import annotations

import json
import threading
from typing import Any

from tests.integration.cluster import (  # the cluster of real daemons
    SIZE,
    connect,
    in_sync,
    wait_for,
)


def test_grow_a_replicated_volume_under_load(make_cluster: Any) -> None:  # noqa: PLR0915
    main, dc, dr = make_cluster("fanout")
    for n in (dc, dr, main):
        n.start()
    h = connect(main)
    stop, errors, count = threading.Event(), [], [0]

    def writer() -> None:
        import nbd

        w = connect(main)
        i = 0
        try:
            while not stop.is_set():
                w.pwrite(bytes([i % 251]) * 65536, (i * 65536) % SIZE)
                i += 1
                count[0] = i
                if i % 8 == 0:
                    w.flush()
        except nbd.Error as e:
            errors.append(str(e))
        finally:
            count[0] = i
            w.shutdown()

    t = threading.Thread(target=writer)
    t.start()
    try:
        wait_for(lambda: count[0] > 0 or not t.is_alive(), 5, "writes")
        new = 2 * SIZE
        out = main.nbdgw("volume", "grow", "v1", str(new)).stdout
        assert f"({new} bytes)" in out
        assert h.get_size() == SIZE  # an open connection keeps the size it opened with
        h.shutdown()
        h = connect(main)
        assert h.get_size() == new  # a new one sees the new size
        tail = bytes(range(256)) * 256
        h.pwrite(tail, new - len(tail))
        h.flush()
        p = main.nbdgw("volume", "grow", "v1", str(SIZE), check=False)
        assert p.returncode != 0 and "a volume can only grow" in p.stderr
        p = dc.nbdgw("volume", "grow", "v1", str(4 * SIZE), check=False)
        assert p.returncode != 0 and "grow it on its primary" in p.stderr
    finally:
        stop.set()
        t.join(30)
    assert errors == [], errors
    h.shutdown()
    wait_for(lambda: in_sync(main, "dc") and in_sync(main, "dr"), 60, "both in sync")
    for n in (main, dc, dr):
        n.stop()
    sizes = {n.name: json.loads((n.data / "volumes" / "v1" / "volume.json").read_text())[
        "size"] for n in (main, dc, dr)}
    assert sizes == {"main": new, "dc": new, "dr": new}
    assert main.checksum() == dc.checksum() == dr.checksum()
    audit = main.nbdgw("audit", "--json").stdout
    assert "volume grow" in audit
