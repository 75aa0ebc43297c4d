"""`callctl bind`, `callctl unbind`, `callctl binding`: bindings of X to customers."""
from __future__ import annotations

from datetime import timedelta

from callctl.cli import common
from callctl.cli.common import clock, engine, moment, print_json, run_bulk, table, values
from callctl.core.decision import Mode, Purpose
from callctl.core.enums import BindingView
from callctl.store.inputs import PROFILES

BINDING_TABLE = [
    ("id", "id"), ("tenant", "tenant"), ("x", "X"), ("mode", "mode"), ("customer", "customer"),
    ("other_party", "other party"), ("extension", "ext"), ("reference", "reference"),
    ("status", "status"), ("expires_at", "expires (UTC)"),
]


def bind(cfg, args):
    from callctl.store.bindings import bind as make

    if (args.customer is None) == (args.bulk is None):
        raise SystemExit("callctl: give --customer (one binding) or --bulk FILE")
    if args.bulk:
        from callctl.store.bulk import bind_bulk

        return run_bulk(lambda progress: bind_bulk(
            engine(cfg), args.bulk, tenant_name=args.tenant, region=cfg.region,
            extension_digits=cfg.axe_extension_digits, out=args.out, progress=progress), args.bulk)
    if args.tenant is None:
        raise SystemExit("callctl: --tenant is needed")
    print_json(make(
        engine(cfg), args.tenant, args.customer, mode=args.mode, other_party=args.other_party,
        reference=args.reference, expires_at=moment(args.expires, "expires", ahead=True), ttl_seconds=args.ttl,
        region=cfg.region, extension_digits=cfg.axe_extension_digits, purposes=args.purpose,
        profile=args.profile, quarantine=cfg.expiry_quarantine,
    ))


def unbind(cfg, args):
    from callctl.store.bindings import unbind as end

    print_json(end(engine(cfg), args.binding_id, timedelta(days=cfg.quarantine_days)))


def get(cfg, args):
    from callctl.store.bindings import get_binding

    print_json(get_binding(engine(cfg), args.binding_id))


def list_(cfg, args):
    from callctl.store.bindings import list_bindings
    from callctl.store.tenants import tenant_id_of

    db = engine(cfg)
    page = list_bindings(
        db, tenant_id=tenant_id_of(db, args.tenant) if args.tenant else None,
        reference=args.reference, status=args.status, after=args.after, limit=args.limit,
    )
    if args.json:
        print_json(page)
        return
    for row in page["items"]:
        row["expires_at"] = clock(row["expires_at"])
    print(table(page["items"], BINDING_TABLE))
    more = f"; next page: --after {page['next']}" if page["next"] else ""
    print(f"({len(page['items'])} binding(s){more})")


def extend(cfg, args):
    from callctl.store.bindings import extend_binding

    if args.expires is None and args.ttl is None and not args.no_expiry:
        raise SystemExit("callctl: give --expires, --ttl or --no-expiry")
    print_json(extend_binding(engine(cfg), args.binding_id, moment(args.expires, "expires", ahead=True),
                              ttl_seconds=args.ttl))


def update(cfg, args):
    from callctl.store.bindings import update_binding

    if args.customer is None and args.reference is None:
        raise SystemExit("callctl: give --customer and/or --reference")
    print_json(update_binding(engine(cfg), args.binding_id, customer=args.customer,
                              reference=args.reference, region=cfg.region))


def policy(cfg, args):
    from callctl.store.bindings import set_binding_policy

    if args.purpose is None and args.profile is None and not args.no_profile:
        raise SystemExit("callctl: give --purpose, --profile or --no-profile")
    print_json(set_binding_policy(engine(cfg), args.binding_id, purposes=args.purpose, profile=args.profile,
                                  clear_profile=args.no_profile))


