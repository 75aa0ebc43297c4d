"""`callctl token`: provisioning API tokens."""
from __future__ import annotations

import sys

from callctl.cli import common
from callctl.cli.common import engine, print_json


def create(cfg, args):
    from callctl.store.tokens import create_token

    print_json(create_token(engine(cfg), role=args.role, tenant_name=args.tenant, name=args.name or ""))
    print("keep the token now: it is stored hashed and cannot be shown again", file=sys.stderr)


def list_(cfg, args):
    from callctl.store.tokens import list_tokens

    print_json(list_tokens(engine(cfg)))


def revoke(cfg, args):
    from callctl.store.tokens import revoke_token

    print_json(revoke_token(engine(cfg), args.token_id))


def register(top) -> None:
    token = top.add_parser("token", help="provisioning API tokens").add_subparsers(dest="sub", required=True)
    cmd = token.add_parser("create", help="make a token; it is printed once, stored hashed")
    cmd.add_argument("--tenant", help="the tenant it acts for (role tenant)")
    cmd.add_argument("--role", default="tenant", help="what the token may do (default tenant)")
    cmd.add_argument("--name", help="what it is for, e.g. the insurer's policy system")
    cmd.set_defaults(func=create)
    token.add_parser("list", help="tokens (never the tokens themselves)").set_defaults(func=list_)
    cmd = token.add_parser("revoke", help="stop a token working, at once")
    cmd.add_argument("token_id", type=common.ident)
    cmd.set_defaults(func=revoke)
