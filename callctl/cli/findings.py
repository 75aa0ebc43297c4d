"""`callctl findings`: what the anomaly job found."""
from __future__ import annotations

from callctl.cli import common
from callctl.cli.common import clock, engine, moment, print_json, table

FINDING_TABLE = [
    ("id", "id"), ("window_end", "last call (UTC)"), ("tenant", "tenant"), ("rule", "rule"),
    ("subject", "subject"), ("calls", "calls"), ("measure", "measure"), ("threshold", "threshold"),
    ("severity", "severity"), ("action", "action"), ("block_id", "block"),
]


def list_(cfg, args):
    from callctl.anomaly.job import list_findings

    rows = list_findings(engine(cfg), tenant=args.tenant, rule=args.rule, since=moment(args.since, "since"),
                         limit=args.limit)
    if args.json:
        print_json(rows)
        return
    for row in rows:
        row["window_end"] = clock(row["window_end"])
        if row["subject_kind"] == "caller":
            row["subject"] = "caller " + row["subject"][:12]  # a hash: its head tells callers apart
        else:
            row["subject"] = f"{row['subject_kind']} {row['subject']}"
        row["measure"] = f"{row['measure']:g}"
        row["threshold"] = f"{row['threshold']:g}"
    print(table(rows, FINDING_TABLE))
    print(f"({len(rows)} finding(s))")


def register(top) -> None:
    from callctl.anomaly.config import RULES

    findings = top.add_parser("findings", help="what the anomaly job found").add_subparsers(dest="sub", required=True)
    cmd = findings.add_parser("list", help="newest first")
    cmd.add_argument("--tenant")
    cmd.add_argument("--rule", choices=list(RULES))
    cmd.add_argument("--since", help="findings whose last call is at or after it: ISO date-time with zone, "
                                     "a date (UTC), or an age: 15m, 2h, 7d")
    cmd.add_argument("--limit", type=common.count(100000), default=100)
    cmd.add_argument("--json", action="store_true", help="JSON for programs")
    cmd.set_defaults(func=list_, needs_keys=False)
