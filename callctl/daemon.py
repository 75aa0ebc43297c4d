"""The PBX-neutral daemon: the life of one call-control process.

Config, engine, call store, CDR spool and its replay, partitions, housekeeping and
signals live here; a PBX backend only translates its protocol into `route()` and
`record()` and back. Backends are named in BACKENDS, as "module:attribute" strings
imported when chosen (the shape of uvicorn's protocol tables), so `callctl serve NAME`
loads only the backend it runs:

- asyncio backends (Asterisk) subclass AsyncBackend and run on AsyncDaemon;
- a backend with another runtime (FreeSWITCH: gevent) provides its own `serve(cfg)`
  and builds on the synchronous parts: open_service(), Housekeeping, CallService.
"""
from __future__ import annotations

import asyncio
import importlib
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import time as dt_time
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy.exc import SQLAlchemyError

from callctl.core.decision import Decision, Reason, Reject
from callctl import lifecycle
from callctl.core.numbers import caller_e164, mask
from callctl.metrics import CDRS, DB_ERRORS, SPOOL_DEPTH, CdrOutcome, MetricsServer, count_decision
from callctl.service import CallService, FinishedCall
from callctl.store.partitions import ensure_cdr_partitions
from callctl.store.bindings import expire_due
from callctl.store.callstore import StoreUnavailable, ThreadedCallStore
from callctl.store.pgcalls import PgCallStore
from callctl.store import keycheck
from callctl.store.keycheck import KeyMismatch
from callctl.store.spool import CdrSpool, SpoolError

log = structlog.get_logger("callctl.daemon")
WARM_CONNECTIONS = 2  # per kind (routing, CDRs) opened at start; more when calls need them

# Backend name -> "module:attribute" of an object with serve(cfg).
BACKENDS: dict[str, str] = {
    "asterisk": "callctl.asterisk.server:AsteriskBackend",
    "freeswitch": "callctl.freeswitch.server:FreeSwitchBackend",
}


class BackendError(Exception):
    pass


def register(name: str, target: str | Any) -> None:
    """Name a backend: a "module:attribute" string, or the object itself (tests)."""
    BACKENDS[name] = target


def load_backend(name: str) -> Any:
    target = BACKENDS.get(name)
    if target is None:
        raise BackendError(f"no PBX backend named {name!r} (known: {', '.join(sorted(BACKENDS))})")
    if not isinstance(target, str):
        return target
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def serve(name: str, cfg) -> None:
    """Run the daemon with the named backend until SIGINT/SIGTERM."""
    load_backend(name).serve(cfg)


def open_service(cfg) -> CallService:
    """Engine, spool and service: what every backend's process holds."""
    from callctl.store.db import make_engine

    engine = make_engine(cfg.database_url, pool_size=cfg.db_threads, pre_ping=False, timeout=cfg.db_timeout)
    spool = CdrSpool(cfg.spool_dir)
    spool.check_writable()
    service = CallService(engine, spool, region=cfg.region, node=cfg.node,
                          selfservice=frozenset(cfg.selfservice_numbers))
    service.profile_hours = _profile_hours(cfg.anomaly_rules)
    # A ring that is not the database's stops the daemon here (KeyMismatch: exit 2); a
    # database that is down at start: calls are refused until housekeeping could check it.
    service.keys_checked = check_keys(engine)
    return service


def _profile_hours(path: str) -> dict:
    """Protection profiles' calling hours from the anomaly rules file (profiles:), as
    times; none when there is no such file. A bad file stops the daemon (ConfigError)."""
    from callctl.anomaly.config import load

    if not Path(path).exists():
        log.warning("no anomaly rules file: protection profiles have no hours of their own", file=path)
        return {}
    return {name: (dt_time.fromisoformat(start), dt_time.fromisoformat("00:00" if end == "24:00" else end))
            for name, (start, end) in load(path).profile_hours().items()}


def reload_profile_hours(service: CallService, path: str) -> list[str]:
    """SIGHUP: the protection profiles' hours read again from the anomaly rules file.
    ["profile hours"] when they changed; a file that does not load keeps the hours in
    force (logged)."""
    from callctl.config import ConfigError

    try:
        hours = _profile_hours(path)
    except ConfigError as exc:
        log.error("protection profiles' hours not reloaded: rules file not valid, hours kept", error=str(exc))
        return []
    if hours == service.profile_hours:
        return []
    service.profile_hours = hours
    return ["profile hours"]


def check_keys(engine) -> bool:
    """True once the ring matches the database; False while it cannot answer;
    KeyMismatch if the ring is not the database's."""
    try:
        keycheck.verify(engine)
        return True
    except SQLAlchemyError as exc:
        log.warning("key ring not checked yet: database not reachable; calls are refused until it is",
                    error=type(exc).__name__)
        return False


