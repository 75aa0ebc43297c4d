"""`callctl keys`: the keys of the real numbers at rest (docs/keys.md)."""
from __future__ import annotations

import sys
from datetime import datetime, timezone

from callctl.cli import common
from callctl.cli.common import engine, table


def generate(cfg, args):
    from callctl.store.crypto import append_key

    key_id = args.id or "k" + datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")
    path = args.file or cfg.keys.file
    append_key(path, key_id)
    print(f"added key '{key_id}' to {path}; as the last key listed it is the current key "
          "unless keys.current names another (docs/keys.md)")


def list_(cfg, args):
    from callctl.store import crypto
    from callctl.store.reencrypt import key_usage

    ring = crypto.ring()
    usage = key_usage(engine(cfg))
    rows = [{"key": k, "role": "current (writes)" if k == ring.current else "read only",
             "numbers": usage.get(k, 0)} for k in ring.keys]
    rows += [{"key": k, "role": "MISSING from the ring" if k != "plaintext" else "not encrypted yet",
              "numbers": n} for k, n in sorted(usage.items()) if k not in ring.keys]
    print(table(rows, [("key", "key"), ("role", "role"), ("numbers", "stored numbers")]))


def rotate(cfg, args):
    from callctl.store import crypto
    from callctl.store.reencrypt import reencrypt

    def progress(table_name, count):
        print(f"  {table_name}: {count} row(s) re-encrypted", file=sys.stderr)

    done = reencrypt(engine(cfg), batch=args.batch, rehash=args.rehash, progress=progress)
    if args.rehash:  # every hash is under the ring's lookup secret now: it is the database's
        from callctl.store import keycheck

        keycheck.store_lookup(engine(cfg))
    print(f"re-encrypted under key '{crypto.ring().current}': "
          + ", ".join(f"{name} {count}" for name, count in done.items()))


def register(top) -> None:
    keys = top.add_parser("keys", help="keys of the real numbers at rest (docs/keys.md)").add_subparsers(
        dest="sub", required=True)
    cmd = keys.add_parser("generate", help="create the key file or add a new (current) key to it")
    cmd.add_argument("--file", help="key file (default: keys.file of the config)")
    cmd.add_argument("--id", help="key id (default: k + UTC date and time)")
    cmd.set_defaults(func=generate, needs_keys=False)
    keys.add_parser("list", help="keys in the ring and the stored numbers under each").set_defaults(func=list_)
    cmd = keys.add_parser("rotate", help="re-encrypt stored numbers under the current key")
    cmd.add_argument("--batch", type=common.count(1000000), default=1000, help="rows per transaction (default 1000)")
    cmd.add_argument("--rehash", action="store_true",
                     help="rewrite every row, hashes too (after the lookup secret changed)")
    cmd.set_defaults(func=rotate)
