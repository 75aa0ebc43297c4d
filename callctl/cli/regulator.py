"""`callctl regulator`: the regulator's live feed (docs/regulator.md)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from callctl.cli import common
from callctl.cli.common import engine


def feed(cfg, args):
    """JSON lines, one event each, oldest first; --follow keeps reading (SIGTERM stops it
    after the line under way). --cursor-file keeps the position across restarts."""
    import signal
    import threading

    from callctl import feed as events

    if not args.interval > 0:
        raise SystemExit("callctl: --interval must be a positive number of seconds")
    cursor = args.after
    state = Path(args.cursor_file) if args.cursor_file else None
    if cursor is None and state is not None and state.exists():
        cursor = state.read_text().strip() or None
    events.decode(cursor)  # a bad cursor is an error before anything is read
    db, stop = engine(cfg), threading.Event()
    if args.follow:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set():
        got = events.page(db, cursor, args.limit)
        for event in got["events"]:
            sys.stdout.write(json.dumps(event, ensure_ascii=False, default=str) + "\n")
        sys.stdout.flush()
        if state is not None and got["next"] != cursor:
            temporary = state.with_name(state.name + ".tmp")
            temporary.write_text(got["next"] + "\n")
            os.replace(temporary, state)  # whole or not at all, across a crash
        cursor = got["next"]
        if not got["more"]:
            if not args.follow:
                return
            stop.wait(args.interval)


def register(top) -> None:
    regulator = top.add_parser("regulator", help="the regulator's live feed (docs/regulator.md)").add_subparsers(
        dest="sub", required=True)
    cmd = regulator.add_parser("feed", help="contact-behaviour events as JSON lines, oldest first")
    cmd.add_argument("--after", help="start after this cursor (an event's `cursor`); default: the beginning")
    cmd.add_argument("--cursor-file", help="resume from the cursor kept in this file and keep it up to date")
    cmd.add_argument("--follow", action="store_true", help="keep reading new events (SIGTERM stops it)")
    cmd.add_argument("--interval", type=float, default=2.0, help="--follow: seconds between reads when idle")
    cmd.add_argument("--limit", type=common.count(1000), default=500, help="events per read (1-1000)")
    cmd.set_defaults(func=feed)
