"""`callctl reveal`: audited reveals of a real number (docs/reveal.md)."""
from __future__ import annotations

from callctl.cli import common
from callctl.cli.common import engine, print_json, values
from callctl.core.enums import RevealParty, RevealScenario


def request(cfg, args):
    from callctl.store import reveal

    print_json(reveal.request(engine(cfg), args.binding, args.party, args.scenario, args.case, args.by,
                              max_uses=args.uses, ttl_seconds=args.ttl))


def decide(cfg, args):
    from callctl.store import reveal

    how = reveal.approve if args.sub == "approve" else reveal.refuse
    print_json(how(engine(cfg), args.grant_id, args.by, note=args.note or ""))


def use(cfg, args):
    from callctl.store import reveal

    print_json(reveal.use(engine(cfg), args.grant_id, args.by))


def list_(cfg, args):
    from callctl.store import reveal

    print_json(reveal.list_grants(engine(cfg), binding_id=args.binding))


def register(top) -> None:
    reveal = top.add_parser("reveal", help="audited reveals of a real number (docs/reveal.md)").add_subparsers(
        dest="sub", required=True)
    cmd = reveal.add_parser("request", help="ask for a grant to see one party's real number")
    cmd.add_argument("--binding", type=common.ident, required=True)
    cmd.add_argument("--party", choices=values(RevealParty), default="a", help="a: the customer (default); b: AXB's other")
    cmd.add_argument("--scenario", choices=values(RevealScenario), required=True)
    cmd.add_argument("--case", required=True, help="the case reference")
    cmd.add_argument("--by", required=True, help="your name (the requester)")
    cmd.add_argument("--uses", type=common.count(100), default=1, help="reveals allowed (default 1)")
    cmd.add_argument("--ttl", type=common.seconds, default=3600, help="seconds the grant lasts after approval (default 3600)")
    cmd.set_defaults(func=request)
    for name, what in (("approve", "approve a grant (a second person)"), ("refuse", "refuse a grant")):
        cmd = reveal.add_parser(name, help=what)
        cmd.add_argument("grant_id", type=common.ident)
        cmd.add_argument("--by", required=True, help="your name (not the requester's)")
        cmd.add_argument("--note")
        cmd.set_defaults(func=decide)
    cmd = reveal.add_parser("use", help="see the real number under an active grant (audited)")
    cmd.add_argument("grant_id", type=common.ident)
    cmd.add_argument("--by", required=True, help="your name (the requester)")
    cmd.set_defaults(func=use)
    cmd = reveal.add_parser("list", help="grants and their state")
    cmd.add_argument("--binding", type=common.ident)
    cmd.set_defaults(func=list_)
