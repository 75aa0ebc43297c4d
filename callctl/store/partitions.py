"""Day partitions of the CDR table on PostgreSQL (sql/postgresql/0060_*).

`ensure_cdr_partitions` creates the partitions of today and the coming days, and of any
day whose rows sit in the default partition (it moves them in). The daemon runs it at
start and every hour; `callctl db partitions` runs it by hand. Idempotent, safe with
several daemons on one database, and a no-op on SQLite (not partitioned).
"""
from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone

import structlog
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

log = structlog.get_logger("callctl.partitions")

SCHEMA = "cdr_partitions"
DEFAULT = f"{SCHEMA}.cdrs_default"

_PARTITIONS = text(
    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
    " WHERE i.inhparent = 'cdrs'::regclass"
)
_STRAY_DAYS = text(f"SELECT DISTINCT (started_at AT TIME ZONE 'UTC')::date FROM {DEFAULT}")


def partition_name(day: date) -> str:
    return f"cdrs_{day:%Y%m%d}"


def ensure_cdr_partitions(engine: Engine, days_ahead: int = 7, today: date | None = None) -> list[str]:
    """Create the missing day partitions; returns the names created."""
    if engine.dialect.name != "postgresql":
        return []
    today = today or datetime.now(timezone.utc).date()
    with engine.connect() as conn:
        existing = set(conn.execute(_PARTITIONS).scalars())
        stray = set(conn.execute(_STRAY_DAYS).scalars())
    wanted = {today + timedelta(days=n) for n in range(days_ahead + 1)} | stray
    created = []
    for day in sorted(wanted):
        if partition_name(day) in existing:
            continue
        try:
            moved = _create(engine, day)
        except DBAPIError as exc:
            # Another daemon made it first, or a lock was not free in time: next round.
            log.warning("CDR partition not created", day=day.isoformat(), error=type(exc.orig).__name__)
            continue
        created.append(partition_name(day))
        # (by day, not name: the log's phone-number guard would mask cdrs_20261202's digits)
        log.info("CDR partition created", day=day.isoformat(), rows_moved=moved)
    return created


def _create(engine: Engine, day: date) -> int:
    """Build the day's table beside the partitioned one, move the day's rows out of the
    default partition into it, then attach it: attaching (unlike CREATE TABLE ...
    PARTITION OF) does not lock out the CDR inserts of other days."""
    name = f"{SCHEMA}.{partition_name(day)}"
    low = datetime.combine(day, time(), timezone.utc)
    high = low + timedelta(days=1)
    with engine.begin() as conn:
        conn.exec_driver_sql("SET LOCAL lock_timeout = '5s'; SET LOCAL statement_timeout = 0")
        conn.exec_driver_sql(f"CREATE TABLE {name} (LIKE cdrs INCLUDING DEFAULTS)")
        moved = conn.execute(
            text(f"WITH moved AS (DELETE FROM {DEFAULT} WHERE started_at >= :low AND started_at < :high"
                 f" RETURNING *) INSERT INTO {name} SELECT * FROM moved"),
            {"low": low, "high": high},
        ).rowcount
        conn.execute(text(f"ALTER TABLE cdrs ATTACH PARTITION {name} FOR VALUES FROM (:low) TO (:high)"),
                     {"low": low, "high": high})
    return moved


def cdr_partitions(engine: Engine) -> list[dict]:
    """Every partition with its range and row count (estimate from the statistics)."""
    if engine.dialect.name != "postgresql":
        return []
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid), c.reltuples::bigint"
            " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'cdrs'::regclass ORDER BY c.relname"
        )).all()
    return [{"partition": f"{SCHEMA}.{name}", "range": bound, "rows_estimate": max(rows_, 0)}
            for name, bound, rows_ in rows]
