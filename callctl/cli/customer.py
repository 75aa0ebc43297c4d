"""`callctl customer`: a customer's own word on a tenant's calls, set by support staff on
the customer's word (audited). Numbers are shown masked."""
from __future__ import annotations

from callctl.cli.common import engine, login, print_json, values
from callctl.core.decision import Calls, Channel


def get(cfg, args):
    from callctl.store.customers import get_preference

    print_json(get_preference(engine(cfg), args.tenant, args.customer, region=cfg.region))


def set_(cfg, args):
    from callctl.store.customers import set_preference

    print_json(set_preference(engine(cfg), args.tenant, args.customer, actor=args.by or f"support:{login()}",
                              calls=args.calls, quiet_hours=args.quiet_hours, channel=args.channel,
                              region=cfg.region))


def register(top):
    customer = top.add_parser("customer", help="a customer's own word on a tenant's calls (audited)") \
        .add_subparsers(dest="sub", required=True)
    cget = customer.add_parser("get", help="the customer's preferences for one tenant (masked)")
    cset = customer.add_parser("set", help="change them (support staff, on the customer's word)")
    for sub in (cget, cset):
        sub.add_argument("--tenant", required=True)
        sub.add_argument("--customer", required=True, help="the customer's number")
    cset.add_argument("--calls", choices=values(Calls))
    cset.add_argument("--quiet-hours", help="HH:MM-HH:MM in the tenant's zone; '' clears them")
    cset.add_argument("--channel", choices=values(Channel), help="how the customer prefers to be reached")
    cset.add_argument("--by", help="who makes the change (default: support:<your login>)")
    cget.set_defaults(func=get)
    cset.set_defaults(func=set_)
    return customer
