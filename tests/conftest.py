from __future__ import annotations

import os

import pytest
from hypothesis import settings

from callctl import logs
from callctl.store.crypto import ENV_KEYS, LOOKUP, new_key
from callctl.store.db import make_engine, upgrade

from tests import leaks
from tests.leaks import pytest_configure, pytest_sessionfinish, pytest_terminal_summary  # noqa: F401 (hooks)
from tests.pg import TestDatabase

pytest_plugins = ["tests.figures"]  # measured figures in the terminal summary (tests/figures.py)

logs.setup("console", "warning")

# Property-based fuzz tests (Hypothesis): a modest run in the normal suite; longer runs
# with `--hypothesis-profile fuzz-long`, a failure replayed with `--hypothesis-seed N`.
settings.register_profile("callctl", max_examples=40, deadline=None)
settings.register_profile("fuzz-long", max_examples=2000, deadline=None)
settings.load_profile("callctl")

# One fresh number key ring for this test process and every daemon or CLI it starts.
os.environ.setdefault(ENV_KEYS, f"{LOOKUP}={new_key()} test={new_key()}")


@pytest.fixture(scope="session")
def pg_url():
    db = TestDatabase()
    yield db.url
    db.drop()


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    """A migrated, empty database of each kind."""
    if request.param == "sqlite":
        eng = make_engine(f"sqlite:///{tmp_path}/callctl.db")
    else:
        eng = make_engine(request.getfixturevalue("pg_url"))
        with eng.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    upgrade(eng)
    yield eng
    leaks.record_tables(eng, request.node.nodeid)  # before the next test resets the schema
    eng.dispose()


@pytest.fixture(scope="session")
def lab_up():
    """The Asterisk lab, once per test session for every lab test module: a second
    LabLock taken by the same process would wait for itself."""
    from lab import harness

    with harness.LabLock():
        harness.clear_stale_phones()
        harness.lab("up")
        try:
            yield
        finally:
            harness.lab("down")


@pytest.fixture(scope="session")
def fs_lab_up():
    """The FreeSWITCH lab (lab/freeswitch.sh), once per test session, under the same lock."""
    from lab import harness

    with harness.LabLock():
        harness.clear_stale_phones()
        harness.fs_lab("up")
        try:
            yield
        finally:
            harness.fs_lab("down")
            # FreeSWITCH's own log is product output too: the leak check reads it.
            log = harness.REPO / "var" / "lab-freeswitch" / "log" / "freeswitch.log"
            leaks.record("log", "freeswitch-lab", log.read_text(errors="replace") if log.exists() else "")


@pytest.fixture(scope="session")
def both_labs_up(lab_up, fs_lab_up):
    """Asterisk and FreeSWITCH labs up side by side (their ports differ; one phone on 5070)."""
    from lab import harness

    return {"asterisk": harness.ASTERISK, "freeswitch": harness.FREESWITCH}
