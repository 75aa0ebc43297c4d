"""`callctl db`: the schema and the CDR partitions."""
from __future__ import annotations

from callctl.cli.common import engine, non_negative, print_json, table


def upgrade(cfg, args):
    from callctl.store.db import upgrade as run

    applied = run(engine(cfg))
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")


def partitions(cfg, args):
    from callctl.store.partitions import cdr_partitions, ensure_cdr_partitions

    db = engine(cfg)
    if db.dialect.name != "postgresql":
        print("CDR partitions are a PostgreSQL feature; this database is not partitioned")
        return
    created = ensure_cdr_partitions(db, days_ahead=args.days)
    if args.json:
        print_json({"created": created, "partitions": cdr_partitions(db)})
        return
    print("created: " + ", ".join(created) if created else "CDR partitions are up to date")
    print(table(cdr_partitions(db), [("partition", "partition"), ("range", "range"),
                                     ("rows_estimate", "rows (estimate)")]))


def register(top) -> None:
    db = top.add_parser("db", help="database schema").add_subparsers(dest="sub", required=True)
    db.add_parser("upgrade", help="create or migrate the schema").set_defaults(
        func=upgrade, checks_keys=False)  # it checks the ring once the schema has its table
    parts = db.add_parser("partitions",
                          help="create the coming days' CDR partitions (PostgreSQL; the daemon does it hourly)")
    parts.add_argument("--days", type=non_negative, default=7, help="days ahead (default 7)")
    parts.add_argument("--json", action="store_true", help="JSON for programs")
    parts.set_defaults(func=partitions, needs_keys=False)  # touches no stored number
