"""`callctl pool`: a tenant's virtual numbers."""
from __future__ import annotations

from callctl.cli.common import engine, print_json, run_bulk


def add(cfg, args):
    from callctl.store.pool import add_numbers

    count = add_numbers(engine(cfg), args.tenant, args.numbers, region=cfg.region)
    print(f"added {count} virtual number(s) to {args.tenant}")


def import_(cfg, args):
    from callctl.store.bulk import import_pool

    run_bulk(lambda progress: import_pool(engine(cfg), args.file, tenant_name=args.tenant, region=cfg.region,
                                          progress=progress), args.file)


def status(cfg, args):
    from callctl.store.pool import pool_status

    print_json(pool_status(engine(cfg), args.tenant))


def register(top) -> None:
    pool = top.add_parser("pool", help="virtual number pools").add_subparsers(dest="sub", required=True)
    cmd = pool.add_parser("add", help="add virtual numbers to a tenant's pool")
    cmd.add_argument("--tenant", required=True)
    cmd.add_argument("numbers", nargs="+")
    cmd.set_defaults(func=add)
    cmd = pool.add_parser("import", help="add virtual numbers from a CSV file: number[,tenant]")
    cmd.add_argument("file")
    cmd.add_argument("--tenant", help="for rows without a tenant column")
    cmd.set_defaults(func=import_)
    cmd = pool.add_parser("status", help="free/bound/quarantined counts")
    cmd.add_argument("--tenant", required=True)
    cmd.set_defaults(func=status)
