"""What every noun's commands share: the engine, output for people and programs, moments."""
from __future__ import annotations

import argparse
import getpass
import json
import sys

from callctl.core.bounds import MAX_ID
from callctl.core.times import parse_time


def engine(cfg):
    from callctl.store.db import make_engine

    return make_engine(cfg.database_url, pool_size=cfg.db_threads)


def print_json(data) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain fixed-width table for people."""
    cells = [[("" if r.get(key) is None else str(r.get(key))) for key, _ in columns] for r in rows]
    widths = [max([len(title)] + [len(c[i]) for c in cells]) for i, (_, title) in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()
    return "\n".join([line([t for _, t in columns]), line(["-" * w for w in widths])] + [line(c) for c in cells])


def clock(value: str | None) -> str:
    """An ISO time as a table shows it: 2026-11-21 08:03:00 (UTC)."""
    return (value or "")[:19].replace("T", " ")


def moment(text: str | None, option: str, *, ahead: bool = False):
    """Every --since/--until/--starts/--ends/--expires: callctl.core.times.parse_time."""
    return parse_time(text, option, ahead=ahead, code="invalid_time")


def ident(text: str) -> int:
    """An id argument: a row id the database can hold (1 to 2**63-1)."""
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) <= MAX_ID:
        raise argparse.ArgumentTypeError(f"an id, 1 to {MAX_ID}")
    return int(text)


def after(text: str) -> int:
    """--after: 0 (the start) or an id."""
    return 0 if text == "0" else ident(text)


def count(limit: int):
    """A --limit / --uses / --batch argument: a whole number from 1 to `limit`."""
    def parse(text: str) -> int:
        if not (text.isascii() and text.isdigit()) or not 0 < int(text) <= limit:
            raise argparse.ArgumentTypeError(f"a whole number, 1 to {limit}")
        return int(text)
    parse.__name__ = "count"
    return parse


def seconds(text: str) -> int:
    """A --ttl / --duration argument (the store checks the range and says why)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a whole number of seconds") from None


def non_negative(text: str) -> int:
    if not text.isdigit() or int(text) > 3660:
        raise argparse.ArgumentTypeError("a whole number of days, 0 to 3660")
    return int(text)


def login() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        raise SystemExit("callctl: cannot tell who you are; give --by NAME") from None


def write_out(data: str, output: str | None) -> None:
    """To the --output file, or standard output."""
    if output:
        with open(output, "w", encoding="utf-8") as out:
            out.write(data)
    else:
        sys.stdout.write(data)


def run_bulk(run, file: str) -> None:
    """Run a bulk job with a progress bar on stderr; every rejected row is listed."""
    from tqdm import tqdm

    try:
        with open(file, "rb") as handle:
            total = max(sum(1 for _ in handle) - 1, 0)
    except OSError as exc:
        raise SystemExit(f"callctl: {file}: {exc.strerror}") from None
    with tqdm(total=total, unit="row", file=sys.stderr, dynamic_ncols=True) as bar:
        result = run(bar.update)
    for problem in result.errors:
        print(f"callctl: {file}: {problem}", file=sys.stderr)
    print_json({  # rows = done + existing + rejected
        "rows": result.rows, "done": result.done, "existing": result.existing, "rejected": len(result.errors),
        "bound_file": str(result.bound_file) if result.bound_file else None,
        "rejected_file": str(result.rejected_file) if result.rejected_file else None,
    })
    if result.errors:
        print(f"callctl: {len(result.errors)} row(s) rejected, listed above and kept in {result.rejected_file}; "
              "the other rows are done", file=sys.stderr)
        raise SystemExit(1)


def values(enum) -> list[str]:
    """An enum's values as argparse choices (plain strings: its error messages show them)."""
    return [str(member) for member in enum]


class Follow:
    """A --follow command's signals: SIGTERM or SIGINT stop it once the work under way is
    done; SIGHUP asks it to read its settings again (reload_requested). Either ends a
    pause at once. Passed where a stop Event is expected (is_set, wait)."""

    def __init__(self):
        import signal
        import threading

        self._stop, self._hup, self._wake = threading.Event(), threading.Event(), threading.Event()
        for sig, event in ((signal.SIGTERM, self._stop), (signal.SIGINT, self._stop), (signal.SIGHUP, self._hup)):
            signal.signal(sig, self._setter(event))

    def _setter(self, event):
        import threading

        def handler(*_):
            # From a thread of its own: Event.set() in the handler itself would deadlock should
            # the signal land while the main thread holds the Event's lock (inside its wait).
            threading.Thread(target=lambda: (event.set(), self._wake.set()), daemon=True).start()
        return handler

    def is_set(self) -> bool:
        return self._stop.is_set()

    def wait(self, seconds: float) -> bool:
        """Pause up to `seconds`, less if a signal comes; True when stopping."""
        self._wake.wait(seconds)
        self._wake.clear()
        return self._stop.is_set()

    def reload_requested(self) -> bool:
        if not self._hup.is_set():
            return False
        self._hup.clear()
        return True
