"""`callctl webhook`: insurers' event endpoints (docs/webhooks.md)."""
from __future__ import annotations

import json
import sys

import structlog

from callctl.cli.common import Follow, engine, print_json, table

log = structlog.get_logger("callctl.webhooks")

WEBHOOK_TABLE = [("id", "id"), ("tenant", "tenant"), ("url", "url"), ("delivered", "delivered"),
                 ("pending", "pending"), ("failing", "failing"), ("last_status", "last status"),
                 ("last_error", "last error"), ("removed_at", "removed")]


def _retry(cfg):
    from callctl.webhooks import Retry

    w = cfg.webhooks
    return Retry(first=w.retry_seconds, most=w.max_retry_seconds, timeout=w.timeout)


def add(cfg, args):
    from callctl.webhooks import add_webhook

    print_json(add_webhook(engine(cfg), args.tenant, args.url, args.secret))
    if not args.secret:
        print("callctl: the secret above is shown once; give it to the insurer to verify signatures",
              file=sys.stderr)


def list_(cfg, args):
    from callctl.webhooks import list_webhooks

    rows = list_webhooks(engine(cfg), args.tenant)
    if args.json:
        print_json(rows)
    else:
        print(table(rows, WEBHOOK_TABLE))


def test(cfg, args):
    from callctl.webhooks import ping_webhook

    outcome = ping_webhook(engine(cfg), args.webhook_id, _retry(cfg))
    print_json(outcome)
    if not outcome["ok"]:
        raise SystemExit(4)


def remove(cfg, args):
    from callctl.webhooks import remove_webhook

    print_json(remove_webhook(engine(cfg), args.webhook_id))


def deliver(cfg, args):
    from callctl.webhooks import deliver as deliver_due

    if not args.interval > 0:
        raise SystemExit("callctl: --interval must be a positive number of seconds")
    signals = Follow()  # SIGTERM: the delivery under way finishes, then we exit; SIGHUP: reload
    in_force = [cfg.webhooks]

    def reload(current):
        if not signals.reload_requested():
            return current
        from callctl import config as config_mod
        from callctl.lifecycle import changed

        try:
            fresh = config_mod.load(cfg.source)
        except config_mod.ConfigError as exc:
            log.error("webhook settings not reloaded: configuration not valid, settings kept", error=str(exc))
            return current
        log.info("webhook settings reloaded",
                 changed=[f"webhooks.{key}" for key in changed(in_force[0], fresh.webhooks)])
        in_force[0] = fresh.webhooks
        return _retry(fresh)

    if args.follow:
        log.info("delivering webhook events until stopped", interval=args.interval)
    print(json.dumps(deliver_due(engine(cfg), _retry(cfg), follow=args.follow, interval=args.interval,
                                 stop=signals, reload=reload)), flush=True)


def register(top):
    webhook = top.add_parser("webhook", help="insurers' event endpoints (docs/webhooks.md)") \
        .add_subparsers(dest="sub", required=True)
    cmd = webhook.add_parser("add", help="a new endpoint; prints its signing secret once")
    cmd.add_argument("--tenant", required=True)
    cmd.add_argument("--url", required=True, help="https://... (POSTed JSON events)")
    cmd.add_argument("--secret", help="the signing secret (default: a new random one)")
    cmd.set_defaults(func=add)
    cmd = webhook.add_parser("list", help="endpoints and their delivery status")
    cmd.add_argument("--tenant")
    cmd.add_argument("--json", action="store_true", help="JSON for programs")
    cmd.set_defaults(func=list_)
    cmd = webhook.add_parser("test", help="send a signed test event now; exit 4 if it failed")
    cmd.add_argument("webhook_id", type=int)
    cmd.set_defaults(func=test)
    cmd = webhook.add_parser("remove", help="stop delivering to an endpoint")
    cmd.add_argument("webhook_id", type=int)
    cmd.set_defaults(func=remove)
    cmd = webhook.add_parser("deliver", help="send due events (--follow: keep going until stopped; "
                                             "SIGHUP: read the webhooks settings again)")
    cmd.add_argument("--follow", action="store_true")
    cmd.add_argument("--interval", type=float, default=1.0, help="--follow: pause when nothing is due")
    cmd.set_defaults(func=deliver)
    return webhook
