"""How `nbdgw status` looks on a terminal (rich: colours, tables, progress bars for
initial syncs and resyncs, ``--watch``), and the progress bars of the CLI's long work.

Nothing here decides anything: it renders gateway/status.py's report.  When stdout is
not a terminal the CLI prints status.render_text() instead, and progress() is silent.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console, Group
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

STATE_STYLE = {"in sync": "green", "streaming": "green", "initial-sync": "yellow",
               "resync": "yellow", "resync pending": "yellow", "degraded": "red",
               "disconnected": "red", "refused": "bold red", "split brain": "bold red"}
HEALTH_STYLE = {"ok": "green", "warning": "yellow", "critical": "bold red"}
FAILOVER_STYLE = {"primary": "bold green", "standby": "cyan", "witness": "cyan",
                  "fenced": "bold red", "stale": "red"}


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _header(report: dict[str, Any]) -> Text:
    t = Text()
    t.append(f"node {report['node']}", style="bold")
    role = report.get("role")
    if role:
        t.append(f"  role {role['effective']}")
        if role["configured"] != role["effective"]:
            t.append(f" (configured {role['configured']})", style="yellow")
        t.append(f"  epoch {role['epoch']}")
    fo = report.get("failover")
    if fo is None:
        t.append("  daemon: not running here", style="dim")
        return t
    t.append("  failover ")
    t.append(fo["state"], style=FAILOVER_STYLE.get(fo["state"], ""))
    if fo["age_s"] > 5:
        t.append(f" (daemon silent for {fo['age_s']} s)", style="red")
    q = fo.get("quorum")
    if q is not None and fo["auto"]:
        t.append(f"  quorum {q['heard']}/{q['sites']} ")
        t.append("majority" if q["majority"] else "NO MAJORITY",
                 style="green" if q["majority"] else "bold red")
    roles = fo.get("roles") or {}
    heard = ", ".join(f"{p}{' (witness)' if roles.get(p) == 'witness' else ''} "
                      f"{v['heard_s_ago']} s" for p, v in sorted(fo["peers"].items()))
    if heard:
        t.append(f"  heard: {heard}", style="dim")
    if fo.get("lease_s"):
        t.append(f"  lease {fo['lease_s']:.1f} s", style="dim")
    if roles.get(report["node"]) == "witness":
        v = fo.get("vote")
        t.append("  witness, no data; last vote "
                 + (f"epoch {v['epoch']} for {v['for'] or 'nobody'}" if v else "none yet"))
    if fo.get("outdated"):
        t.append(f"  outdated: {', '.join(fo['outdated'])} (not promotable until caught up)",
                 style="yellow")
    rejected = {k: v for k, v in (fo.get("beats_rejected") or {}).items() if v}
    if rejected:
        t.append("  beats refused: " + ", ".join(f"{k} {v}" for k, v in
                                                  sorted(rejected.items())), style="yellow")
    return t


def _volumes(report: dict[str, Any]) -> Table:
    t = Table(title="volumes", title_justify="left", expand=False)
    for col in ("volume", "size", "role", "clients NBD/iSCSI", "snapshots", "latest",
                "journal", "generation"):
        t.add_column(col, justify="right" if col in ("size", "journal") else "left")
    for v in report["volumes"]:
        role = v["role"]
        style = ""
        if role == "replica":
            role += " INCONSISTENT" if v["inconsistent"] else ""
            style = "red" if v["inconsistent"] else ""
        c = v.get("clients") or {}
        clients = ("-" if c.get("nbd") is None else str(c["nbd"])) + " / " + (
            "-" if c.get("iscsi") is None else str(c["iscsi"]))
        sn = v.get("snapshots") or {"count": 0, "latest": None}
        latest = "-" if sn["latest"] is None else (
            f"{sn['latest']['name']} "
            + time.strftime("%m-%d %H:%M", time.gmtime(sn["latest"]["time"])))
        g = v.get("generation")
        t.add_row(v["name"], human(v["size"]), Text(role, style=style), clients,
                  str(sn["count"]), latest, human(v["journal_bytes"]),
                  "-" if g is None else f"{g['id'][:8]}… @{g['start_seq']}")
    return t


def _peers(report: dict[str, Any]) -> Table | None:
    rows = [(v, p) for v in report["volumes"] for p in v["peers"]]
    if not rows:
        return None
    t = Table(title="peers", title_justify="left")
    for col in ("volume", "peer", "mode", "state", "lag", "lag s", "data-loss window",
                "last ack"):
        t.add_column(col, justify="right" if col.startswith(("lag", "data", "last")) else
                     "left")
    for v, p in rows:
        win = p.get("data_loss_window") or {"bytes": p["lag_bytes"]}
        state = p["state"] + (f" ({p['degraded']})" if p["degraded"] else "")
        pr = p.get("progress")
        if pr is not None:
            state += f" {pr['phase']} {100 * pr['done'] // max(1, pr['total'])}%"
        t.add_row(v["name"], p["name"], p["mode"] or "-",
                  Text(state, style=STATE_STYLE.get(p["state"], "")),
                  f"{p['lag_records']} rec, {human(p['lag_bytes'])}",
                  "-" if p["lag_seconds"] is None else f"{p['lag_seconds']:g}",
                  Text(human(win["bytes"]), style="green" if win["bytes"] == 0 else "yellow"),
                  "never" if p["last_ack_age_s"] is None else f"{p['last_ack_age_s']:g} s ago")
    return t


def _upstreams(report: dict[str, Any]) -> Table | None:
    rows = [v for v in report["volumes"] if v.get("upstream") is not None]
    if not rows:
        return None
    t = Table(title="replicated from", title_justify="left")
    for col in ("volume", "source", "state", "applied seq", "received seq", "lag"):
        t.add_column(col, justify="right" if col.endswith(("seq", "lag")) else "left")
    for v in rows:
        u = v["upstream"]
        t.add_row(v["name"], u["source"] or "-",
                  Text(u["state"], style="green" if u["state"] == "streaming" else "yellow"),
                  str(u["applied_seq"]),
                  "-" if u["received_seq"] is None else str(u["received_seq"]),
                  "-" if u["lag_records"] is None else f"{u['lag_records']} rec")
    return t


def _notes(report: dict[str, Any]) -> list[Text]:
    """What needs an operator, in words: a split brain (the daemon's record, or a link
    refused for one, with the commands that settle it), a refused link, writes of this
    node the current primary lacks and where they are kept."""
    from .status import diverged_lines, refusal_lines, render_text

    out = []
    h = report.get("health")
    if h is not None:
        from .health import summary_lines

        lines = summary_lines(h)
        out.append(Text(lines[0], style=HEALTH_STYLE.get(h["level"], "")))
        for p in h["problems"]:
            style = "bold red" if p["level"] == "critical" else "yellow"
            out.append(Text(f"  {p['message']}", style=style))
            out.append(Text(f"    what to do: {p['action']}", style="dim"))
    if report.get("split_brain") is not None:
        lines = render_text({**report, "role": None, "failover": None, "volumes": []})
        out += [Text(line, style="bold red") for line in lines[1:] if line != "  no volumes"]
    for v in report["volumes"]:
        out += [Text(f"volume {v['name']}: {line}", style="yellow")
                for line in diverged_lines(v)]
        for p in v["peers"]:
            out += [Text(f"volume {v['name']}, peer {p['name']}: {line}", style="bold red")
                    for line in refusal_lines(p)]
    return out


def render(report: dict[str, Any]) -> Group:
    parts: list[Any] = [_header(report), *_notes(report), _volumes(report)]
    for table in (_upstreams(report), _peers(report)):
        if table is not None:
            parts.append(table)
    return Group(*parts)


class _SyncBars:
    """Progress bars for peers in initial sync or resync, kept across refreshes."""

    def __init__(self) -> None:
        self.progress = _bars()
        self.tasks: dict[tuple[str, str], TaskID] = {}

    def update(self, report: dict[str, Any]) -> None:
        seen = set()
        for v in report["volumes"]:
            for p in v["peers"]:
                pr = p.get("progress")
                if pr is None:
                    continue
                key = (v["name"], p["name"])
                seen.add(key)
                if key not in self.tasks:
                    self.tasks[key] = self.progress.add_task(
                        f"{pr['phase']} {v['name']} -> {p['name']}", total=pr["total"],
                        unit=pr["unit"])
                self.progress.update(self.tasks[key], completed=pr["done"],
                                     total=pr["total"])
        for key in list(self.tasks):
            if key not in seen:
                self.progress.remove_task(self.tasks.pop(key))


def watch(console: Console, make_report: Callable[[], dict[str, Any]],
          interval: float) -> None:
    """Redraw the status every ``interval`` s until Ctrl-C."""
    from rich.live import Live

    bars = _SyncBars()
    report = make_report()
    bars.update(report)
    with Live(Group(render(report), bars.progress), console=console,
              refresh_per_second=4) as live, contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(interval)
            report = make_report()
            bars.update(report)
            live.update(Group(render(report), bars.progress))


class _Rate(ProgressColumn):
    """Units per second (extents, bytes), from rich's own speed estimate."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "")
        return Text("" if speed is None else f"{speed:,.1f} {unit}/s", style="cyan")


def _bars(console: Console | None = None) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    _Rate(), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=console, transient=False)


@contextlib.contextmanager
def progress(description: str, total: float | None, enabled: bool,
             unit: str = "extents") -> Iterator[Callable[[float, float | None], None]]:
    """A progress bar with rate and ETA for long CLI work, on stderr when it is a
    terminal (``enabled``), else nothing.  Yields ``update(done, total)``."""
    if not enabled:
        def ignore(done: float, total: float | None = None) -> None:
            return None

        yield ignore
        return
    with _bars(Console(stderr=True)) as bars:
        task = bars.add_task(description, total=total, unit=unit)

        def update(done: float, total: float | None = None) -> None:
            bars.update(task, completed=done, total=total)

        yield update
