"""`callctl export`: exports for compliance and the regulator."""
from __future__ import annotations

import sys

from callctl.cli.common import engine, write_out


def regulator(cfg, args):
    from callctl import regulator as reg

    start, end = reg.period(args.start, args.end)
    rendered = reg.RENDER[args.format](reg.report(engine(cfg), start, end))
    write_out(rendered if args.output or rendered.endswith("\n") else rendered + "\n", args.output)


def contacts(cfg, args):
    from callctl import register as east

    lines = east.csv_lines(east.rows(engine(cfg), args.tenant, args.as_of))  # bad input stops here
    out = open(args.output, "w", encoding="utf-8", newline="") if args.output else sys.stdout
    try:
        out.writelines(lines)
    finally:
        if args.output:
            out.close()


def register(top) -> None:
    export = top.add_parser("export", help="exports").add_subparsers(dest="sub", required=True)
    cmd = export.add_parser("regulator", help="contact statistics per tenant, per day, findings and reveals")
    cmd.add_argument("--from", dest="start", required=True,
                     help="ISO date (UTC) or date-time with zone, or an age: 7d")
    cmd.add_argument("--to", dest="end", required=True, help="exclusive end, same forms")
    cmd.add_argument("--format", choices=["csv", "json", "html"], default="csv",
                     help="csv (default), json, or html: a self-contained report with charts")
    cmd.add_argument("--output", "-o", help="write to this file instead of standard output")
    cmd.set_defaults(func=regulator)
    cmd = export.add_parser("contacts", help="the EAST contact register: policy -> virtual number (CSV)")
    cmd.add_argument("--tenant", required=True)
    cmd.add_argument("--as-of", required=True, help="YYYY-MM-DD (end of that day, tenant's zone) or ISO date-time")
    cmd.add_argument("--output", "-o", help="write to this file instead of stdout")
    cmd.set_defaults(func=contacts)
