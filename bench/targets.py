"""Every target of the benchmark in one table.

Each part of the bench records the figures it measured here (var/bench/targets.json,
merged by key), and every run ends by printing the whole table: each figure with its
target and "met" / "NOT met", when and by which command it was measured, or "not
measured" when no run has measured it yet. Parts run alone (`--only ...`, a separate
script) still add to one table.

    .venv/bin/python -m bench.targets        # print the table of the last runs
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FILE = REPO / "var" / "bench" / "targets.json"


@dataclass(frozen=True)
class Target:
    key: str
    label: str
    unit: str
    bound: float | None = None   # None: a figure reported beside the targets, no bound
    lower_is_better: bool = True

    def verdict(self, value: float | None) -> str:
        if value is None:
            return "not measured"
        if self.bound is None:
            return ""
        ok = value <= self.bound if self.lower_is_better else value >= self.bound
        return "met" if ok else "NOT met"

    def target_text(self) -> str:
        if self.bound is None:
            return "(reported)"
        return f"{'<=' if self.lower_is_better else '>='} {self.bound:g} {self.unit}".rstrip()


TARGETS = [
    # 1. The cost of each call.
    Target("call_daemon_cpu_ms", "daemon CPU per call (route + hangup), paired driver", "ms", 0.6),
    Target("call_postgres_cpu_ms", "PostgreSQL CPU per call, paired driver", "ms", 0.2),
    Target("call_ratio_minimal", "highest clean rate, callctl / minimal FastAGI (Asterisk)", "", 0.95, False),
    Target("call_ratio_floor", "highest clean rate, callctl / plain durable floor (Asterisk)", ""),
    Target("call_ratio_freeswitch", "highest clean rate, callctl / minimal ESL (FreeSWITCH)", "", 0.95, False),
    Target("decision_p99_ms_1m", "decision p99 through the lab, 1M bindings", "ms", 5.0),
    # 2. API provisioning.
    Target("api_binds_per_s", "API binds/s, 1M bindings present", "/s", 2000, False),
    Target("api_p99_ms_at_500", "API bind p99 at 500 binds/s offered", "ms", 20.0),
    # 3. Scale in bindings.
    Target("inprocess_p99_ms_1m", "in-process decision p99, 1M bindings", "ms", 5.0),
    Target("inprocess_p99_ms_10m", "in-process decision p99, 10M bindings", "ms", 5.0),
    Target("decision_p99_ms_10m", "decision p99 through the lab, 10M bindings", "ms", 5.0),
    Target("bulk_10m_over_1m", "bulk bind speed at 10M / at 1M", "", 0.8, False),
    Target("daemon_rss_growth_10m", "daemon memory at 10M / at 1M (RSS after the calls)", "", 1.1),
    Target("database_size_gb_10m", "database size with 10M bindings", "GB"),
    # 4. Detection latency.
    Target("detection_p95_s", "CDR crossing a threshold -> block in force, p95, 1,000 CDR/s", "s", 5.0),
    Target("detection_job_cpu_share", "anomaly --follow CPU share of one core at 1,000 CDR/s", ""),
    # 5. Kept.
    Target("bulk_binds_per_s", "bulk bind (callctl bind --bulk), 1M bindings present", "/s", 5000, False),
    Target("anomaly_pass_s_10m", "anomaly pass over 10M CDRs", "s", 60.0),
    Target("inprocess_axe_p99_ms", "in-process AXE first call p99, 10,000 customers on X", "ms", 5.0),
    Target("inprocess_axb_p99_ms", "in-process AXB party call p99, 10,000 pairs on X", "ms", 5.0),
    # 6. Webhooks: a dead endpoint never slows a call (bench/webhook_bench.py).
    Target("webhook_down_p99_ratio", "call setup p99, webhook receiver down / none (median of rounds)", "", 1.1),
]
BY_KEY = {t.key: t for t in TARGETS}


def _load() -> dict:
    try:
        return json.loads(FILE.read_text())
    except (OSError, ValueError):
        return {}


def record(key: str, value: float | None, note: str = "") -> None:
    """Keep one measured figure (replacing an older one of the same key)."""
    if key not in BY_KEY:
        raise KeyError(f"unknown bench target {key!r}")
    figures = _load()
    figures[key] = {
        "value": value, "note": note,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0]) if sys.argv else "", *sys.argv[1:]]).strip(),
    }
    FILE.parent.mkdir(parents=True, exist_ok=True)
    tmp = FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(figures, indent=2) + "\n")
    tmp.replace(FILE)


def table() -> str:
    figures = _load()
    lines = ["", "=" * 100, "callctl targets (each figure from its latest measurement; var/bench/targets.json)", "=" * 100]
    for t in TARGETS:
        f = figures.get(t.key, {})
        value = f.get("value")
        shown = "-" if value is None else f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        when = f" [{f['measured_at'][:16].replace('T', ' ')}]" if f else ""
        lines.append(f"{t.label:<66} {shown:>9} {t.unit:<3} {t.target_text():<12} {t.verdict(value)}{when}")
        if f.get("note"):
            lines.append(f"{'':<8}{f['note']}")
    lines.append("=" * 100)
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
