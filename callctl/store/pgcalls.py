"""The call path's two statements on PostgreSQL, run on the daemon's event loop (asyncpg).

Handing each statement to a thread and back (GIL hand-offs, wake-ups) and SQLAlchemy's
execution machinery around a one-row query were most of the daemon's CPU per call
(`make bench`). Here the very statements of callctl.store.calls, built from the models,
are compiled once for PostgreSQL and run with asyncpg, which prepares each statement
once per connection. Values pass through the models' own column types (encrypted
numbers, UTC times), so the facts come out exactly as from call_facts(). SQLite and the
rest of callctl keep SQLAlchemy and psycopg2.
"""
from __future__ import annotations

import asyncio
from collections import namedtuple
from datetime import datetime

import asyncpg
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import make_url

from callctl.core.decision import NumberFacts
from callctl.store.calls import _CDR_INSERT, _FACTS, _FACTS_BY_EXTENSION, facts_from_rows, facts_params

_DIALECT = postgresql.psycopg2.dialect(paramstyle="numeric_dollar")
# A pooled connection the server closed (restart, failover, pg_terminate_backend): the
# others went with it, so the pool makes new ones and the statement runs once more.
_LOST = (asyncpg.PostgresConnectionError, asyncpg.exceptions.AdminShutdownError,
         asyncpg.exceptions.CrashShutdownError, ConnectionError)
_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class PgUnavailable(Exception):
    """The database did not answer (down, unreachable, too slow) or refused the
    statement. The message is the error's class name: never a value."""


class _Statement:
    """A SQLAlchemy statement as PostgreSQL text with $n parameters, with its columns'
    bind and result conversions."""

    def __init__(self, statement, column_keys=None):
        # for_executemany: no implicit RETURNING of the new row's id, which nobody reads.
        compiled = statement.compile(dialect=_DIALECT, column_keys=column_keys, for_executemany=bool(column_keys))
        self.sql = str(compiled)
        self.keys = compiled.positiontup
        # Literals of the statement itself ('active', 'bound', ...) are parameters too.
        self.constants = {key: value for key, value in compiled.params.items() if value is not None}
        self.binders = [compiled.binds[key].type.bind_processor(_DIALECT) for key in self.keys]
        columns = getattr(statement, "selected_columns", ())
        self.row = namedtuple("Row", [c.name for c in columns]) if columns else None
        self.readers = [c.type.result_processor(_DIALECT, None) for c in columns]

    def args(self, params: dict) -> list:
        values = {**self.constants, **params}
        return [bind(values[key]) if bind else values[key] for key, bind in zip(self.keys, self.binders)]

    def rows(self, records) -> list:
        readers = self.readers
        return [self.row(*(read(v) if read else v for read, v in zip(readers, record))) for record in records]


_FACTS_SQL = _Statement(_FACTS)
_FACTS_BY_EXTENSION_SQL = _Statement(_FACTS_BY_EXTENSION)


class PgCallStore:
    """Two asyncpg pools: routing reads never wait for a connection behind CDR inserts
    (slow, or hanging while the database is in trouble)."""

    def __init__(self, reads: asyncpg.Pool, inserts: asyncpg.Pool):
        self.reads = reads
        self.inserts = inserts
        self._inserts_by_keys: dict[tuple, _Statement] = {}

    @classmethod
    async def open(cls, url: str, size: int, timeout: float) -> "PgCallStore":
        """Pools of up to `size` connections each, made when first needed: the daemon
        starts (and spools CDRs) while the database is down. No call waits on the
        database longer than `timeout` seconds: connect, statement or lock."""
        ms = str(int(timeout * 1000))
        dsn, settings = _asyncpg_dsn(url)
        pools = [asyncpg.create_pool(dsn, min_size=0, max_size=size, timeout=timeout, command_timeout=timeout,
                                     server_settings={**settings, "statement_timeout": ms, "lock_timeout": ms},
                                     reset=_session_unchanged,
                                     # Kept while idle, as SQLAlchemy's pools do: on a quiet
                                     # system the next call must not pay for a new connection.
                                     max_inactive_connection_lifetime=0)
                 for _ in range(2)]
        return cls(*[await pool for pool in pools])

    async def close(self, timeout: float = 5.0) -> None:
        for pool in (self.reads, self.inserts):
            try:
                await asyncio.wait_for(pool.close(), timeout)
            except TimeoutError:
                pool.terminate()

    async def facts(self, x: str, caller: str | None, now: datetime,
                    extension: str | None = None) -> NumberFacts | None:
        """call_facts(), on the event loop."""
        statement = _FACTS_SQL if extension is None else _FACTS_BY_EXTENSION_SQL
        args = statement.args(facts_params(x, caller, now, extension))
        records = await _run(self.reads, "fetch", statement.sql, args)
        return facts_from_rows(x, statement.rows(records))

    async def write_cdr(self, row: dict) -> bool:
        """write_cdr(), on the event loop: True if new, False if the call was written before."""
        keys = tuple(row)
        statement = self._inserts_by_keys.get(keys)
        if statement is None:
            statement = self._inserts_by_keys[keys] = _Statement(_CDR_INSERT["postgresql"], column_keys=list(keys))
        status = await _run(self.inserts, "execute", statement.sql, statement.args(row))
        return status == "INSERT 0 1"


# libpq's client-side options that asyncpg would send the server as settings (and the
# server refuse): here db_timeout bounds connecting and waiting instead.
_LIBPQ_ONLY = {"connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
               "tcp_user_timeout", "options"}


def _asyncpg_dsn(url: str) -> tuple[str, dict[str, str]]:
    """The SQLAlchemy URL as an asyncpg DSN, and the server settings its libpq
    `options` ("-c name=value ...") asked for."""
    parsed = make_url(url)
    settings = {}
    tokens = str(parsed.query.get("options", "")).replace("-c ", "-c").split()
    for token in tokens:
        name, sep, value = token.removeprefix("-c").partition("=")
        if token.startswith("-c") and sep:
            settings[name] = value
    parsed = parsed.set(drivername="postgresql").difference_update_query(_LIBPQ_ONLY)
    return parsed.render_as_string(hide_password=False), settings


async def _session_unchanged(connection: asyncpg.Connection) -> None:
    """Handed back to its pool as it is: these connections only ever run the two
    statements, outside transactions, so asyncpg's default reset (advisory locks,
    cursors, LISTEN, settings) would be one more round trip per call for nothing."""


async def _run(pool: asyncpg.Pool, method: str, sql: str, args: list):
    try:
        try:
            return await getattr(pool, method)(sql, *args)
        except _LOST:
            await pool.expire_connections()
            return await getattr(pool, method)(sql, *args)
    except _ERRORS as exc:
        raise PgUnavailable(type(exc).__name__) from exc
