"""The `callctl` command: one module per noun, each with a `register(top)` that adds its
subcommands; a subcommand's `func(cfg, args)` does the work. A new noun is a new module
listed in NOUNS; a new subcommand goes into its noun's module."""
from __future__ import annotations

import argparse
import os
import sys

from callctl import config as config_mod
from callctl import logs
from callctl.cli import (anomaly, audit, binding, blacklist, block, calls, cdr, common, customer, db, doctor, export,
                         findings, keys, pool, regulator, reveal, serve, tenant, token, webhook)

# In the order `callctl --help` lists them.
NOUNS = (db, tenant, pool, binding, block, blacklist, regulator, cdr, export, anomaly, findings, keys, reveal, audit,
         calls, doctor, serve, token, customer, webhook)


# Exit codes (README.md, "Exit codes").
OK, BAD_INPUT, BAD_CONFIG, DATABASE, INTERNAL, BROKEN_PIPE = 0, 1, 2, 3, 70, 141


class Parser(argparse.ArgumentParser):
    """argparse, its usage errors in one line (exit 2, as argparse's)."""

    def error(self, message: str):
        self.exit(BAD_CONFIG, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="callctl", description="Privacy-number call control")
    parser.add_argument("--config", help="config file (default conf/callctl.yaml or $CALLCTL_CONFIG)")
    top = parser.add_subparsers(dest="command", required=True)
    for noun in NOUNS:
        noun.register(top)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; never a traceback: every failure is one line on stderr and an
    exit code from the table above."""
    try:
        code = _run(argv)
        sys.stdout.flush()  # a reader that went away shows here, not at exit
        return code
    except BrokenPipeError:  # `callctl tenant list | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return BROKEN_PIPE
    except OSError as exc:  # a file, a port, a device: its own message says which
        print(f"callctl: {exc.strerror or type(exc).__name__}"
              f"{f': {exc.filename}' if exc.filename else ''}", file=sys.stderr)
        return BAD_CONFIG
    except KeyboardInterrupt:
        print("callctl: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence, the type only (a message may hold a number)
        print(f"callctl: internal error ({type(exc).__name__}); nothing more is shown, to keep numbers out",
              file=sys.stderr)
        return INTERNAL


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from callctl.errors import ProvisionError
    from callctl.store import crypto, reveal
    from callctl.store.spool import SpoolError

    try:
        cfg = config_mod.load(args.config)
        logs.setup(cfg.log.format, cfg.log.level)
        if getattr(args, "needs_keys", True):
            # At startup, so a missing or bad key stops us here and not at the first call.
            crypto.install(crypto.load_ring(cfg.keys.file, cfg.keys.current))
            if getattr(args, "checks_keys", True):  # the ring must be the database's (keycheck.py)
                from callctl.store import keycheck

                db = common.engine(cfg)
                try:
                    keycheck.verify(db, new_lookup=getattr(args, "rehash", False))
                finally:
                    db.dispose()  # e.g. `serve api` would keep its connection open
        reveal.use_checkpoint(cfg.audit_checkpoint)
        args.func(cfg, args)
    except (config_mod.ConfigError, SpoolError) as exc:
        print(f"callctl: config error: {exc}", file=sys.stderr)
        return BAD_CONFIG
    except crypto.KeyConfigError as exc:
        print(f"callctl: key error: {exc} ({config_mod.source(args.config)})", file=sys.stderr)
        return BAD_CONFIG
    except crypto.DecryptError as exc:
        print(f"callctl: key error: {exc} (is every key still in the ring? 'callctl keys list')",
              file=sys.stderr)
        return BAD_CONFIG
    except ProvisionError as exc:
        print(f"callctl: {exc} [{exc.code}]", file=sys.stderr)
        return BAD_INPUT
    except (OperationalError, ProgrammingError) as exc:
        print(f"callctl: database error: {type(exc.orig).__name__}: {str(exc.orig).splitlines()[0]}"
              " (is the database reachable, and did you run 'callctl db upgrade'?)", file=sys.stderr)
        return DATABASE
    return OK
