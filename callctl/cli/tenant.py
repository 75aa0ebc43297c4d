"""`callctl tenant`: businesses, their hotline, agents, hours and limits."""
from __future__ import annotations

import argparse

from callctl.cli.common import engine, print_json, values
from callctl.core.decision import Purpose


def add(cfg, args):
    from callctl.store.tenants import add_tenant

    print_json(add_tenant(
        engine(cfg), args.name, args.hotline,
        callers=args.caller, caller_prefixes=args.caller_prefix, strict=args.strict,
        ring_timeout=args.ring_timeout, max_call_seconds=args.max_call_seconds,
        hours=args.hours, time_zone=args.tz, region=cfg.region,
    ))


def update(cfg, args):
    from callctl.store.tenants import update_tenant

    print_json(update_tenant(
        engine(cfg), args.name, hours=args.hours, time_zone=args.tz, ring_timeout=args.ring_timeout,
        max_call_seconds=args.max_call_seconds, strict=args.strict,
        max_concurrent_calls=args.max_concurrent_calls,
    ))


def list_(cfg, args):
    from callctl.store.tenants import list_tenants

    print_json(list_tenants(engine(cfg)))


def callers(cfg, args):
    from callctl.store.tenants import add_callers

    print_json(add_callers(engine(cfg), args.name, callers=args.caller, caller_prefixes=args.caller_prefix,
                           purpose=args.purpose, region=cfg.region))


def register(top):
    tenant = top.add_parser("tenant", help="tenants (businesses)").add_subparsers(dest="sub", required=True)
    cmd = tenant.add_parser("add", help="add a tenant")
    cmd.add_argument("name")
    cmd.add_argument("--hotline", required=True, help="the number customers reach (N)")
    cmd.add_argument("--caller", action="append", default=[], help="an agent's number (repeatable)")
    cmd.add_argument("--caller-prefix", action="append", default=[], help="agents' number prefix, e.g. +86105555")
    cmd.add_argument("--strict", action=argparse.BooleanOptionalAction, default=True,
                     help="reject unknown callers (default) or send them to the hotline")
    cmd.add_argument("--ring-timeout", type=int, default=30, help="seconds (default 30)")
    cmd.add_argument("--max-call-seconds", type=int, default=3600, help="default 3600")
    cmd.add_argument("--hours", default="08:00-21:00",
                     help="when the tenant may call customers, local time (default 08:00-21:00)")
    cmd.add_argument("--tz", default="Asia/Shanghai", help="the tenant's time zone (default Asia/Shanghai)")
    cmd.set_defaults(func=add)
    tenant.add_parser("list", help="list tenants").set_defaults(func=list_)
    cmd = tenant.add_parser("update", help="change a tenant's calling hours, zone and limits")
    cmd.add_argument("name")
    cmd.add_argument("--hours", help="HH:MM-HH:MM local time; crossing midnight is fine (22:00-06:00)")
    cmd.add_argument("--tz", help="IANA time zone, e.g. Asia/Shanghai")
    cmd.add_argument("--ring-timeout", type=int, help="seconds")
    cmd.add_argument("--max-call-seconds", type=int, help="the PBX cuts the call there")
    cmd.add_argument("--strict", action=argparse.BooleanOptionalAction, default=None)
    cmd.add_argument("--max-concurrent-calls", type=int,
                     help="calls of the tenant up at once on one PBX (486 past it); 0: no limit")
    cmd.set_defaults(func=update)
    cmd = tenant.add_parser("callers", help="put agents' numbers/prefixes in the caller group of a purpose")
    cmd.add_argument("name", help="the tenant")
    cmd.add_argument("--purpose", required=True, choices=values(Purpose),
                     help="why these agents call (a binding accepts all but marketing by default)")
    cmd.add_argument("--caller", action="append", default=[], help="an agent's number (repeatable)")
    cmd.add_argument("--caller-prefix", action="append", default=[], help="agents' number prefix")
    cmd.set_defaults(func=callers)
    return tenant