def log_routed(service: CallService, call_id: str, caller: str, x: str | None, decision: Decision,
               ms: float) -> None:
    """The decision's log line and metrics (every backend)."""
    count_decision(decision.action, str(decision.reason) if isinstance(decision, Reject) else None, ms / 1000)
    log.info("call routed", call_id=call_id,
             # X as it is only once found to be ours: a number that is not may be a person's.
             x=x if decision.tenant_id is not None else mask(x) or None,
             caller=mask(caller_e164(caller, service.region)),
             action=decision.action, reason=str(decision.reason) if isinstance(decision, Reject) else None,
             binding=decision.binding_id, ms=round(ms, 3))


def counted_cdr(outcome: str | SpoolError) -> str:
    """A CDR's outcome in the metrics; a SpoolError (nothing kept it) is raised on."""
    if isinstance(outcome, SpoolError):
        CDRS.labels(CdrOutcome.LOST).inc()
        raise outcome
    CDRS.labels(outcome).inc()
    return outcome


class Housekeeping:
    """Check the key ring until the database could answer (KeyMismatch if it is not the
    database's: the daemon stops); replay spooled CDRs whenever the database is back;
    release expired bindings, their X to quarantine (every daemon does it, each taking
    rows the others do not hold); keep the coming days' CDR partitions made (at start,
    then hourly). Synchronous: run step() off the event loop (asyncio) or in a greenlet
    (gevent) every `every` seconds (housekeeping_seconds)."""

    def __init__(self, service: CallService, cfg):
        self.service = service
        self.every = cfg.housekeeping_seconds
        self.quarantine = cfg.expiry_quarantine
        self.next_partitions = 0.0

    def step(self) -> None:
        if not self.service.keys_checked:
            self.service.keys_checked = check_keys(self.service.engine)
            if self.service.keys_checked:
                log.info("key ring checked against the database: routing calls")
        self.service.replay_spool()
        try:
            expired = expire_due(self.service.engine, self.quarantine)
            if expired:
                log.info("expired bindings released", count=expired)
        except SQLAlchemyError as exc:
            log.warning("expired bindings not released: database unavailable", error=type(exc).__name__)
        if time.monotonic() < self.next_partitions:
            return
        try:
            ensure_cdr_partitions(self.service.engine)
            self.next_partitions = time.monotonic() + 3600
        except SQLAlchemyError as exc:  # database down: the default partition takes CDRs meanwhile
            log.warning("CDR partitions not checked", error=type(exc).__name__)
            self.next_partitions = time.monotonic() + 60


