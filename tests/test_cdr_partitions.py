"""The CDR table partitioned by day on PostgreSQL: the migration converts existing CDRs,
every insert lands somewhere (default partition), the coming days are created ahead,
stray rows move into their day, and a call is still stored once."""
from __future__ import annotations

import subprocess
import sys
import threading
from datetime import date, datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from callctl.service import CallService
from tests.agicalls import agi_call
from callctl.store.calls import write_cdr
from callctl.store.db import make_engine, migrations, upgrade
from callctl.store.partitions import cdr_partitions, ensure_cdr_partitions
from callctl.store.spool import CdrSpool

NOW = datetime.now(timezone.utc)


@pytest.fixture
def pg(pg_url):
    engine = make_engine(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public;"
                             " DROP SCHEMA IF EXISTS cdr_partitions CASCADE")
    yield engine
    engine.dispose()


def cdr(call_id: str, started: datetime) -> dict:
    service = CallService(None, None)
    call = agi_call(call_id, called="+8617100000001", caller="+8613900000001", action="reject",
                        reason="unknown_caller", start=f"{started.timestamp():.3f}", end=f"{started.timestamp() + 1:.3f}")
    return service.cdr_row(call, NOW)


def where(engine, call_id: str) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT tableoid::regclass::text FROM cdrs WHERE call_id = :c"),
                                 {"c": call_id}).scalars())


def test_migration_converts_existing_cdrs_into_day_partitions(pg):
    # The schema as it was before 0060, with CDRs on three days.
    with pg.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE schema_migrations (version VARCHAR(100) PRIMARY KEY,"
                             " applied_at VARCHAR(40) NOT NULL DEFAULT CURRENT_TIMESTAMP)")
        for path in migrations("postgresql"):
            if path.stem < "0060":
                conn.exec_driver_sql(path.read_text())
                conn.execute(text("INSERT INTO schema_migrations (version) VALUES (:v)"), {"v": path.stem})
    old_days = [NOW - timedelta(days=40), NOW - timedelta(days=39), NOW - timedelta(days=2)]
    for n, started in enumerate(old_days):
        old = cdr(f"old-{n}", started)
        for later in ("caller_hash", "purpose", "hangup_by"):  # columns of 0069, 0120, 0130:
            old.pop(later, None)  # the daemon of that schema did not write them
        with pg.begin() as conn:  # as that daemon wrote them (today's write also queues webhook events)
            conn.execute(text(f"INSERT INTO cdrs ({', '.join(old)}) VALUES ({', '.join(':' + k for k in old)})"), old)
    assert upgrade(pg) == [p.stem for p in migrations("postgresql") if p.stem >= "0060"]

    with pg.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM pg_partitioned_table"
                                 " WHERE partrelid = 'cdrs'::regclass")).scalar() == 1
        ids = list(conn.execute(text("SELECT id FROM cdrs ORDER BY id")).scalars())
    assert ids == [1, 2, 3]
    for n, started in enumerate(old_days):
        assert where(pg, f"old-{n}") == [f"cdr_partitions.cdrs_{started:%Y%m%d}"]
    names = {p["partition"] for p in cdr_partitions(pg)}
    today = NOW.date()
    assert {f"cdr_partitions.cdrs_{today + timedelta(days=n):%Y%m%d}" for n in range(8)} <= names
    assert "cdr_partitions.cdrs_default" in names
    assert write_cdr(pg, cdr("new", NOW))  # ids carry on after the copied rows
    with pg.connect() as conn:
        assert conn.execute(text("SELECT id FROM cdrs WHERE call_id = 'new'")).scalar() == 4


def test_no_insert_fails_and_stray_rows_move_into_their_day(pg):
    upgrade(pg)
    far = NOW + timedelta(days=30)
    assert write_cdr(pg, cdr("far-1", far)) and write_cdr(pg, cdr("far-2", far + timedelta(seconds=5)))
    assert not write_cdr(pg, cdr("far-1", far))  # still once
    assert where(pg, "far-1") == ["cdr_partitions.cdrs_default"]

    created = ensure_cdr_partitions(pg)
    assert created == [f"cdrs_{far:%Y%m%d}"]  # the coming 7 days exist since the migration
    assert where(pg, "far-1") == where(pg, "far-2") == [f"cdr_partitions.cdrs_{far:%Y%m%d}"]
    assert not write_cdr(pg, cdr("far-1", far))  # the moved row still guards its call
    with pg.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM cdr_partitions.cdrs_default")).scalar() == 0
    assert ensure_cdr_partitions(pg) == []  # idempotent


def test_days_ahead_follow_the_calendar_and_concurrent_makers_agree(pg):
    upgrade(pg)
    later = NOW.date() + timedelta(days=20)
    results, errors = [], []

    def make():
        try:
            results.append(ensure_cdr_partitions(pg, days_ahead=3, today=later))
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    threads = [threading.Thread(target=make) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    made = sorted(name for result in results for name in result)
    assert made == [f"cdrs_{later + timedelta(days=n):%Y%m%d}" for n in range(4)]  # each exactly once
    assert write_cdr(pg, cdr("later", datetime.combine(later, datetime.min.time(), timezone.utc)))
    assert where(pg, "later") == [f"cdr_partitions.cdrs_{later:%Y%m%d}"]  # midnight UTC opens the day


def test_sqlite_is_not_partitioned(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/c.db")
    upgrade(engine)
    assert ensure_cdr_partitions(engine) == [] and cdr_partitions(engine) == []


def test_cli_db_partitions(pg, pg_url, tmp_path):
    upgrade(pg)
    env = {"PATH": "/usr/bin:/bin", "CALLCTL_DATABASE_URL": pg_url}
    run = lambda *args: subprocess.run([sys.executable, "-m", "callctl.cli", *args], capture_output=True,
                                       text=True, env=env, cwd=tmp_path)
    done = run("db", "partitions", "--days", "10")
    assert done.returncode == 0, done.stderr
    assert f"cdrs_{NOW.date() + timedelta(days=10):%Y%m%d}" in done.stdout.splitlines()[0]
    assert "cdr_partitions.cdrs_default" in done.stdout
    assert run("db", "partitions").stdout.startswith("CDR partitions are up to date")
    bad = run("db", "partitions", "--days", "-3")
    assert bad.returncode == 2 and "whole number of days" in bad.stderr
