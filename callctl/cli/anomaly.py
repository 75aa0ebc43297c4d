"""`callctl anomaly`: the anomaly job over CDRs."""
from __future__ import annotations

import json

from callctl.cli.common import engine


def _rules(cfg, args):
    from callctl.anomaly.config import load

    return load(args.rules or cfg.anomaly_rules)


def run(cfg, args):
    from callctl.anomaly.job import follow, run_pass

    if args.interval is not None and not args.interval > 0:
        raise SystemExit("callctl: --interval must be a positive number of seconds")
    rules = _rules(cfg, args)
    db = engine(cfg)
    report = lambda r: print(json.dumps({
        "cdrs": r.cdrs, "from_id": r.from_id, "to_id": r.to_id, "new_findings": r.new_findings,
        "by_rule": {k: v for k, v in r.findings.items() if v}, "blocks": r.blocks,
        "blacklist_proposals": r.blacklist, "seconds": round(r.seconds, 3)}), flush=True)
    if not args.follow:
        report(run_pass(db, rules))
        return
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())  # the pass under way finishes, then we exit
    follow(db, rules, stop, interval=args.interval, on_pass=report)


def register(top) -> None:
    anomaly = top.add_parser("anomaly", help="the anomaly job over CDRs").add_subparsers(dest="sub", required=True)
    cmd = anomaly.add_parser("run", help="one pass from the stored watermark (--follow: keep going)")
    cmd.add_argument("--rules", help="rules file (default: anomaly_rules in the config)")
    cmd.add_argument("--follow", action="store_true", help="keep consuming new CDRs until SIGTERM")
    cmd.add_argument("--interval", type=float, help="--follow: seconds between passes (default from the rules file)")
    cmd.set_defaults(func=run, needs_keys=False)  # reads masked CDRs and hashes only
