"""The anomaly job's rate on PostgreSQL: CDRs processed per second over 10,000,000 CDRs.

    .venv/bin/python -m bench.bench --only anomaly

Database `callctl_bench_anomaly` (created here, kept between runs: generating the CDRs
takes minutes) holds 20 tenants and N synthetic CDRs over 30 days (a partition per day), made set-based with
INSERT ... SELECT FROM generate_series in chunks of 1,000,000: 2,000 agents calling
1,000,000 bindings, a fifth of the calls from customers, 70% answered, 10% busy, talk
times 0-300 s, uniform over the day (so off-hours calls exist). Each run clears the job's
findings, blocks and watermark, lets the server settle (CHECKPOINT, autovacuum workers
done), then times:

1. the first pass of `callctl anomaly run` over all N CDRs (conf/anomaly.yaml rules);
2. an incremental pass after 10,000 new CDRs (deleted again afterwards).

Caller hashes are md5 of synthetic labels; no number here is anybody's.
"""
from __future__ import annotations

import shutil
import time
from datetime import datetime, timedelta, timezone

import psycopg2
from sqlalchemy import text

from callctl.anomaly.config import load as load_rules
from callctl.anomaly.job import run_pass
from callctl.store.db import make_engine, upgrade
from callctl.store.partitions import ensure_cdr_partitions

DB_NAME = "callctl_bench_anomaly"
TENANTS = 20
DAYS = 30
CHUNK = 1_000_000
START = datetime(2026, 10, 1, tzinfo=timezone.utc)

# i is the CDR's sequence number; every column is a cheap deterministic function of it.
_GENERATE = """
INSERT INTO cdrs (call_id, tenant_id, binding_id, virtual_number, direction, caller_masked,
                  callee_masked, decision, started_at, answered_at, ended_at, ring_seconds,
                  talk_seconds, dial_status, hangup_cause, node, caller_hash)
SELECT 'bench-' || i, tenant, binding, '+86171' || lpad(binding::text, 8, '0'),
       CASE WHEN inbound THEN 'from_customer' ELSE 'to_customer' END,
       '+86139****' || lpad((i %% 10000)::text, 4, '0'), '+86138****' || lpad((binding %% 10000)::text, 4, '0'),
       'bridged', started,
       CASE WHEN outcome < 70 THEN started + interval '5 seconds' END,
       started + interval '5 seconds' + CASE WHEN outcome < 70 THEN talk * interval '1 second' ELSE interval '0' END,
       5.0, CASE WHEN outcome < 70 THEN talk ELSE 0 END,
       CASE WHEN outcome < 70 THEN 'ANSWER' WHEN outcome < 80 THEN 'NOANSWER' WHEN outcome < 90 THEN 'BUSY'
            ELSE 'CANCEL' END,
       CASE WHEN outcome < 80 THEN 16 WHEN outcome < 90 THEN 17 ELSE 0 END,
       'bench',
       CASE WHEN inbound THEN md5('customer' || binding) ELSE md5('agent' || agent) END
FROM (
    SELECT i, 1 + (i / 3) %% %(tenants)s AS tenant, 1 + (i * 2654435761) %% 1000000 AS binding,
           (i * 40503) %% 2000 AS agent, i %% 5 = 0 AS inbound, (i * 37 + i / 7) %% 100 AS outcome,
           round(((i * 7919) %% 300000) / 1000.0, 3) AS talk,
           %(start)s::timestamptz + i * %(step_ms)s * interval '1 millisecond' AS started
    FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS i
) g
"""


def say(*args) -> None:
    print(*args, flush=True)


def prepare(admin_dsn: str, url: str, n: int) -> dict:
    """The bench database with n CDRs; reused when it already holds them."""
    admin = psycopg2.connect(admin_dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,))
        exists = cur.fetchone() is not None
    engine = make_engine(url, pool_size=4)
    have = 0
    if exists:
        upgrade(engine)
        with engine.connect() as conn:
            have = conn.scalar(text("SELECT count(*) FROM cdrs WHERE call_id LIKE 'bench-%'"))
    if have == n:
        admin.close()
        return {"engine": engine, "generated": False, "load_s": 0.0}
    engine.dispose()
    free_gb = shutil.disk_usage("/").free / 1e9
    need_gb = n * 450 / 1e9  # rows + indexes, measured about 400 bytes per CDR
    if free_gb < need_gb * 1.5:
        raise RuntimeError(f"only {free_gb:.0f} GB free on /, the bench database needs about {need_gb:.0f} GB")
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{DB_NAME}"')
    admin.close()
    engine = make_engine(url, pool_size=4)
    upgrade(engine)
    ensure_cdr_partitions(engine, days_ahead=DAYS + 1, today=START.date())  # a partition per day, as in production
    started = time.monotonic()
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        cur.execute("INSERT INTO tenants (name, hotline) SELECT 'bench' || t, '+8610580000' || lpad(t::text, 2, '0') "
                    "FROM generate_series(1, %s) AS t", (TENANTS,))
        raw.commit()
        step_ms = DAYS * 86_400_000 / n
        for first in range(1, n + 1, CHUNK):
            last = min(first + CHUNK - 1, n)
            cur.execute(_GENERATE, {"tenants": TENANTS, "start": START, "step_ms": step_ms,
                                    "first": first, "last": last})
            raw.commit()
            say(f"  generated {last:,} of {n:,} CDRs ({time.monotonic() - started:.0f} s)")
        raw.driver_connection.autocommit = True
        cur.execute("VACUUM ANALYZE cdrs")
    finally:
        raw.close()
    return {"engine": engine, "generated": True, "load_s": round(time.monotonic() - started, 1)}


