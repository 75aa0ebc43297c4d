"""The suite-wide leak check: when the test session finishes, every log line, CDR, CLI
output, API body and export the suite produced is searched for the real numbers the
tests used (tests/realnumbers.py); any hit outside an audited reveal fails the session.

What it sees:
- the capture directory ($CALLCTL_TEST_CAPTURE, one per session): what tests record
  with `record(channel, name, text)` - CLI outputs (tests/test_cli.py `run`), API
  bodies, exports, reveals - and the product tables of every test database, dumped by
  `record_tables` before the database is reset or dropped (conftest `engine`,
  tests/pg.py `TestDatabase.drop`);
- pytest's whole temporary tree (basetemp): daemon logs of the lab runs, CDR spools,
  exports written to files, and the product tables of every SQLite database left there.
  SIPp work directories are skipped: that is the signalling itself, where the PBX must
  dial the real number.

A number counts in its usual written forms: +8613800000001, 8613800000001,
008613800000001, 013800000001 and 13800000001 (not inside a longer digit run).
Masked forms (+86138****0001) do not match.

Channels (the first part of a capture file name): log, cli, api, export, cdr, file (any
product output), tenant (a tenant's own configuration shown to its administrators:
tenant lines allowed), reveal (an audited reveal: everything allowed).
"""
from __future__ import annotations

import os
import re
import shutil
import sqlite3
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import phonenumbers
import pytest

from tests import realnumbers

CAPTURE_ENV = "CALLCTL_TEST_CAPTURE"
CHANNELS = ("log", "cli", "api", "export", "cdr", "file", "tenant", "reveal", "metrics", "feed", "register")
# Tables whose rows are shown to people (CLI, API, exports, the regulator's feed): they
# must hold masked numbers (events: the webhooks outbox, masked bodies; the blacklist's
# number column is ciphertext).
SCANNED_TABLES = ("cdrs", "events", "audit_log", "blacklist", "blacklist_evidence")
_SIPP_MARKERS = ("stat.csv", "calls.csv")  # a SIPp work directory (lab/sipp.py)
_MAX_BYTES = 64 * 1024 * 1024
_INPUTS: set[Path] = set()  # files a test gave the product (see test_input)


@dataclass(frozen=True)
class Hit:
    where: str  # file (and table) that holds the number
    channel: str
    kind: str  # person | tenant line
    number: str  # masked, for the report

    def __str__(self) -> str:
        return f"{self.kind} {self.number} in {self.channel}: {self.where}"


# -- recording (used by tests and fixtures) ----------------------------------------------

def capture_dir() -> Path | None:
    value = os.environ.get(CAPTURE_ENV)
    return Path(value) if value else None


def record(channel: str, name: str, text: str) -> None:
    """Keep one output of the product for the leak check (no-op outside a session)."""
    if channel not in CHANNELS:
        raise ValueError(f"unknown capture channel {channel!r}")
    folder = capture_dir()
    if folder is None:
        return
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80]
    (folder / f"{channel}--{safe}--{uuid.uuid4().hex[:8]}.txt").write_text(text, errors="replace")


def test_input(*paths) -> None:
    """Files a test writes for the product to read (e.g. a bulk CSV of customers), and
    the product's return of those same rows to the operator (FILE.rejected.csv): input
    material, not product output, so the tree scan skips them."""
    _INPUTS.update(Path(p).resolve() for p in paths)


def record_tables(engine, label: str) -> None:
    """Dump the product tables of a test database before it is reset or dropped."""
    if capture_dir() is None:
        return
    from sqlalchemy import inspect, text

    try:
        present = set(inspect(engine).get_table_names())
        with engine.connect() as conn:
            for table in SCANNED_TABLES:
                if table in present:
                    rows = conn.execute(text(f"SELECT * FROM {table}")).all()
                    if rows:
                        record("cdr", f"{label}-{table}", "\n".join(repr(tuple(r)) for r in rows))
    except Exception as exc:  # a database already gone has nothing left to show
        record("file", f"{label}-unreadable", f"tables not readable: {type(exc).__name__}")


# -- scanning ---------------------------------------------------------------------------

def _forms(number: str) -> str:
    parsed = phonenumbers.parse(number, None)
    cc = str(parsed.country_code)
    nsd = phonenumbers.national_significant_number(parsed)
    return rf"(?:\+?{cc}|00{cc}|0)?{nsd}"


