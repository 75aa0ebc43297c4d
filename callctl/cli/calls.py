"""`callctl calls`: bridged calls now up on this PBX (over AMI; parties masked)."""
from __future__ import annotations

import sys

from callctl.cli.common import engine, print_json, table


def calls(cfg, args):
    from callctl import live
    from callctl.asterisk.ami import AmiError

    try:
        rows = live.calls(cfg, engine(cfg))
    except AmiError as exc:
        print(f"callctl: {exc}", file=sys.stderr)
        raise SystemExit(4)
    if args.json:
        print_json(rows)
        return
    print(table(rows, [("uniqueid", "call"), ("tenant", "tenant"), ("x", "X"), ("direction", "direction"),
                       ("caller", "caller"), ("callee", "callee"), ("seconds", "seconds")]))
    print(f"({len(rows)} bridged call(s))")


def register(top) -> None:
    cmd = top.add_parser("calls", help="bridged calls now up on this PBX (over AMI; parties masked)")
    cmd.add_argument("--json", action="store_true")
    cmd.set_defaults(func=calls)
