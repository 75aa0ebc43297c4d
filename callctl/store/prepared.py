"""The call path's statements compiled once for PostgreSQL ($n parameters, with their
columns' conversions), run as server-side prepared statements on either driver.

asyncpg (store/pgcalls.py, the asyncio daemon) prepares a statement by itself, once per
connection. psycopg2 (store/calls.py on PostgreSQL: the FreeSWITCH backend, the CLI) sends
a statement's text each time, and PostgreSQL parsed and planned the facts statement on
every call: 1.3-1.5 ms of the server's CPU per call, against 0.33-0.40 ms prepared.
`execute` prepares a statement once per database connection (PREPARE), then runs it
(EXECUTE)."""
from __future__ import annotations

import itertools
from collections import namedtuple

from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

_DIALECT = postgresql.psycopg2.dialect(paramstyle="numeric_dollar")
_NAMES = itertools.count(1)
_STALE_PLAN = "0A000"  # "cached plan must not change result type": a migration changed a column


class Compiled:
    """A SQLAlchemy statement as PostgreSQL text with $n parameters, with its columns'
    bind and result conversions, and a name to prepare it under."""

    def __init__(self, statement, column_keys=None):
        # for_executemany: no implicit RETURNING of the new row's id, which nobody reads.
        compiled = statement.compile(dialect=_DIALECT, column_keys=column_keys, for_executemany=bool(column_keys))
        self.sql = str(compiled)
        self.name = f"callctl_{next(_NAMES)}"
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


def execute(conn: Connection, statement: Compiled, args: list, read_only: bool = False) -> list:
    """Run `statement` (its SQL with `args`, as Compiled.args makes them, plus any the SQL
    adds) on a psycopg2 connection, prepared once per database connection; its raw rows.

    A read-only statement whose plan a migration made stale is prepared again and run
    once more (rolling back is harmless there); a write's result never changes type."""
    prepared = conn.connection.info.setdefault("callctl_prepared", set())
    run = f"EXECUTE {statement.name} ({', '.join(['%s'] * len(args))})" if args else f"EXECUTE {statement.name}"
    if statement.name not in prepared:
        conn.exec_driver_sql(f"PREPARE {statement.name} AS {statement.sql}")
        prepared.add(statement.name)
    try:
        return conn.exec_driver_sql(run, tuple(args)).fetchall()
    except DBAPIError as exc:
        if not read_only or getattr(exc.orig, "pgcode", None) != _STALE_PLAN:
            raise
    conn.rollback()
    conn.exec_driver_sql(f"DEALLOCATE {statement.name}")
    conn.exec_driver_sql(f"PREPARE {statement.name} AS {statement.sql}")
    return conn.exec_driver_sql(run, tuple(args)).fetchall()
