"""Engines and schema migrations from sql/<dialect>/NNNN_name.sql."""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url

# sql/ in a source checkout; installed as package data callctl.sql (pyproject.toml).
SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
if not SQL_DIR.is_dir():
    SQL_DIR = Path(__file__).resolve().parents[1] / "sql"


def make_engine(url: str, pool_size: int = 8, pre_ping: bool = True, timeout: float | None = None) -> Engine:
    """pre_ping=False saves a round trip per checkout; the caller must then retry once
    on a dead connection (as callctl.service does on the call path). With `timeout`
    (seconds; the daemon's db_timeout) no database call waits longer than that for a
    connection, a reply or a lock, so a dead or hung database turns into an error the
    caller can fail closed on, not a hung call."""
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; callctl ships psycopg2.
        parsed = parsed.set(drivername="postgresql+psycopg2")
        url = parsed
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            pool_size=pool_size,
            pool_timeout=timeout or 30,
            connect_args={"timeout": timeout or 10, "check_same_thread": False},
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        # Writers take the lock at BEGIN, so read-then-write cannot race; call-time
        # reads (READ_ONLY) must not queue behind CDR writes for it.
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    connect_args: dict = {"connect_timeout": 3}
    if timeout:
        ms = int(timeout * 1000)
        connect_args = {
            "connect_timeout": max(2, math.ceil(timeout)),  # libpq: whole seconds, 2 at least
            # the server gives up on a statement or a lock wait after `timeout`...
            "options": f"-c statement_timeout={ms} -c lock_timeout={ms}",
            # ...and the client on a server that stopped acknowledging (network gone)
            "tcp_user_timeout": ms,
            "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 2,
        }
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=timeout or 30,
        pool_pre_ping=pre_ping,  # a restarted database costs one failed ping, not a failed request
        connect_args=connect_args,
    )


READ_ONLY = {"callctl_read_only": True}  # execution option for connections that only read


@contextmanager
def single_statement(engine: Engine):
    """PostgreSQL: a connection whose statement is a transaction of its own, committed by
    the server as it ends: one round trip, where a transaction is three (BEGIN, the
    statement, COMMIT). The driver's autocommit flag is set and put back around it, as
    SQLAlchemy's own ping does; its isolation_level="AUTOCOMMIT" would cost a SET on the
    way in and another on the way out."""
    with engine.connect() as conn:
        dbapi = conn.connection.dbapi_connection
        dbapi.autocommit = True
        try:
            yield conn
        finally:
            if not dbapi.closed:
                dbapi.autocommit = False


def _sqlite_begin(conn) -> None:
    conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("callctl_read_only") else "BEGIN IMMEDIATE")


def _sqlite_pragmas(dbapi_conn, _record):
    # pysqlite's own implicit BEGIN would fight the explicit BEGIN IMMEDIATE.
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def migrations(dialect: str) -> list[Path]:
    folder = SQL_DIR / dialect
    if not folder.is_dir():
        raise RuntimeError(f"no migrations for database type '{dialect}' in {SQL_DIR}")
    return sorted(folder.glob("[0-9][0-9][0-9][0-9]_*.sql"))


def upgrade(engine: Engine) -> list[str]:
    """Apply the migrations not yet applied, each in its own transaction. Returns their names."""
    dialect = engine.dialect.name
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version VARCHAR(100) PRIMARY KEY,"
                " applied_at VARCHAR(40) NOT NULL DEFAULT CURRENT_TIMESTAMP)"
            )
        )
        done = {row[0] for row in conn.execute(text("SELECT version FROM schema_migrations"))}
    applied = []
    for path in migrations(dialect):
        if path.stem in done:
            continue
        script = path.read_text()
        with engine.begin() as conn:
            if dialect == "sqlite":
                for statement in _statements(script):
                    conn.exec_driver_sql(statement)
            else:
                conn.exec_driver_sql(script)
            conn.execute(text("INSERT INTO schema_migrations (version) VALUES (:v)"), {"v": path.stem})
        applied.append(path.stem)
    from callctl.store import keycheck, reveal
    from callctl.store.reencrypt import reencrypt

    if keycheck.TABLE_MIGRATION in done or keycheck.TABLE_MIGRATION in applied:
        # The ring must be this database's before anything is written with it (0085);
        # an audit chain from before the audit key is sealed under it.
        keycheck.verify(engine)
        reveal.seal_legacy(engine)
    # Numbers stored before encryption (0010) are sealed now; a no-op once done.
    reencrypt(engine, only_plaintext=True)
    return applied


def _statements(script: str) -> list[str]:
    # sqlite3 runs one statement per execute; our scripts hold no ';' inside literals.
    lines = [line for line in script.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