class AsyncDaemon:
    """The asyncio daemon. Routing and CDR writes go through the call store
    (callctl.store.callstore): on PostgreSQL on the event loop (asyncpg), on SQLite in two
    thread pools. Either way a call waiting for its decision never queues behind CDR
    writes (slow, or timing out while the database is down). Spooling has its own small
    thread pool, free while CDR writes hang."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.stop = asyncio.Event()
        # The database calls have their own timeouts (db_timeout); these are the last
        # guard, e.g. a database that hangs without an error (stuck server, no RST).
        self.decision_timeout = cfg.db_timeout + 1
        self.write_timeout = cfg.db_timeout + 1
        self.service: CallService | None = None

    async def open(self) -> None:
        cfg = self.cfg
        # A thread waiting for the GIL waits up to the switch interval (default 5 ms) while
        # another thread computes: that wait was most of the decision's p99 under load.
        sys.setswitchinterval(0.0005)
        self.service = open_service(cfg)
        self.route_executor = ThreadPoolExecutor(max_workers=cfg.db_threads, thread_name_prefix="callctl-route")
        self.cdr_executor = ThreadPoolExecutor(max_workers=cfg.db_threads, thread_name_prefix="callctl-cdr")
        self.spool_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="callctl-spool")
        if self.service.engine.dialect.name == "postgresql":
            self.service.store = await PgCallStore.open(cfg.database_url, cfg.db_threads, cfg.db_timeout,
                                                        cfg.cdr_group_ms / 1000 if cfg.cdr_group_ms else None)
        else:
            self.service.store = ThreadedCallStore(self.service.engine, self.route_executor, self.cdr_executor)

    async def route(self, called: str, caller: str, extension: str | None,
                    call_id: str) -> tuple[str | None, Decision]:
        """Decide one call (numbers as the PBX sent them); fails closed in time."""
        service = self.service
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.decision_timeout):
                x, decision = await service.route_on_loop(called, caller, None, extension)
        except TimeoutError:
            DB_ERRORS.labels("route").inc()
            log.error("no decision in time: rejected as unavailable", call_id=call_id,
                      seconds=self.decision_timeout)
            x, decision = caller_e164(called, service.region), Reject(Reason.UNAVAILABLE)
        log_routed(service, call_id, caller, x, decision, (time.perf_counter() - started) * 1000)
        return x, decision

    async def in_thread(self, fn, *args):
        """A store call off the call path (e.g. the self-service line), in the routing
        threads, within the decision's bound (TimeoutError past it)."""
        async with asyncio.timeout(self.decision_timeout):
            return await asyncio.get_running_loop().run_in_executor(self.route_executor, fn, *args)

    async def record(self, call: FinishedCall) -> str:
        """Make a finished call's CDR durable: 'written', 'duplicate' or 'spooled'.
        Raises SpoolError when neither the database nor the spool took it: the PBX must
        then not be told the CDR is kept."""
        return counted_cdr(await self._record(call))

    async def _record(self, call: FinishedCall):
        service = self.service
        loop = asyncio.get_running_loop()
        # The row is made once: a write that times out and its spooled copy carry the
        # same call key, so replay cannot store the call twice.
        row = service.cdr_row(call)
        try:
            async with asyncio.timeout(self.write_timeout):
                return "written" if await service.store_row_on_loop(row) else "duplicate"
        except (TimeoutError, StoreUnavailable) as exc:
            why = str(exc) if isinstance(exc, StoreUnavailable) else "timeout"
            try:
                return await loop.run_in_executor(self.spool_executor, service.spool_row, row, why)
            except SpoolError as lost:
                return lost

    async def run(self, backend_cls) -> None:
        await self.open()
        service = self.service
        backend = backend_cls(self)
        loop = asyncio.get_running_loop()
        metrics = MetricsServer(self.cfg.metrics.host, self.cfg.metrics.port, service.health)
        SPOOL_DEPTH.set_function(service.spool.depth)
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self.stop.set)

        def apply(fresh) -> list[str]:
            backend.apply(fresh)
            return reload_profile_hours(service, fresh.anomaly_rules)

        def on_hup() -> None:  # SIGHUP: what can change without a restart (lifecycle.reload)
            self.cfg = lifecycle.reload(self.cfg, apply)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        await metrics.start()
        where = await backend.start()
        log.info(f"serving {backend_cls.name}", **where, database=service.engine.dialect.name,
                 metrics=f"{self.cfg.metrics.host}:{metrics.port}")
        lifecycle.notify("READY=1")
        housekeeping = asyncio.create_task(self._housekeeping())
        watchdog = asyncio.create_task(lifecycle.watchdog(self.stop))
        await self.stop.wait()
        if housekeeping.done() and housekeeping.exception():
            log.error("stopping: the key ring is not this database's", error=str(housekeeping.exception()))
        lifecycle.notify("STOPPING=1")
        log.info("stopping: no new sessions, finishing those in progress")
        await backend.close()
        await watchdog
        await housekeeping  # raises KeyMismatch if that is why we stop: exit 2
        # Flush: spooled CDRs go to the database now if it answers (else they wait, on disk,
        # for the next start).
        await loop.run_in_executor(self.cdr_executor, service.replay_spool)
        await metrics.close()
        for executor in (self.route_executor, self.cdr_executor, self.spool_executor):
            executor.shutdown(wait=True)
        await service.store.close()
        service.engine.dispose()
        log.info("stopped")

    async def _housekeeping(self) -> None:
        """Housekeeping every few seconds; on PostgreSQL first open a few call-path
        connections, so the first calls after a start do not each pay for one."""
        loop = asyncio.get_running_loop()
        keeper = Housekeeping(self.service, self.cfg)
        try:
            await self.service.store.warm(WARM_CONNECTIONS)
        except StoreUnavailable as exc:  # down at start: connections are made when it is back
            log.info("database not reachable at start", error=str(exc))
        while not self.stop.is_set():
            try:
                await loop.run_in_executor(self.cdr_executor, keeper.step)
            except KeyMismatch:
                self.stop.set()
                raise
            try:
                await asyncio.wait_for(self.stop.wait(), keeper.every)
            except TimeoutError:
                pass


class AsyncBackend:
    """A PBX backend on the asyncio daemon: start() opens its listener and returns what
    the "serving" log line tells (listen address, allowed peers); close() stops it,
    letting sessions in progress finish."""

    name = "?"

    def __init__(self, daemon: AsyncDaemon):
        self.daemon = daemon

    @classmethod
    def serve(cls, cfg) -> None:
        import uvloop

        # uvloop: the same asyncio API on libuv; about half the event loop's CPU per call.
        uvloop.run(AsyncDaemon(cfg).run(cls))

    async def start(self) -> dict:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def apply(self, fresh) -> None:
        """SIGHUP: take what the reloaded config changes for this backend."""