class Scanner:
    """Finds registered numbers in text, honouring what each channel may show."""

    def __init__(self, people: set[str], tenant_lines: set[str]):
        self.kind = {n: "tenant line" for n in tenant_lines} | {n: "person" for n in people}
        self.numbers = sorted(self.kind)
        self.seen = {"captures": 0, "files": 0, "tables": 0}  # what was read, for the report
        self.pattern = re.compile(
            r"(?<!\d)(?:" + "|".join(f"(?P<n{i}>{_forms(n)})" for i, n in enumerate(self.numbers)) + r")(?!\d)"
        ) if self.numbers else None

    def allowed(self, kind: str, channel: str) -> bool:
        return channel == "reveal" or (channel == "tenant" and kind == "tenant line")

    def text(self, text: str, channel: str, where: str) -> list[Hit]:
        if self.pattern is None:
            return []
        hits = set()
        for match in self.pattern.finditer(text):
            number = self.numbers[int(match.lastgroup[1:])]
            kind = self.kind[number]
            if not self.allowed(kind, channel):
                hits.add(Hit(where, channel, kind, _mask(number)))
        return sorted(hits, key=str)

    def capture(self, folder: Path) -> list[Hit]:
        hits = []
        for path in sorted(Path(folder).glob("*.txt")):
            channel = path.name.split("--", 1)[0]
            self.seen["captures"] += 1
            hits += self.text(path.read_text(errors="replace"), channel if channel in CHANNELS else "file",
                              str(path))
        return hits

    def tree(self, root: Path, skip: Path | None = None) -> list[Hit]:
        """Every file under root: SQLite databases by their product tables, the rest as text."""
        hits = []
        for folder, dirs, files in os.walk(root):
            if skip is not None and Path(folder) == skip:
                dirs[:] = []
                continue
            if any(marker in files for marker in _SIPP_MARKERS):
                continue
            for name in files:
                path = Path(folder) / name
                if name.endswith(("-wal", "-shm", "-journal")) or not path.is_file() or path.resolve() in _INPUTS:
                    continue
                head = path.open("rb").read(16)
                if head.startswith(b"SQLite format 3"):
                    hits += self.sqlite(path)
                elif path.stat().st_size <= _MAX_BYTES:
                    self.seen["files"] += 1
                    hits += self.text(path.read_text(errors="replace"), "file", str(path))
        return hits

    def sqlite(self, path: Path) -> list[Hit]:
        hits = []
        try:
            conn = sqlite3.connect(path)
            try:
                present = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                for table in SCANNED_TABLES:
                    if table in present:
                        self.seen["tables"] += 1
                        rows = conn.execute(f"SELECT * FROM {table}").fetchall()
                        hits += self.text("\n".join(repr(r) for r in rows), "cdr", f"{path} [{table}]")
            finally:
                conn.close()
        except sqlite3.Error:
            hits += self.text(path.read_bytes().decode(errors="replace"), "file", str(path))
        return hits


def _mask(number: str) -> str:
    from callctl.core.numbers import mask

    return mask(number)


def scan(capture: Path | None, basetemp: Path | None, sources: list[Path]) -> tuple[list[Hit], dict]:
    """Register the numbers of the test sources, then scan the capture and basetemp.
    Returns the hits and how much was read."""
    for folder in {Path(s).parent for s in sources}:
        realnumbers.register_sources(folder)
    scanner = Scanner(realnumbers.PEOPLE, realnumbers.TENANT_LINES)
    hits = []
    if capture is not None and capture.is_dir():
        hits += scanner.capture(capture)
    if basetemp is not None and basetemp.is_dir():
        hits += scanner.tree(basetemp, skip=capture)
    return hits, {**scanner.seen, "numbers": len(scanner.numbers)}


# -- the pytest hooks (imported by tests/conftest.py) ------------------------------------

_HITS = pytest.StashKey[list]()
_SEEN = pytest.StashKey[dict]()


def pytest_configure(config):
    if not os.environ.get(CAPTURE_ENV):
        os.environ[CAPTURE_ENV] = tempfile.mkdtemp(prefix="callctl-capture-")
        config.stash[_HITS] = []
        config._callctl_capture_owned = True


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    capture = capture_dir()
    factory = getattr(config, "_tmp_path_factory", None)
    basetemp = factory.getbasetemp() if factory is not None and factory._basetemp is not None else None
    sources = sorted({Path(item.path) for item in session.items} | {Path(__file__)})
    hits, config.stash[_SEEN] = scan(capture, basetemp, sources)
    config.stash[_HITS] = hits
    if hits:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    elif capture is not None and getattr(config, "_callctl_capture_owned", False):
        shutil.rmtree(capture, ignore_errors=True)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    hits = config.stash.get(_HITS, None)
    if hits is None:
        return
    seen = config.stash.get(_SEEN, {})
    read = (f"{seen.get('numbers', 0)} numbers; {seen.get('captures', 0)} captured outputs, "
            f"{seen.get('files', 0)} files, {seen.get('tables', 0)} SQLite CDR tables read")
    if not hits:
        terminalreporter.write_line(f"leak check: no real number in any log, CDR, output or export ({read})")
        return
    terminalreporter.section("leak check: real numbers found outside an audited reveal", red=True)
    for hit in hits[:200]:
        terminalreporter.write_line(str(hit))
    terminalreporter.write_line(f"{len(hits)} leak(s); the capture is kept at {capture_dir()}")
    terminalreporter.write_line("(a test pool's virtual numbers are not leaks: list their range in "
                                "tests/realnumbers.py VIRTUAL_PREFIXES)")
