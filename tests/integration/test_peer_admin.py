"""`nbdgw peer pause|resume|disconnect|connect` and `nbdgw resync --full` on a running
node: each takes effect at once on the real links, survives a restart of the node, and
ends with the replica bit-identical."""

from __future__ import annotations

import json
from typing import Any

from tests.integration.cluster import (  # the cluster of real daemons
    connect,
    in_sync,
    peer_state,
    wait_for,
    write_pattern,
)


def live(node: Any, peer: str) -> dict[str, Any]:
    path = node.data / "volumes" / "v1" / "peers" / f"{peer}.live.json"
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return {}


def test_pause_resume_disconnect_connect_and_a_full_resync(make_cluster: Any) -> None:
    main, dc, dr = make_cluster("fanout")
    for n in (dc, dr, main):
        n.start()
    h = connect(main)
    write_pattern(h, 50, 1)
    wait_for(lambda: in_sync(main, "dc") and in_sync(main, "dr"), 60, "both in sync")

    out = main.nbdgw("peer", "pause", "dc").stdout
    assert out.startswith("peer dc: paused (v1->dc)")
    wait_for(lambda: live(main, "dc").get("state") == "paused", 10, "dc paused")
    write_pattern(h, 50, 2)  # writes go on; dc trails, dr does not
    wait_for(lambda: in_sync(main, "dr"), 30, "dr in sync")
    assert peer_state(main, "dc")["lag_records"] > 0
    assert live(main, "dc")["admin"] == "paused"

    main.nbdgw("peer", "resume", "dc")
    wait_for(lambda: in_sync(main, "dc"), 30, "dc caught up after resume")

    main.nbdgw("peer", "disconnect", "dc")
    wait_for(lambda: live(main, "dc").get("state") == "disconnected", 10, "dc disconnected")
    write_pattern(h, 20, 3)
    h.shutdown()
    main.stop()  # the operator's word survives a restart of the node
    main.start()
    h = connect(main)
    wait_for(lambda: live(main, "dc").get("state") == "disconnected", 20, "still disconnected")
    assert live(main, "dc")["admin"] == "disconnected"
    assert peer_state(main, "dc")["lag_records"] > 0  # nothing was shipped to it
    main.nbdgw("peer", "connect", "dc")
    wait_for(lambda: in_sync(main, "dc"), 60, "dc in sync after connect")

    out = main.nbdgw("resync", "v1", "--peer", "dc", "--full").stdout
    assert "full resync to dc requested" in out
    wait_for(lambda: "an operator asked for a full resync" in main.log_text(), 30,
             "the full resync")
    wait_for(lambda: in_sync(main, "dc"), 60, "dc in sync after the full resync")
    h.shutdown()
    for n in (main, dc, dr):
        n.stop()
    assert main.checksum() == dc.checksum() == dr.checksum()
    audit = main.nbdgw("audit", "--json").stdout
    for what in ("peer pause", "peer resume", "peer disconnect", "peer connect", "resync"):
        assert what in audit


def test_unknown_peer_and_action_are_clear_errors(make_cluster: Any) -> None:
    main, _dc, _dr = make_cluster("fanout")
    p = main.nbdgw("peer", "pause", "nosuch", check=False)
    assert p.returncode != 0 and "'nosuch' is not a peer of main" in p.stderr
