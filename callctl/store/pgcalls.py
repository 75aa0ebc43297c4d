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
import contextlib
from collections import deque
from datetime import datetime, timezone
from typing import Awaitable, Callable

import asyncpg
from sqlalchemy.engine import make_url

from callctl.core.decision import NumberFacts
from callctl.metrics import CDR_BATCH_ROWS, DB_RECONNECTS
from callctl.store.callstore import StoreUnavailable
from callctl.store.calls import (
    FACTS_BY_EXTENSION_COMPILED, FACTS_COMPILED, cdr_with_event, cdr_with_event_args, cdrs_with_events_args,
    facts_from_rows, facts_params,
)

# A pooled connection the server closed (restart, failover, pg_terminate_backend): the
# others went with it, so new ones are made and the statement runs once more. An idle
# connection that the server's goodbye reached but that asyncpg has not closed yet
# refuses the next statement with InternalClientError ("another operation is in progress").
_LOST = (asyncpg.PostgresConnectionError, asyncpg.exceptions.AdminShutdownError,
         asyncpg.exceptions.CrashShutdownError, asyncpg.InternalClientError, ConnectionError)
_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, TimeoutError)


class PgUnavailable(StoreUnavailable):
    """StoreUnavailable, from asyncpg."""




class _Connections:
    """Up to `size` connections, each lent to one statement at a time, made when first
    needed and kept while idle (the next call must not pay for a new connection).

    In place of asyncpg's Pool: lending a connection out and taking it back there (a
    queue, a shielded release task, timeouts, reset hooks) cost more CPU than running
    the statement itself. These connections only ever run one statement outside a
    transaction, so a connection comes back as it went: nothing to reset."""

    def __init__(self, connect: Callable[[], Awaitable[asyncpg.Connection]], size: int):
        self._connect = connect
        self._size = size
        self._idle: list[asyncpg.Connection] = []
        self._opened = 0  # open or being opened
        self._waiters: deque[asyncio.Future] = deque()

    @contextlib.asynccontextmanager
    async def acquire(self):
        conn = await self._take()
        try:
            yield conn
        except BaseException:
            # Whatever went wrong (the server gone or shutting down, a timeout, a
            # cancel half-way through a statement), the connection may be mid-protocol:
            # the next statement gets a new one. Errors are rare; reconnecting is cheap.
            self._drop(conn)
            raise
        self._give(conn)

    async def _take(self) -> asyncpg.Connection:
        while True:
            if self._idle:
                conn = self._idle.pop()
                if not conn.is_closed():
                    return conn
                self._drop(conn)  # closed while idle (the server ended it): make a new one
                continue
            if self._opened < self._size:
                self._opened += 1
                try:
                    return await self._connect()
                except BaseException:
                    self._free_slot()
                    raise
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                conn = await waiter  # a connection, or None: a slot is free, open one
            except BaseException:  # cancelled: pass on what was handed over meanwhile
                if waiter.done() and not waiter.cancelled():
                    if waiter.result() is None:
                        self._offer_slot()
                    else:
                        self._give(waiter.result())
                raise
            if conn is not None:
                return conn

    def _give(self, conn: asyncpg.Connection) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)

    def _drop(self, conn: asyncpg.Connection) -> None:
        conn.terminate()
        self._free_slot()

    def _free_slot(self) -> None:
        self._opened -= 1
        self._offer_slot()

    def _offer_slot(self) -> None:
        """The first waiter opens a connection in the free slot."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def warm(self, count: int) -> None:
        """Open up to `count` connections now, not on the first calls: each new one
        costs its call a connection set-up (a backend start, authentication)."""
        taken = await asyncio.gather(*(self._take() for _ in range(min(count, self._size))),
                                     return_exceptions=True)
        errors = [conn for conn in taken if isinstance(conn, BaseException)]
        for conn in taken:
            if not isinstance(conn, BaseException):
                self._give(conn)
        if errors:
            raise errors[0]

    def expire(self) -> None:
        """Close the idle connections: the server dropped one, the others went with it."""
        idle, self._idle = self._idle, []
        for conn in idle:
            self._drop(conn)

    async def close(self, timeout: float) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            try:
                await conn.close(timeout=timeout)
            except _ERRORS:
                conn.terminate()
        self._opened -= len(idle)


class _GroupCommit:
    """CDRs written together: the first waits up to `linger` seconds for others, then
    all go in one statement and one commit (one WAL flush); each writer is answered only
    once that commit is done, as when it wrote alone. A batch the database refuses for
    one row's sake is written again row by row, so that row fails alone; a lost database
    fails the whole batch, each writer then spools its own row."""

    def __init__(self, write_many: Callable, write_one: Callable, linger: float, max_rows: int = 100):
        self._write_many, self._write_one = write_many, write_one
        self.linger, self.max_rows = linger, max_rows
        self._pending: list[tuple[dict, asyncio.Future]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._writing: set[asyncio.Task] = set()

    def write(self, row: dict) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._pending.append((row, done))
        if len(self._pending) >= self.max_rows:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.linger, self._flush)
        return done

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, later, calls = [], [], set()
        for item in self._pending:
            call = (item[0].get("call_id"), item[0].get("node"))
            # A second report of one call waits for the next batch, which then sees the
            # first one written (one statement cannot see its own rows).
            if call in calls or len(batch) >= self.max_rows:
                later.append(item)
            else:
                calls.add(call)
                batch.append(item)
        self._pending = later
        task = asyncio.get_running_loop().create_task(self._write(batch))
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)
        if later:
            self._timer = asyncio.get_running_loop().call_later(self.linger, self._flush)

    async def _write(self, batch: list[tuple[dict, asyncio.Future]]) -> None:
        CDR_BATCH_ROWS.observe(len(batch))
        try:
            await self._write_batch(batch)
        except BaseException as exc:  # never leave a writer waiting for nobody: it spools its row
            unavailable = PgUnavailable(type(exc).__name__)
            unavailable.__cause__ = exc
            for _, done in batch:
                _answer(done, exc=unavailable)
            if not isinstance(exc, Exception):
                raise

    async def _write_batch(self, batch: list[tuple[dict, asyncio.Future]]) -> None:
        try:
            written = await self._write_many([row for row, _ in batch]) if len(batch) > 1 else None
        except PgUnavailable as exc:
            if not _refused_rows(exc):
                for _, done in batch:
                    _answer(done, exc=exc)
                return
            written = None
        if written is not None:
            for row, done in batch:
                _answer(done, (row.get("call_id"), row.get("node")) in written)
            return
        for row, done in batch:  # alone, or again one by one: a refused row fails on its own
            try:
                _answer(done, await self._write_one(row))
            except PgUnavailable as exc:
                _answer(done, exc=exc)

    async def drain(self) -> None:
        """Write what waits now (the daemon stopping)."""
        if self._pending:
            self._flush()
        if self._writing:
            await asyncio.gather(*self._writing, return_exceptions=True)


def _answer(done: asyncio.Future, result=None, exc: BaseException | None = None) -> None:
    if done.done():  # the writer stopped waiting (its time ran out: it spooled the row)
        return
    if exc is not None:
        done.set_exception(exc)
    else:
        done.set_result(result)


def _refused_rows(exc: PgUnavailable) -> bool:
    """The statement was refused for its values (out of range, too long, a constraint),
    as opposed to the database not answering in time or at all: worth writing the rows
    again one by one."""
    return isinstance(exc.__cause__, (asyncpg.exceptions.DataError, asyncpg.exceptions.IntegrityConstraintViolationError))


class PgCallStore:
    """The CallStore of PostgreSQL (callctl.store.callstore). Two sets of connections: routing reads never wait for a connection behind CDR
    inserts (slow, or hanging while the database is in trouble). CDRs are written by
    group commit (_GroupCommit) unless `cdr_linger` is None."""

    def __init__(self, reads: _Connections, inserts: _Connections, cdr_linger: float | None = None):
        self.reads = reads
        self.inserts = inserts
        self._group = None if cdr_linger is None else _GroupCommit(self._write_many, self._write_one, cdr_linger)

    @classmethod
    async def open(cls, url: str, size: int, timeout: float, cdr_linger: float | None = None) -> "PgCallStore":
        """Up to `size` connections each, made when first needed: the daemon starts
        (and spools CDRs) while the database is down. No call waits on the database
        longer than `timeout` seconds: connect, statement or lock. `cdr_linger`: seconds
        a CDR waits for others to be written with (None: each alone)."""
        ms = str(int(timeout * 1000))
        dsn, settings = _asyncpg_dsn(url)
        settings = {**settings, "statement_timeout": ms, "lock_timeout": ms}

        def connect(**more):
            return lambda: asyncpg.connect(dsn, timeout=timeout, command_timeout=timeout,
                                           server_settings={**settings, **more})

        # The CDR statements' plans are made once: PostgreSQL would otherwise plan the
        # group commit's statement (its rows in arrays) for every batch, which cost more
        # than the batch saved.
        return cls(_Connections(connect(), size), _Connections(connect(plan_cache_mode="force_generic_plan"), size),
                   cdr_linger)

    async def warm(self, count: int) -> None:
        """Open `count` connections of each kind before the first calls need them
        (PgUnavailable if the database does not answer: they are made later then)."""
        try:
            for connections in (self.reads, self.inserts):
                await connections.warm(count)
        except _ERRORS as exc:
            raise PgUnavailable(type(exc).__name__) from exc

    async def ping(self) -> None:
        """One round trip on a routing connection (the health check); PgUnavailable if none."""
        await _run(self.reads, "fetchval", "SELECT 1", [])

    async def close(self, timeout: float = 5.0) -> None:
        if self._group is not None:
            await self._group.drain()
        for connections in (self.reads, self.inserts):
            await connections.close(timeout)

    async def facts(self, x: str, caller: str | None, now: datetime,
                    extension: str | None = None) -> NumberFacts | None:
        """call_facts(), on the event loop."""
        statement = FACTS_COMPILED if extension is None else FACTS_BY_EXTENSION_COMPILED
        args = statement.args(facts_params(x, caller, now, extension))
        records = await _run(self.reads, "fetch", statement.sql, args)
        return facts_from_rows(x, statement.rows(records))

    async def write_cdr(self, row: dict) -> bool:
        """write_cdr(), on the event loop: True if new, False if the call was written before.
        A new CDR's event for the tenant's webhooks goes in the same statement."""
        if self._group is None:
            return await self._write_one(row)
        return await self._group.write(row)

    async def _write_one(self, row: dict) -> bool:
        statement = cdr_with_event(tuple(row))
        args = cdr_with_event_args(statement, row, datetime.now(timezone.utc))
        return await _run(self.inserts, "fetchval", statement.sql, args) == 1

    async def _write_many(self, rows: list[dict]) -> set[tuple] | None:
        """Many CDRs in one statement: the (call_id, node) of those that were new. None
        when the rows do not share one set of columns (then each is written alone)."""
        keys = tuple(rows[0])
        if any(tuple(row) != keys for row in rows):
            return None
        statement = cdr_with_event(keys, many=True)
        args = cdrs_with_events_args(statement, rows, datetime.now(timezone.utc))
        records = await _run(self.inserts, "fetch", statement.sql, args)
        return {(record[0], record[1]) for record in records}


# libpq's client-side options that asyncpg would send the server as settings (and the
# server refuse): here db_timeout bounds connecting and waiting instead.
_LIBPQ_ONLY = {"connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
               "tcp_user_timeout", "options"}


def _asyncpg_dsn(url: str) -> tuple[str, dict[str, str]]:
    """The SQLAlchemy URL as an asyncpg DSN, and the server settings its libpq
    `options` ("-c name=value ...") asked for.

    Several hosts, as libpq takes them (`?host=a:5432&host=b:5432`, or `?host=a,b&port=p,q`)
    become asyncpg's `a:5432,b:5432` list; `target_session_attrs=read-write` then
    makes asyncpg, like libpq, try them in turn and keep only a writable primary."""
    parsed = make_url(url)
    settings = {}
    tokens = str(parsed.query.get("options", "")).replace("-c ", "-c").split()
    for token in tokens:
        name, sep, value = token.removeprefix("-c").partition("=")
        if token.startswith("-c") and sep:
            settings[name] = value
    hosts = _hosts(parsed)
    parsed = parsed.set(drivername="postgresql").difference_update_query(_LIBPQ_ONLY)
    if len(hosts) > 1:
        parsed = parsed.set(host=None, port=None).difference_update_query({"host", "port"})
        dsn = parsed.render_as_string(hide_password=False)
        scheme, rest = dsn.split("://", 1)
        userinfo, at, tail = rest.rpartition("@") if "@" in rest.split("/", 1)[0] else ("", "", rest)
        netloc = ",".join(f"{host}:{port}" if port else host for host, port in hosts)
        return f"{scheme}://{userinfo}{at}{netloc}{tail}", settings
    return parsed.render_as_string(hide_password=False), settings


def _hosts(parsed) -> list[tuple[str, str]]:
    """(host, port) pairs of a URL: its netloc's, else libpq's host= and port= lists."""
    if parsed.host:
        return [(parsed.host, str(parsed.port or ""))]
    given = parsed.query.get("host", ())
    names = [part for item in ((given,) if isinstance(given, str) else given) for part in item.split(",")]
    ports = str(parsed.query.get("port", "")).split(",")
    pairs = []
    for index, name in enumerate(names):
        host, sep, port = name.rpartition(":") if ":" in name and not name.startswith("/") else (name, "", "")
        if not sep:
            port = ports[index] if index < len(ports) else ports[-1]
        pairs.append((host, port))
    return pairs


async def _run(connections: _Connections, method: str, sql: str, args: list):
    try:
        try:
            async with connections.acquire() as conn:
                return await getattr(conn, method)(sql, *args)
        except _LOST:
            DB_RECONNECTS.inc()
            connections.expire()
            async with connections.acquire() as conn:
                return await getattr(conn, method)(sql, *args)
    except _ERRORS as exc:
        raise PgUnavailable(type(exc).__name__) from exc
