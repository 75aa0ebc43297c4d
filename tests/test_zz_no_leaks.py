"""Tests for the suite-wide leak check (tests/leaks.py): planted leaks must fail it.

The check itself runs when the session finishes (hooks in tests/conftest.py), after
every other test and fixture teardown; these tests prove that it really fails on a
real number in a log line, a CDR table, a CLI output or a file left in the temporary
tree, and that it stays quiet on masked numbers, virtual numbers and reveals.
Planted material lives outside this session's basetemp, or the real check would see it.
"""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests import leaks, realnumbers

REPO = Path(__file__).resolve().parent.parent
PLANTED = realnumbers.person("+8613800009901")
LINE = realnumbers.tenant_line("+861058009900")


@pytest.fixture
def outside():
    """A directory outside this session's basetemp and capture."""
    with tempfile.TemporaryDirectory(prefix="callctl-leak-plant-") as folder:
        yield Path(folder)


def scanner():
    return leaks.Scanner({PLANTED}, {LINE})


@pytest.mark.parametrize("written", [
    "+8613800009901", "8613800009901", "008613800009901", "013800009901", "13800009901",
    '{"event": "call routed", "caller": "+8613800009901"}', "tel:+8613800009901;x=1",
])
def test_every_written_form_of_a_real_number_is_found(written):
    hits = scanner().text(f"2026-11-29 {written} end", "log", "daemon.log")
    assert [(h.kind, h.number, h.channel) for h in hits] == [("person", "+86138****9901", "log")]


@pytest.mark.parametrize("written", [
    "+86138****9901",       # masked
    "+8617100009901",       # a virtual number
    "213800009901",         # a longer digit run that merely contains the digits
    "1380000990",           # a shorter one
])
def test_masked_and_other_numbers_are_not_hits(written):
    assert scanner().text(written, "log", "daemon.log") == []


def test_channels_decide_what_may_show():
    check = scanner()
    assert check.text(f"{LINE}", "tenant", "tenant add") == []  # a tenant's own config view
    assert check.text(f"{PLANTED}", "reveal", "audited reveal") == []
    assert [h.kind for h in check.text(f"{LINE}", "cdr", "cdrs")] == ["tenant line"]
    assert [h.kind for h in check.text(f"{PLANTED}", "tenant", "tenant list")] == ["person"]


def test_tree_scan_reads_cdr_tables_logs_and_skips_sipp_traffic(outside):
    db = outside / "lab" / "callctl.db"
    db.parent.mkdir()
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE cdrs (id INTEGER, caller_masked TEXT)")
        conn.execute("CREATE TABLE bindings (id INTEGER, party_a TEXT)")  # the real number's home
        conn.execute("INSERT INTO bindings VALUES (1, ?)", (PLANTED,))
        conn.execute("INSERT INTO cdrs VALUES (1, '+86138****9901')")
    assert scanner().tree(outside) == []
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO cdrs VALUES (2, ?)", (PLANTED,))
    assert [h.where for h in scanner().tree(outside)] == [f"{db} [cdrs]"]
    (outside / "sipp-uac").mkdir()
    (outside / "sipp-uac" / "calls.csv").write_text(f"SEQUENTIAL\n{PLANTED};+8617100000001;\n")
    (outside / "callctl.log").write_text('{"event": "ok", "x": "+8617100000001"}\n')
    assert len(scanner().tree(outside)) == 1
    (outside / "callctl.log").write_text(f'{{"event": "oops", "dest": "{PLANTED}"}}\n')
    assert sorted(Path(h.where).name for h in scanner().tree(outside)) == ["callctl.db [cdrs]", "callctl.log"]
    # What a test gives the product to read is input, not output.
    (outside / "customers.csv").write_text(f"customer\n{PLANTED}\n")
    assert len(scanner().tree(outside)) == 3
    leaks.test_input(outside / "customers.csv")
    assert len(scanner().tree(outside)) == 2


INNER_TEST = '''
from pathlib import Path
from tests import leaks, realnumbers

def test_writes(tmp_path):
    number = "+86" + str(13800009900 + 2)  # built at run time: registered by hand
    realnumbers.person(number)
    kind = {kind!r}
    if kind == "capture":
        leaks.record("cli", "bind", '{{"customer": "' + number + '"}}')
    elif kind == "file":
        (tmp_path / "export.csv").write_text("id,customer\\n1," + number + "\\n")
    elif kind == "literal":
        leaks.record("log", "daemon", "routed to 8613800009903")
    elif kind == "reveal":
        leaks.record("reveal", "grant-7", number)
    else:
        leaks.record("cli", "bind", '{{"customer": "+86138****9902"}}')
        (tmp_path / "export.csv").write_text("id,customer\\n1,+86138****9902\\n")
LITERAL = "+8613800009903"  # a literal in a test module is registered without asking
'''


@pytest.mark.parametrize("kind, leaked", [
    ("capture", True), ("file", True), ("literal", True), ("reveal", False), ("clean", False),
])
def test_a_planted_leak_fails_a_whole_session(outside, kind, leaked):
    (outside / "test_inner.py").write_text(textwrap.dedent(INNER_TEST.format(kind=kind)))
    (outside / "capture").mkdir()
    env = {**os.environ, leaks.CAPTURE_ENV: str(outside / "capture"), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.leaks", "-p", "no:cacheprovider",
         "-c", os.devnull, "--rootdir", str(outside), "--basetemp", str(outside / "basetemp"),
         str(outside / "test_inner.py")],
        capture_output=True, text=True, env=env, cwd=outside, timeout=120,
    )
    assert "1 passed" in done.stdout, done.stdout[-2000:]
    if leaked:
        assert done.returncode == 1, done.stdout[-2000:]
        assert "leak check: real numbers found outside an audited reveal" in done.stdout
        assert "+86138****99" in done.stdout and "1380000990" not in done.stdout  # reported masked
    else:
        assert done.returncode == 0, done.stdout[-2000:]
        assert "leak check: no real number" in done.stdout


def test_source_literals_are_harvested():
    source = 'A = "+8613800009904"\nB = "13800009905"\nX = "+8617100000001"\nN = 13800009906\n'
    assert realnumbers.literals(source) == {"+8613800009904", "+8613800009905", "+8617100000001"}
    assert realnumbers.is_virtual("+8617100000001") and not realnumbers.is_virtual("+8613800009904")
