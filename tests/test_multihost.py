"""Multi-host database URLs (libpq's host list with target_session_attrs) on both of
the daemon's paths: SQLAlchemy + psycopg2 and the call path's asyncpg. A host that
refuses is skipped; a server that is not what target_session_attrs asks for is never
used. (The failover itself, a promoted replica found without a restart, is
tests/test_cluster_failover.py.)"""
import asyncio
from datetime import datetime, timezone

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from callctl.store.db import make_engine, upgrade
from callctl.store.pgcalls import PgCallStore, PgUnavailable, _asyncpg_dsn
from tests.pg import _free_port


def multi_host(pg_url: str, attrs: str, form: str = "repeated") -> str:
    """The test database's URL with a dead host listed before the real one."""
    url = make_url(pg_url)
    dead = _free_port()  # nothing listens there: connection refused
    if form == "repeated":
        query = f"host=127.0.0.1:{dead}&host={url.host}:{url.port}"
    else:
        query = f"host=127.0.0.1,{url.host}&port={dead},{url.port}"
    return f"postgresql://{url.username}@/{url.database}?{query}&target_session_attrs={attrs}"


async def _facts(url: str):
    store = await PgCallStore.open(url, size=1, timeout=2.0)
    try:
        return await store.facts("+8617100000009", None, datetime.now(timezone.utc))
    finally:
        await store.close()


@pytest.fixture
def migrated(pg_url):
    engine = make_engine(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    upgrade(engine)
    engine.dispose()
    return pg_url


@pytest.mark.parametrize("form", ["repeated", "comma"])
def test_a_dead_first_host_is_skipped_on_both_paths(migrated, form):
    pg_url = migrated
    url = multi_host(pg_url, "read-write", form)
    engine = make_engine(url, timeout=2.0)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT NOT pg_is_in_recovery()")).scalar()
    engine.dispose()
    assert asyncio.run(_facts(url)) is None  # the call path read the (empty) primary: unknown X


def test_a_server_that_is_not_what_the_url_asks_for_is_not_used(pg_url):
    """The only live server is a primary; a URL asking for a standby gets neither path
    connected: the daemon would fail closed, not read from the wrong server."""
    url = multi_host(pg_url, "standby")
    engine = make_engine(url, timeout=2.0)
    with pytest.raises(OperationalError):
        with engine.connect():
            pass
    engine.dispose()
    with pytest.raises(PgUnavailable):
        asyncio.run(_facts(url))


def test_asyncpg_dsn_lists_the_hosts_and_keeps_settings():
    dsn, settings = _asyncpg_dsn("postgresql+psycopg2://u:p%40w@/db?host=10.0.0.1:5432&host=10.0.0.2:5433"
                                 "&target_session_attrs=read-write&connect_timeout=3&options=-c%20work_mem%3D1MB")
    assert dsn == "postgresql://u:p%40w@10.0.0.1:5432,10.0.0.2:5433/db?target_session_attrs=read-write"
    assert settings == {"work_mem": "1MB"}
    dsn, _ = _asyncpg_dsn("postgresql://u@/db?host=a,b&port=5432,5433")
    assert dsn == "postgresql://u@a:5432,b:5433/db"
    dsn, _ = _asyncpg_dsn("postgresql://u@/db?host=/var/run/postgresql")  # one socket directory: as given
    assert make_url(dsn).query["host"] == "/var/run/postgresql"
