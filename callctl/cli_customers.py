"""`callctl` commands of issue #16: customers' preferences, caller groups' purposes,
bindings' purposes and protection profile, webhooks. Numbers are shown masked."""
from __future__ import annotations

import json
import signal
import threading


def _engine(cfg):
    from callctl.store.db import make_engine

    return make_engine(cfg.database_url, pool_size=cfg.db_threads)


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _retry(cfg):
    from callctl.webhooks import Retry

    w = cfg.webhooks
    return Retry(first=w.retry_seconds, most=w.max_retry_seconds, timeout=w.timeout)


def _who(args) -> str:
    from callctl.cli.common import login as _login

    return args.by or f"support:{_login()}"


def cmd_tenant_callers(cfg, args):
    from callctl.store.tenants import add_callers

    _print_json(add_callers(_engine(cfg), args.name, callers=args.caller, caller_prefixes=args.caller_prefix,
                            purpose=args.purpose, region=cfg.region))


def cmd_binding_policy(cfg, args):
    from callctl.store.bindings import set_binding_policy

    if args.purpose is None and args.profile is None and not args.no_profile:
        raise SystemExit("callctl: give --purpose, --profile or --no-profile")
    _print_json(set_binding_policy(_engine(cfg), args.binding_id, purposes=args.purpose, profile=args.profile,
                                   clear_profile=args.no_profile))


def cmd_customer_get(cfg, args):
    from callctl.store.customers import get_preference

    _print_json(get_preference(_engine(cfg), args.tenant, args.customer, region=cfg.region))


def cmd_customer_set(cfg, args):
    from callctl.store.customers import set_preference

    _print_json(set_preference(_engine(cfg), args.tenant, args.customer, actor=_who(args), calls=args.calls,
                               quiet_hours=args.quiet_hours, channel=args.channel, region=cfg.region))


def cmd_webhook_add(cfg, args):
    from callctl.webhooks import add_webhook

    made = add_webhook(_engine(cfg), args.tenant, args.url, args.secret)
    _print_json(made)
    if not args.secret:
        print("callctl: the secret above is shown once; give it to the insurer to verify signatures",
              file=__import__("sys").stderr)


WEBHOOK_TABLE = [("id", "id"), ("tenant", "tenant"), ("url", "url"), ("delivered", "delivered"),
                 ("pending", "pending"), ("failing", "failing"), ("last_status", "last status"),
                 ("last_error", "last error"), ("removed_at", "removed")]


def cmd_webhook_list(cfg, args):
    from callctl.cli.common import table as _table
    from callctl.webhooks import list_webhooks

    rows = list_webhooks(_engine(cfg), args.tenant)
    if args.json:
        _print_json(rows)
    else:
        print(_table(rows, WEBHOOK_TABLE))


def cmd_webhook_test(cfg, args):
    from callctl.webhooks import ping_webhook

    outcome = ping_webhook(_engine(cfg), args.webhook_id, _retry(cfg))
    _print_json(outcome)
    if not outcome["ok"]:
        raise SystemExit(4)


def cmd_webhook_remove(cfg, args):
    from callctl.webhooks import remove_webhook

    _print_json(remove_webhook(_engine(cfg), args.webhook_id))


def cmd_webhook_deliver(cfg, args):
    from callctl.webhooks import deliver

    if not args.interval > 0:
        raise SystemExit("callctl: --interval must be a positive number of seconds")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())  # the delivery under way finishes, then we exit
    print(json.dumps(deliver(_engine(cfg), _retry(cfg), follow=args.follow, interval=args.interval, stop=stop)),
          flush=True)


def add_parsers(top, tenant, binding) -> None:
    """The commands, added to `callctl`'s parser (`tenant`, `binding`: their subcommands)."""
    from callctl.core.decision import Calls, Channel, Purpose
    from callctl.store.inputs import PROFILES

    purposes = [p.value for p in Purpose]
    callers = tenant.add_parser("callers", help="put agents' numbers/prefixes in the caller group of a purpose")
    callers.add_argument("name", help="the tenant")
    callers.add_argument("--purpose", required=True, choices=purposes,
                         help="why these agents call (a binding accepts all but marketing by default)")
    callers.add_argument("--caller", action="append", default=[], help="an agent's number (repeatable)")
    callers.add_argument("--caller-prefix", action="append", default=[], help="agents' number prefix")
    callers.set_defaults(func=cmd_tenant_callers)

    policy = binding.add_parser("policy", help="the purposes the customer accepts, the protection profile")
    policy.add_argument("binding_id", type=int)
    policy.add_argument("--purpose", action="append", choices=purposes,
                        help="a purpose the customer accepts (repeatable; replaces the list)")
    which = policy.add_mutually_exclusive_group()
    which.add_argument("--profile", choices=PROFILES, help="protection profile: tighter hours and thresholds")
    which.add_argument("--no-profile", action="store_true", help="no protection profile")
    policy.set_defaults(func=cmd_binding_policy)

    customer = top.add_parser("customer", help="a customer's own word on a tenant's calls (audited)") \
        .add_subparsers(dest="sub", required=True)
    cget = customer.add_parser("get", help="the customer's preferences for one tenant (masked)")
    cset = customer.add_parser("set", help="change them (support staff, on the customer's word)")
    for sub in (cget, cset):
        sub.add_argument("--tenant", required=True)
        sub.add_argument("--customer", required=True, help="the customer's number")
    cset.add_argument("--calls", choices=[c.value for c in Calls])
    cset.add_argument("--quiet-hours", help="HH:MM-HH:MM in the tenant's zone; '' clears them")
    cset.add_argument("--channel", choices=[c.value for c in Channel], help="how the customer prefers to be reached")
    cset.add_argument("--by", help="who makes the change (default: support:<your login>)")
    cget.set_defaults(func=cmd_customer_get)
    cset.set_defaults(func=cmd_customer_set)

    webhook = top.add_parser("webhook", help="insurers' event endpoints (docs/webhooks.md)") \
        .add_subparsers(dest="sub", required=True)
    wadd = webhook.add_parser("add", help="a new endpoint; prints its signing secret once")
    wadd.add_argument("--tenant", required=True)
    wadd.add_argument("--url", required=True, help="https://... (POSTed JSON events)")
    wadd.add_argument("--secret", help="the signing secret (default: a new random one)")
    wadd.set_defaults(func=cmd_webhook_add)
    wlist = webhook.add_parser("list", help="endpoints and their delivery status")
    wlist.add_argument("--tenant")
    wlist.add_argument("--json", action="store_true", help="JSON for programs")
    wlist.set_defaults(func=cmd_webhook_list)
    wtest = webhook.add_parser("test", help="send a signed test event now; exit 4 if it failed")
    wtest.add_argument("webhook_id", type=int)
    wtest.set_defaults(func=cmd_webhook_test)
    wrm = webhook.add_parser("remove", help="stop delivering to an endpoint")
    wrm.add_argument("webhook_id", type=int)
    wrm.set_defaults(func=cmd_webhook_remove)
    wdel = webhook.add_parser("deliver", help="send due events (--follow: keep going until stopped)")
    wdel.add_argument("--follow", action="store_true")
    wdel.add_argument("--interval", type=float, default=1.0, help="--follow: pause when nothing is due")
    wdel.set_defaults(func=cmd_webhook_deliver)
