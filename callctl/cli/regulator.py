"""`callctl regulator`: the regulator's live feed (docs/regulator.md)."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from callctl.cli import common
from callctl.cli.common import engine


class _Stopped(Exception):
    """SIGTERM or SIGINT reached `feed --follow`."""


def _stop(*_):
    raise _Stopped


@contextmanager
def _whole(signals):
    """Hold `signals` back while a page's lines and the cursor file are written, so a stop
    never cuts a line or leaves the file behind what was printed; a signal that came
    meanwhile is delivered (and stops the feed) when this ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def feed(cfg, args):
    """JSON lines, one event each, oldest first; --follow keeps reading (SIGTERM or SIGINT
    stops it, exit 0, after the lines under way). --cursor-file keeps the position across
    restarts."""
    from callctl import feed as events

    if not args.interval > 0:
        raise SystemExit("callctl: --interval must be a positive number of seconds")
    cursor = args.after
    state = Path(args.cursor_file) if args.cursor_file else None
    if cursor is None and state is not None and state.exists():
        cursor = state.read_text().strip() or None
    events.decode(cursor)  # a bad cursor is an error before anything is read
    db = engine(cfg)
    stoppers = {signal.SIGTERM, signal.SIGINT} if args.follow else set()
    # The handler raises rather than setting a threading.Event: Event.set() from a signal
    # handler deadlocks when the signal lands while Event.wait() holds the Event's lock.
    for sig in stoppers:
        signal.signal(sig, _stop)
    try:
        while True:
            got = events.page(db, cursor, args.limit)
            with _whole(stoppers):
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
                time.sleep(args.interval)
    except _Stopped:
        return


def register(top) -> None:
    regulator = top.add_parser("regulator", help="the regulator's live feed (docs/regulator.md)").add_subparsers(
        dest="sub", required=True)
    cmd = regulator.add_parser("feed", help="contact-behaviour events as JSON lines, oldest first")
    cmd.add_argument("--after", help="start after this cursor (an event's `cursor`); default: the beginning")
    cmd.add_argument("--cursor-file", help="resume from the cursor kept in this file and keep it up to date")
    cmd.add_argument("--follow", action="store_true", help="keep reading new events (SIGTERM or SIGINT stops it, exit 0)")
    cmd.add_argument("--interval", type=float, default=2.0, help="--follow: seconds between reads when idle")
    cmd.add_argument("--limit", type=common.count(1000), default=500, help="events per read (1-1000)")
    cmd.set_defaults(func=feed)
