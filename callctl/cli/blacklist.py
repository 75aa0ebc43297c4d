"""`callctl blacklist`: the shared harassment blacklist (docs/regulator.md)."""
from __future__ import annotations

from callctl.cli import common
from callctl.cli.common import clock, engine, login, print_json, table

BLACKLIST_TABLE = [
    ("id", "id"), ("caller", "caller"), ("status", "status"), ("origin", "origin"), ("tenants", "tenants"),
    ("starts_at", "starts (UTC)"), ("ends_at", "ends (UTC)"), ("proposed_by", "proposed by"), ("reason", "reason"),
]


def blacklist(cfg, args):
    """callctl blacklist propose|approve|refuse|appeal|uphold|lift|show|list."""
    from callctl.store import blacklist as store

    db, by = engine(cfg), getattr(args, "by", None) or login()
    if args.sub == "propose":
        result = store.propose(db, caller=args.caller, reason=args.reason, proposed_by=by,
                               seconds=args.duration, findings=args.finding or [], cdrs=args.cdr or [],
                               region=cfg.region)
    elif args.sub == "approve":
        result = store.approve(db, args.entry_id, by)
        if args.cut_active and result["status"] == "active":
            from callctl.cli.block import cut_active

            cut_active(cfg, db, result, "entry in force")
    elif args.sub == "show":
        result = store.get(db, args.entry_id)
    elif args.sub in ("refuse", "uphold", "lift"):
        result = getattr(store, args.sub)(db, args.entry_id, by, note=args.note or "")
    elif args.sub == "appeal":
        result = store.appeal(db, args.entry_id, by, args.note)
    elif args.tenant:
        result = store.tenant_entries(db, args.tenant)
    else:
        result = store.list_entries(db, status=args.status, caller=args.caller, region=cfg.region)
        if not args.json:
            for row in result:
                row["tenants"] = ",".join(row["tenants"])
                row["starts_at"], row["ends_at"] = clock(row["starts_at"]), clock(row["ends_at"])
            print(table(result, BLACKLIST_TABLE))
            print(f"({len(result)} entr{'y' if len(result) == 1 else 'ies'})")
            return
    print_json(result)


def register(top) -> None:
    sub = top.add_parser(
        "blacklist", help="the shared harassment blacklist (docs/regulator.md)").add_subparsers(dest="sub", required=True)
    propose = sub.add_parser("propose", help="propose a caller number; in force after two approvals")
    propose.add_argument("--caller", required=True, help="the caller's number")
    propose.add_argument("--reason", required=True, help="why (no phone numbers in here)")
    propose.add_argument("--finding", type=common.ident, action="append", help="evidence: a finding about this caller")
    propose.add_argument("--cdr", type=common.ident, action="append", help="evidence: a CDR of a call from this caller")
    propose.add_argument("--duration", type=common.seconds, help="seconds in force from the second approval (default: until lifted)")
    steps = {"approve": "approve (the second approval puts it in force)", "refuse": "refuse a proposal",
             "appeal": "record an appeal against an entry in force", "uphold": "decide an appeal: the entry stays",
             "lift": "end an entry in force now (it stays on record)", "show": "one entry with its evidence"}
    for name, what in steps.items():
        step = sub.add_parser(name, help=what)
        step.add_argument("entry_id", type=common.ident)
        if name not in ("show", "approve"):
            step.add_argument("--note", required=name == "appeal", help="why (an appeal's grounds)")
        if name == "approve":
            step.add_argument("--cut-active", action="store_true",
                              help="when this approval puts it in force, also hang up the caller's live "
                                   "calls to customers (over AMI, within a second)")
        step.set_defaults(func=blacklist)
    for command in (propose, *(sub.choices[n] for n in steps if n != "show")):
        command.add_argument("--by", help="who does it (default: your login)")
    propose.set_defaults(func=blacklist)
    listing = sub.add_parser("list", help="entries, newest first")
    listing.add_argument("--status", choices=["proposed", "active", "refused", "lifted"])
    listing.add_argument("--caller", help="entries on this number")
    listing.add_argument("--tenant", help="what this tenant is shown: its own callers, its own evidence (JSON)")
    listing.add_argument("--json", action="store_true", help="JSON for programs")
    listing.set_defaults(func=blacklist)
