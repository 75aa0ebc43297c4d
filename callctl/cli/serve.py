"""`callctl serve`: run the daemon (a PBX backend) or the provisioning API."""
from __future__ import annotations

import os


def pbx(cfg, args):
    """`serve asterisk|freeswitch`: the daemon with the PBX backend of that name (callctl/daemon.py)."""
    from callctl.daemon import serve

    serve(args.sub, cfg)


def api(cfg, args):
    from callctl.api.app import serve

    if args.config:  # the server (and each worker process) loads the same file
        os.environ["CALLCTL_CONFIG"] = args.config
    serve(cfg)


def register(top) -> None:
    serve = top.add_parser("serve", help="run the daemon").add_subparsers(dest="sub", required=True)
    serve.add_parser("asterisk", help="FastAGI server for Asterisk").set_defaults(
        func=pbx, checks_keys=False)  # checks the ring itself: the database may be down at start
    serve.add_parser("freeswitch", help="ESL server for FreeSWITCH's socket application (freeswitch.listen)"
                     ).set_defaults(func=pbx, checks_keys=False)
    serve.add_parser("api", help="provisioning HTTP API (api.listen)").set_defaults(func=api)
