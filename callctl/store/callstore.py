"""The call path's store, as the asyncio daemon sees it: read the facts of X, write a CDR.

One interface (CallStore), two implementations:
- PgCallStore (callctl.store.pgcalls): PostgreSQL, the statements run on the event loop
  over asyncpg;
- ThreadedCallStore (here): any database SQLAlchemy speaks (SQLite), the same statements
  of callctl.store.calls in two thread pools, so a call waiting for its decision never
  queues behind CDR writes.

Both raise StoreUnavailable when the database did not answer or refused the statement;
the service turns that into a fail-closed decision or a spooled CDR, once for both
(callctl.service). Synchronous callers (the gevent FreeSWITCH backend, the CLI) use
callctl.store.calls directly.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from datetime import datetime
from typing import Protocol

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from callctl.core.decision import NumberFacts
from callctl.metrics import DB_RECONNECTS
from callctl.store.calls import call_facts, write_cdr


class StoreUnavailable(Exception):
    """The database did not answer (down, unreachable, too slow) or refused the
    statement. The message is the error's class name: never a value."""


class CallStore(Protocol):
    async def facts(self, x: str, caller: str | None, now: datetime,
                    extension: str | None = None) -> NumberFacts | None: ...

    async def write_cdr(self, row: dict) -> bool:
        """True if the CDR is new, False if the call was written before."""

    async def ping(self) -> None: ...

    async def warm(self, count: int) -> None:
        """Open connections before the first calls need them."""

    async def close(self, timeout: float = 5.0) -> None: ...


def reconnecting(query, engine: Engine, *args):
    """Run a database call; once more if its pooled connection had died (database
    restart, failover). SQLAlchemy then invalidates the whole pool, so the retry gets a
    fresh connection: cheaper than pinging before every checkout on the call path."""
    try:
        return query(engine, *args)
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        DB_RECONNECTS.inc()
        return query(engine, *args)


class ThreadedCallStore:
    """callctl.store.calls in thread pools: `reads` for the facts, `writes` for CDRs."""

    def __init__(self, engine: Engine, reads: Executor, writes: Executor):
        self.engine, self.reads, self.writes = engine, reads, writes

    async def _run(self, executor: Executor, query, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(
                executor, reconnecting, query, self.engine, *args)
        except SQLAlchemyError as exc:
            raise StoreUnavailable(type(exc).__name__) from exc

    async def facts(self, x: str, caller: str | None, now: datetime,
                    extension: str | None = None) -> NumberFacts | None:
        return await self._run(self.reads, call_facts, x, caller, now, extension)

    async def write_cdr(self, row: dict) -> bool:
        return await self._run(self.writes, write_cdr, row)

    async def ping(self) -> None:
        await self._run(self.reads, _select_one)

    async def warm(self, count: int) -> None:
        pass  # SQLAlchemy's pool makes connections as calls need them

    async def close(self, timeout: float = 5.0) -> None:
        pass  # the executors are the daemon's


def _select_one(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