def _reset(engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM blocks WHERE finding_id IS NOT NULL"))
        conn.execute(text("DELETE FROM anomaly_findings"))
        conn.execute(text("DELETE FROM anomaly_state"))


def _settle(engine, limit: float = 300.0) -> float:
    """Let the server finish what earlier parts of `make bench` left behind (dirty buffers,
    autovacuum after the bulk loads), so the pass is timed as a nightly job would run,
    not against the server's own maintenance on the same two cores."""
    started = time.monotonic()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("CHECKPOINT")
        while time.monotonic() - started < limit and conn.scalar(text(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'")):
            time.sleep(2)
    return time.monotonic() - started


def run(admin_dsn: str, n: int = 10_000_000, rules_path: str = "conf/anomaly.yaml", new: int = 10_000) -> dict:
    base = admin_dsn.split("://", 1)[1].rsplit("/", 1)[0]
    url = f"postgresql+psycopg2://{base}/{DB_NAME}"
    say(f"Anomaly: database {DB_NAME} with {n:,} CDRs ...")
    prepared = prepare(admin_dsn, url, n)
    engine = prepared["engine"]
    say("Anomaly: " + (f"generated in {prepared['load_s']:.0f} s" if prepared["generated"] else "CDRs already there, reused"))
    config = load_rules(rules_path)
    end = START + timedelta(days=DAYS)
    try:
        _reset(engine)
        waited = _settle(engine)
        say(f"Anomaly: database settled in {waited:.0f} s (checkpoint, autovacuum left by earlier parts done)")
        first = run_pass(engine, config, now=end)
        say(f"Anomaly: first pass, {first.cdrs:,} CDRs in {first.seconds:.1f} s = "
            f"{first.cdrs / first.seconds:,.0f} CDRs/s; {first.new_findings:,} findings "
            f"({', '.join(f'{k} {v}' for k, v in first.findings.items() if v)})")
        with engine.begin() as conn:  # new calls after the history, then an incremental pass
            conn.execute(text(
                "INSERT INTO cdrs (call_id, tenant_id, binding_id, direction, decision, started_at, caller_hash) "
                "SELECT 'bench-new-' || i, 1 + i % 20, 1 + (i * 7) % 1000000, 'to_customer', 'bridged', "
                ":end + i * interval '10 milliseconds', md5('agent' || (i % 2000)) "
                "FROM generate_series(1, :new) AS i"), {"end": end, "new": new})
        later = end + timedelta(seconds=config.overlap_seconds + 1)
        second = run_pass(engine, config, now=later)
        say(f"Anomaly: incremental pass, {second.cdrs:,} new CDRs in {second.seconds:.2f} s = "
            f"{second.cdrs / second.seconds:,.0f} CDRs/s")
        repeat = run_pass(engine, config, now=later + timedelta(seconds=1))
        say(f"Anomaly: re-run over the same CDRs: {repeat.new_findings} new findings (idempotent)")
    finally:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM cdrs WHERE call_id LIKE 'bench-new-%'"))
        engine.dispose()
    return {
        "database": DB_NAME, "cdrs": n, "generated": prepared["generated"], "load_s": prepared["load_s"],
        "first_pass": {"cdrs": first.cdrs, "seconds": round(first.seconds, 2),
                       "cdrs_per_s": round(first.cdrs / first.seconds), "findings": first.findings},
        "incremental_pass": {"cdrs": second.cdrs, "seconds": round(second.seconds, 3),
                             "cdrs_per_s": round(second.cdrs / second.seconds), "findings": second.findings},
        "rerun_new_findings": repeat.new_findings,
    }
