"""The metric list (deploy/METRICS.md) and the Grafana dashboard match what the
collector exports: every exported family is documented, every family a dashboard query
uses exists; the latency buckets are exact powers of two."""

from __future__ import annotations

import json
import re
from pathlib import Path

from gateway.metrics import BUCKET_BITS, histogram_buckets

ROOT = Path(__file__).resolve().parents[2]
SOURCE = (ROOT / "gateway" / "metrics.py").read_text()
FAMILIES = set(re.findall(r'MetricFamily\(\s*"(nbdgw_[a-z_]+)"', SOURCE))
COUNTERS = set(re.findall(r'CounterMetricFamily\(\s*"(nbdgw_[a-z_]+)"', SOURCE))


def exported() -> set[str]:
    return {f"{f}_total" if f in COUNTERS else f for f in FAMILIES}


def test_every_metric_is_documented() -> None:
    doc = (ROOT / "deploy" / "METRICS.md").read_text()
    documented = set(re.findall(r"^\| `(nbdgw_[a-z_]+)` \|", doc, re.MULTILINE))
    assert len(FAMILIES) >= 20
    assert documented == exported()


def test_dashboard_queries_use_exported_metrics() -> None:
    dash = json.loads((ROOT / "deploy" / "grafana" / "nbdgw.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs
            for m in re.findall(r"nbdgw_[a-z_]+", e)}
    assert used <= exported(), used - exported()
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_histogram_buckets_are_cumulative_powers_of_two() -> None:
    hist = [0] * 64
    hist[0] = 1          # 0 ns
    hist[11] = 2         # 1024..2047 ns
    hist[20] = 3         # ~0.5..1 ms
    hist[40] = 4         # ~9 minutes: only in +Inf
    b = histogram_buckets(hist)
    assert b[0] == ("1.024e-06", 1.0)
    assert dict(b)["2.048e-06"] == 3.0
    assert dict(b)["0.001048576"] == 6.0
    assert b[-2] == (f"{(1 << BUCKET_BITS[-1]) / 1e9:.9g}", 6.0)
    assert b[-1] == ("+Inf", 10.0)
