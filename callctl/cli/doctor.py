"""`callctl doctor`: check this box end to end and say what to fix."""
from __future__ import annotations


def doctor(cfg, args):
    from callctl import doctor as checks_mod

    checks = checks_mod.run(cfg)
    print(checks_mod.report(checks))
    if any(check.status is checks_mod.Status.FAIL for check in checks):
        raise SystemExit(1)


def register(top) -> None:
    top.add_parser("doctor", help="check this box end to end and say what to fix").set_defaults(
        func=doctor, needs_keys=False)