def register(top):
    cmd = top.add_parser("bind", help="bind a virtual number to a customer; prints the binding")
    cmd.add_argument("--tenant", help="the tenant (in --bulk: for rows without a tenant column)")
    cmd.add_argument("--customer", help="the customer's real number (A)")
    cmd.add_argument("--bulk", metavar="FILE",
                     help="CSV with a header: customer[,tenant,mode,other_party,reference,expires_at,ttl_seconds]")
    cmd.add_argument("--out", help="--bulk: where the bindings made go (default FILE.bound.csv)")
    cmd.add_argument("--mode", default="AXN", choices=values(Mode),
                     help="AXN: X for this customer alone; AXB: X shared by pairs (needs --other-party); "
                          "AXE: X shared through an extension")
    cmd.add_argument("--other-party", help="AXB: the other party's real number (B)")
    cmd.add_argument("--reference", help="external reference, e.g. a policy number")
    cmd.add_argument("--purpose", action="append", choices=values(Purpose),
                     help="a purpose of calls the customer accepts (repeatable; default: all but marketing)")
    cmd.add_argument("--profile", choices=["elderly", "claims"], help="protection profile (tighter hours)")
    expiry = cmd.add_mutually_exclusive_group()
    expiry.add_argument("--expires", help="ISO date-time with zone, a date (UTC), or a time from now: 30d")
    expiry.add_argument("--ttl", type=common.seconds, help="seconds from now")
    cmd.set_defaults(func=bind)

    cmd = top.add_parser("unbind", help="end a binding; its X is quarantined")
    cmd.add_argument("binding_id", type=common.ident)
    cmd.set_defaults(func=unbind)

    binding = top.add_parser("binding", help="read and change bindings").add_subparsers(dest="sub", required=True)
    cmd = binding.add_parser("get", help="one binding (numbers masked)")
    cmd.add_argument("binding_id", type=common.ident)
    cmd.set_defaults(func=get)
    cmd = binding.add_parser("list", help="bindings in id order, a page at a time")
    cmd.add_argument("--tenant")
    cmd.add_argument("--reference", help="external reference, e.g. a policy number")
    cmd.add_argument("--status", choices=values(BindingView),
                     help="active: in force; expired: past its expiry (its X released by housekeeping); "
                          "ended: unbound")
    cmd.add_argument("--after", type=common.after, default=0, help="show ids after this one (paging)")
    cmd.add_argument("--limit", type=common.count(1000), default=100, help="1-1000 (default 100)")
    cmd.add_argument("--json", action="store_true", help="JSON for programs")
    cmd.set_defaults(func=list_)
    cmd = binding.add_parser("extend", help="set a new expiry (renewal; an expired binding is revived on "
                                            "its X unless X serves someone else now)")
    cmd.add_argument("binding_id", type=common.ident)
    new_expiry = cmd.add_mutually_exclusive_group()
    new_expiry.add_argument("--expires", help="ISO date-time with zone, a date (UTC), or a time from now: 30d")
    new_expiry.add_argument("--ttl", type=common.seconds, help="seconds from now")
    new_expiry.add_argument("--no-expiry", action="store_true", help="never expires (until unbound)")
    cmd.set_defaults(func=extend)
    cmd = binding.add_parser("update", help="change the customer's number or the reference")
    cmd.add_argument("binding_id", type=common.ident)
    cmd.add_argument("--customer", help="the customer's new real number (A)")
    cmd.add_argument("--reference")
    cmd.set_defaults(func=update)
    cmd = binding.add_parser("policy", help="the purposes the customer accepts, the protection profile")
    cmd.add_argument("binding_id", type=int)
    cmd.add_argument("--purpose", action="append", choices=values(Purpose),
                     help="a purpose the customer accepts (repeatable; replaces the list)")
    which = cmd.add_mutually_exclusive_group()
    which.add_argument("--profile", choices=PROFILES, help="protection profile: tighter hours and thresholds")
    which.add_argument("--no-profile", action="store_true", help="no protection profile")
    cmd.set_defaults(func=policy)
    return binding
