"""`callctl anomaly`: the anomaly job over CDRs."""
from __future__ import annotations

import json

import structlog

from callctl.cli.common import Follow, engine

log = structlog.get_logger("callctl.anomaly")


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
    signals = Follow()  # SIGTERM: the pass under way finishes, then we exit; SIGHUP: reload

    def reload(current):
        if not signals.reload_requested():
            return current
        from callctl import config as config_mod
        from callctl.lifecycle import changed

        try:
            fresh = _rules(config_mod.load(cfg.source), args)
        except config_mod.ConfigError as exc:
            log.error("anomaly rules not reloaded: not valid, the rules in force kept", error=str(exc))
            return current
        log.info("anomaly rules reloaded", changed=changed(current, fresh))
        return fresh

    follow(db, rules, signals, interval=args.interval, on_pass=report, reload=reload)


def register(top) -> None:
    anomaly = top.add_parser("anomaly", help="the anomaly job over CDRs").add_subparsers(dest="sub", required=True)
    cmd = anomaly.add_parser("run", help="one pass from the stored watermark (--follow: keep going)")
    cmd.add_argument("--rules", help="rules file (default: anomaly_rules in the config)")
    cmd.add_argument("--follow", action="store_true", help="keep consuming new CDRs until SIGTERM (SIGHUP: read the rules again)")
    cmd.add_argument("--interval", type=float, help="--follow: seconds between passes (default from the rules file)")
    cmd.set_defaults(func=run, needs_keys=False)  # reads masked CDRs and hashes only
