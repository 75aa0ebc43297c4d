"""`callctl cdr`: call detail records (numbers masked)."""
from __future__ import annotations

import json
from pathlib import Path

from callctl.cli import common
from callctl.cli.common import clock, engine, print_json, table, values

CDR_TABLE = [
    ("started_at", "started (UTC)"), ("call_id", "call id"), ("tenant_id", "tenant"),
    ("virtual_number", "X"), ("direction", "direction"), ("caller_masked", "caller"),
    ("callee_masked", "callee"), ("decision", "decision"), ("reject_reason", "reason"),
    ("dial_status", "dial"), ("ring_seconds", "ring s"), ("talk_seconds", "talk s"),
    ("hangup_cause", "cause"), ("hangup_by", "ended by"), ("purpose", "purpose"),
]
# `cdr tail` prints rows as they come: its columns need widths up front, wide enough.
TAIL_WIDTHS = {"started_at": 19, "call_id": 24, "virtual_number": 15, "caller_masked": 15, "callee_masked": 15}


def _filter(cfg, args):
    from callctl.store.cdrs import CdrFilter

    return CdrFilter.parse(tenant=args.tenant, x=args.x, binding=args.binding, since=args.since,
                           until=getattr(args, "until", None), decision=args.decision, reason=args.reason,
                           region=cfg.region)


def _line(row: dict) -> dict:
    return {**row, "started_at": clock(row["started_at"])}


def list_(cfg, args):
    from callctl.store.cdrs import list_cdrs

    rows = list_cdrs(engine(cfg), _filter(cfg, args), limit=args.limit)
    if args.json:
        print_json(rows)
        return
    print(table([_line(row) for row in rows], CDR_TABLE))
    print(f"({len(rows)} call(s))")


def tail(cfg, args):
    """Follow new CDRs."""
    from callctl.store.cdrs import follow_cdrs

    cell = lambda key, value: ("" if value is None else str(value)).ljust(TAIL_WIDTHS.get(key, 9))
    rows = follow_cdrs(engine(cfg), _filter(cfg, args), backlog=args.backlog, every=args.every)
    try:
        if not args.json:
            print("  ".join(cell(key, title) for key, title in CDR_TABLE).rstrip(), flush=True)
        for row in rows:
            if args.json:
                print(json.dumps(row, ensure_ascii=False), flush=True)
            else:
                line = _line(row)
                print("  ".join(cell(key, line.get(key)) for key, _ in CDR_TABLE).rstrip(), flush=True)
    except KeyboardInterrupt:
        pass


def import_pbx(cfg, args):
    from callctl.service import CallService

    service = CallService(engine(cfg), spool=None, region=cfg.region, node=cfg.node)
    if args.pbx == "freeswitch":
        from callctl.freeswitch.esl import EslError
        from callctl.freeswitch.fallback import import_kept, inbound

        where = f"FreeSWITCH at {cfg.freeswitch.esl}"
        try:
            esl = inbound(cfg.freeswitch.esl, cfg.freeswitch.esl_password)
        except (OSError, EslError) as exc:
            raise SystemExit(f"error: cannot reach {where}: {type(exc).__name__}: {exc}") from None
        try:
            counts = import_kept(service, esl)
        finally:
            esl.sock.close()
    else:
        from callctl.asterisk.fallback import import_fallback

        if not args.file:
            raise SystemExit("error: name the PBX's file (CALLCTL_CDR_FALLBACK)")
        where = args.file
        counts = import_fallback(service, Path(args.file))
    if args.json:
        print_json(counts)
    else:
        print(f"imported from {where}: {counts['written']} written, {counts['duplicate']} already there"
              + (f", {counts['unreadable']} unreadable line(s) skipped" if counts["unreadable"] else ""))


def register(top) -> None:
    from callctl.core.decision import Reason
    from callctl.core.enums import CallDecision

    cdr = top.add_parser("cdr", help="call detail records").add_subparsers(dest="sub", required=True)
    clist = cdr.add_parser("list", help="newest calls first")
    clist.add_argument("--limit", type=common.count(100000), default=50)
    ctail = cdr.add_parser("tail", help="the last calls, then new ones as they are written (Ctrl-C stops)")
    ctail.add_argument("--backlog", type=common.count(100000), default=10, help="calls shown first (default 10)")
    ctail.add_argument("--every", type=float, default=1.0, help="seconds between looks (default 1)")
    for sub in (clist, ctail):
        sub.add_argument("--tenant", help="tenant name")
        sub.add_argument("--x", help="virtual number")
        sub.add_argument("--binding", type=common.ident, help="binding id")
        sub.add_argument("--since", help="ISO date/date-time with zone, or an age: 15m, 2h, 7d")
        sub.add_argument("--decision", choices=values(CallDecision))
        sub.add_argument("--reason", choices=[str(reason) for reason in Reason])
        sub.add_argument("--json", action="store_true", help="JSON for programs (tail: one object per line)")
    clist.add_argument("--until", help="exclusive end, same forms as --since")
    clist.set_defaults(func=list_)
    ctail.set_defaults(func=tail)
    cmd = cdr.add_parser("import-pbx", help="CDRs the PBX kept while no daemon answered")
    cmd.add_argument("file", nargs="?", help="Asterisk: the CALLCTL_CDR_FALLBACK file; removed once every line is in the database")
    cmd.add_argument("--pbx", choices=["asterisk", "freeswitch"], default="asterisk",
                     help="freeswitch: the CDRs kept in mod_db, over the inbound event socket (freeswitch.esl)")
    cmd.add_argument("--json", action="store_true")
    cmd.set_defaults(func=import_pbx)
