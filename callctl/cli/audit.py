"""`callctl audit`: the hash-chained audit log."""
from __future__ import annotations

import sys

from callctl.cli.common import engine, write_out


def verify(cfg, args):
    from callctl.store import reveal

    try:
        result = reveal.verify(engine(cfg), args.checkpoint)
    except reveal.CheckpointError as exc:
        print(f"audit log NOT VERIFIED: {exc}", file=sys.stderr)
        raise SystemExit(4) from None
    if not result["ok"]:
        print(f"audit log TAMPERED: row {result['bad_row']}: {result['problem']} "
              f"({result['rows']} row(s) before it are intact)", file=sys.stderr)
        raise SystemExit(4)
    print(f"audit log intact: {result['rows']} row(s), head {result['head'][:16]}")
    if result["rows"]:  # a copy kept elsewhere is what `--checkpoint FILE` reads back
        print(f"checkpoint: {reveal.checkpoint_line(result['rows'], result['head'])}")


def export(cfg, args):
    from callctl.store import reveal

    write_out(reveal.export(engine(cfg), args.format), args.output)


def register(top) -> None:
    audit = top.add_parser("audit", help="the hash-chained audit log").add_subparsers(dest="sub", required=True)
    cmd = audit.add_parser("verify", help="check the chain and the checkpoints; names the first bad row (exit 4)")
    cmd.add_argument("--checkpoint", action="append", default=[], metavar="FILE",
                     help="also hold the log against this checkpoint (a copy kept elsewhere); repeatable")
    cmd.set_defaults(func=verify)
    cmd = audit.add_parser("export", help="the whole log (no real numbers in it)")
    cmd.add_argument("--format", choices=["json", "csv"], default="json")
    cmd.add_argument("--output", "-o", help="file (default: standard output)")
    cmd.set_defaults(func=export, needs_keys=False)
