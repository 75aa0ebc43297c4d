"""`callctl block`: blocks of calls (never deleted: lift ends them)."""
from __future__ import annotations

import sys

from callctl.cli import common
from callctl.cli.common import clock, engine, login, moment, print_json, table, values
from callctl.core.enums import BlockDirection, BlockScope

BLOCK_TABLE = [
    ("id", "id"), ("tenant", "tenant"), ("scope", "scope"), ("direction", "direction"),
    ("binding_id", "binding"), ("x", "X"), ("caller", "caller"), ("status", "status"),
    ("starts_at", "starts (UTC)"), ("ends_at", "ends (UTC)"), ("created_by", "by"), ("reason", "reason"),
]


def add(cfg, args):
    """With --cut-active, then hang up the live calls the block now refuses."""
    from callctl.store.blocks import add_block

    db = engine(cfg)
    made = add_block(
        db, scope=args.scope, direction=args.direction, reason=args.reason, created_by=args.by or login(),
        tenant=args.tenant, binding_id=args.binding, number=args.number, caller=args.caller,
        starts_at=moment(args.starts, "starts", ahead=True), ends_at=moment(args.ends, "ends", ahead=True),
        duration_seconds=args.duration, region=cfg.region,
    )
    if args.cut_active:
        cut_active(cfg, db, made, "block added")
    print_json(made)


def cut_active(cfg, db, made: dict, done: str) -> None:
    """--cut-active: hang up the live calls the blocks and blacklist entries now in force
    refuse, listed in made["calls_cut"]; exit 4 (after printing `made`) if AMI failed."""
    from callctl import live
    from callctl.asterisk.ami import AmiError

    try:
        made["calls_cut"] = live.cut(cfg, db, cfg.region)
    except AmiError as exc:
        print_json(made)
        print(f"callctl: {done}, live calls NOT cut: {exc}", file=sys.stderr)
        raise SystemExit(4)


def list_(cfg, args):
    from callctl.store.blocks import list_blocks

    rows = list_blocks(
        engine(cfg), tenant=args.tenant, scope=args.scope, binding_id=args.binding, number=args.number,
        caller=args.caller, active=args.active, limit=args.limit, region=cfg.region,
    )
    if args.json:
        print_json(rows)
        return
    for row in rows:
        row["starts_at"], row["ends_at"] = clock(row["starts_at"]), clock(row["ends_at"])
    print(table(rows, BLOCK_TABLE))
    print(f"({len(rows)} block(s))")


def lift(cfg, args):
    from callctl.store.blocks import lift_block

    print_json(lift_block(engine(cfg), args.block_id, args.by or login()))


def register(top) -> None:
    block = top.add_parser("block", help="block calls (never deleted: lift ends them)").add_subparsers(
        dest="sub", required=True)
    cmd = block.add_parser("add", help="block calls; effective on the next call on every daemon")
    cmd.add_argument("--scope", required=True, choices=values(BlockScope),
                     help="binding (--binding), caller (--tenant, --caller), number (--number X), "
                          "tenant (--tenant: suspends its calling rights)")
    cmd.add_argument("--direction", required=True, choices=values(BlockDirection))
    cmd.add_argument("--reason", required=True, help="why (no phone numbers in here)")
    cmd.add_argument("--by", help="who sets it (default: your login)")
    cmd.add_argument("--tenant")
    cmd.add_argument("--binding", type=common.ident, help="binding id")
    cmd.add_argument("--number", help="virtual number X")
    cmd.add_argument("--caller", help="the caller's number")
    cmd.add_argument("--starts", help="ISO date-time with zone, a date (UTC), or a time from now: 1h (default now)")
    end = cmd.add_mutually_exclusive_group()
    end.add_argument("--ends", help="same forms as --starts (default: until lifted)")
    end.add_argument("--duration", type=common.seconds, help="seconds from the start")
    cmd.add_argument("--cut-active", action="store_true",
                     help="also hang up the live calls it refuses now (over AMI, within a second)")
    cmd.set_defaults(func=add)
    cmd = block.add_parser("list", help="blocks, newest first")
    cmd.add_argument("--tenant")
    cmd.add_argument("--scope", choices=values(BlockScope))
    cmd.add_argument("--binding", type=common.ident)
    cmd.add_argument("--number")
    cmd.add_argument("--caller")
    cmd.add_argument("--active", action="store_true", help="only blocks in force now")
    cmd.add_argument("--limit", type=common.count(10000), default=100)
    cmd.add_argument("--json", action="store_true", help="JSON for programs")
    cmd.set_defaults(func=list_)
    cmd = block.add_parser("lift", help="end a block now (it stays on record)")
    cmd.add_argument("block_id", type=common.ident)
    cmd.add_argument("--by", help="who lifts it (default: your login)")
    cmd.set_defaults(func=lift)
