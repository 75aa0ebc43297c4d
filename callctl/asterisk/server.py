"""Asterisk adapter: FastAGI scripts `route` and `hangup` (docs/agi.md).

Translates the AGI session to CallService calls and back, nothing more. Database work
never blocks the event loop that serves other calls: on PostgreSQL it is asynchronous
(asyncpg), on SQLite it runs in thread pools.
"""
from __future__ import annotations

import asyncio
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from datetime import time as dt_time

import structlog
import uvloop
from sqlalchemy.exc import SQLAlchemyError

from callctl.asterisk.fastagi import AgiSession, FastAgiServer
from callctl.core.decision import Reason, Reject
from callctl.core.numbers import caller_e164, mask
from callctl import lifecycle
from callctl.metrics import (CDRS, DB_ERRORS, SESSIONS_OPEN, SPOOL_DEPTH, CdrOutcome, MetricsServer, Protocol,
                             count_decision)
from callctl.netacl import AllowList
from callctl.service import CallService, FinishedCall, decision_variables
from callctl.store import keycheck
from callctl.store.keycheck import KeyMismatch
from callctl.store.partitions import ensure_cdr_partitions
from callctl.store.provision import expire_due
from callctl.store.pgcalls import PgCallStore, PgUnavailable
from callctl.store.spool import SpoolError

log = structlog.get_logger("callctl.asterisk")
WARM_CONNECTIONS = 2  # per kind (routing, CDRs) opened at start; more when calls need them

# AGI argument name -> FinishedCall field (docs/agi.md, section 2).
_HANGUP_ARGS = {
    "called": "called", "caller": "caller", "dest": "destination", "action": "action",
    "reason": "reason", "binding": "binding", "tenant": "tenant", "direction": "direction",
    "start": "start", "end": "end", "dialstatus": "dial_status", "dialedtime": "dialed_ms",
    "answeredtime": "answered_ms", "hangupcause": "hangup_cause", "node": "node",
}


def keyword_args(args: list[str]) -> dict[str, str]:
    """AGI arguments of the form key=value; anything else is ignored."""
    pairs = (arg.partition("=") for arg in args)
    return {key.strip(): value.strip() for key, sep, value in pairs if sep}


def finished_call(call_id: str, given: dict[str, str]) -> FinishedCall:
    """The hangup AGI's key=value arguments (docs/agi.md, section 2) as a FinishedCall."""
    return FinishedCall(call_id=call_id, **{field: given.get(arg, "") for arg, field in _HANGUP_ARGS.items()})


class AsteriskAdapter:
    """On PostgreSQL routing and CDR writes run on the event loop (service.pg, two
    connection pools); on SQLite in two thread pools. Either way a call waiting for its
    decision never queues behind CDR writes (slow, or timing out while the database is
    down). Spooling has its own small thread pool, free while CDR writes hang."""

    def __init__(self, service: CallService, route_executor: ThreadPoolExecutor,
                 cdr_executor: ThreadPoolExecutor, spool_executor: ThreadPoolExecutor,
                 decision_timeout: float = 3.0, write_timeout: float = 4.0):
        self.service = service
        self.route_executor = route_executor
        self.cdr_executor = cdr_executor
        self.spool_executor = spool_executor
        # The database calls have their own timeouts (db_timeout); these are the last
        # guard, e.g. a database that hangs without an error (stuck server, no RST).
        self.decision_timeout = decision_timeout
        self.write_timeout = write_timeout

    @property
    def routes(self):
        return {"route": self.route, "hangup": self.hangup, "selfservice": self.selfservice}

    async def selfservice(self, session: AgiSession) -> None:
        """The customers' self-service line (dialplan context callctl-selfservice): without
        key=, the caller's menu; with key=, that insurer's calls switched. Not the call
        path: SQLAlchemy in the routing threads, on either database."""
        given = keyword_args(session.args)
        caller = given.get("caller", session.env.get("agi_callerid", ""))
        key = given.get("key")
        work = self.service.selfservice_menu if key is None else self.service.selfservice_key
        args = (caller,) if key is None else (caller, key)
        try:
            async with asyncio.timeout(self.decision_timeout):
                values = await asyncio.get_running_loop().run_in_executor(self.route_executor, work, *args)
        except (TimeoutError, SQLAlchemyError) as exc:
            log.error("self-service line: database unavailable", error=type(exc).__name__)
            return  # no CALLCTL_SS_* set: the dialplan plays the unavailable prompt
        await session.set_variables_at_once({f"CALLCTL_{name}": value for name, value in values.items()})

    async def route(self, session: AgiSession) -> None:
        given = keyword_args(session.args)
        called = given.get("called", session.env.get("agi_extension", ""))
        caller = given.get("caller", session.env.get("agi_callerid", ""))
        extension = given.get("extension")  # AXE: the digits keyed at the prompt
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.decision_timeout):
                if self.service.pg is not None:
                    x, decision = await self.service.route_on_loop(called, caller, None, extension)
                else:
                    x, decision = await asyncio.get_running_loop().run_in_executor(
                        self.route_executor, self.service.route, called, caller, None, extension)
        except TimeoutError:
            DB_ERRORS.labels("route").inc()
            log.error("no decision in time: rejected as unavailable", call_id=session.env.get("agi_uniqueid", ""),
                      seconds=self.decision_timeout)
            x, decision = caller_e164(called, self.service.region), Reject(Reason.UNAVAILABLE)
        decided_s = time.perf_counter() - started
        reason = str(decision.reason) if isinstance(decision, Reject) else None
        count_decision(decision.action, reason, decided_s)
        await session.set_variables_at_once(
            {f"CALLCTL_{name.upper()}": value for name, value in decision_variables(decision).items()}
        )
        log.info(
            "call routed",
            call_id=session.env.get("agi_uniqueid", ""),
            # X as it is only once found to be ours: a number that is not may be a person's.
            x=x if decision.tenant_id is not None else mask(x) or None,
            caller=mask(caller_e164(caller, self.service.region)),
            action=decision.action,
            reason=reason,
            binding=decision.binding_id,
            ms=round(decided_s * 1000, 3),
        )

    async def hangup(self, session: AgiSession) -> None:
        call = finished_call(session.env.get("agi_uniqueid", ""), keyword_args(session.args))
        if not call.call_id:
            log.warning("hangup without a call id ignored")
            return
        loop = asyncio.get_running_loop()
        # The row is made once: a write that times out and its spooled copy carry the
        # same call key, so replay cannot store the call twice.
        row = self.service.cdr_row(call, datetime.now(timezone.utc))
        try:
            try:
                async with asyncio.timeout(self.write_timeout):
                    if self.service.pg is not None:
                        outcome = "written" if await self.service.store_row_on_loop(row) else "duplicate"
                    else:  # write_row spools, in its thread, what the database refuses
                        outcome = await loop.run_in_executor(self.cdr_executor, self.service.write_row, row)
            except (TimeoutError, PgUnavailable) as exc:
                why = str(exc) if isinstance(exc, PgUnavailable) else "timeout"
                outcome = await loop.run_in_executor(self.spool_executor, self.service.spool_row, row, why)
        except SpoolError as exc:
            CDRS.labels(CdrOutcome.LOST).inc()
            log.error("CDR not kept: database down and spool unusable", call_id=call.call_id, error=str(exc))
            return
        CDRS.labels(outcome).inc()
        # The acknowledgement: sent only once the CDR is committed or fsync'd.
        await session.set_variable("CALLCTL_CDR", outcome)
        log.info("call recorded", call_id=call.call_id, outcome=outcome)


async def run(cfg) -> None:
    from callctl.store.db import make_engine
    from callctl.store.spool import CdrSpool

    # A thread waiting for the GIL waits up to the switch interval (default 5 ms) while
    # another thread computes: that wait was most of the decision's p99 under load.
    sys.setswitchinterval(0.0005)
    engine = make_engine(cfg.database_url, pool_size=cfg.db_threads, pre_ping=False, timeout=cfg.db_timeout)
    spool = CdrSpool(cfg.spool_dir)
    spool.check_writable()
    # PostgreSQL: the call path's statements on this event loop (callctl.store.pgcalls);
    # SQLite: in the thread pools below.
    pg = (await PgCallStore.open(cfg.database_url, cfg.db_threads, cfg.db_timeout)
          if engine.dialect.name == "postgresql" else None)
    service = CallService(engine, spool, region=cfg.region, node=cfg.node, pg=pg,
                          selfservice=frozenset(cfg.selfservice_numbers))
    service.profile_hours = _profile_hours(cfg.anomaly_rules)
    # A ring that is not the database's stops the daemon here (exit 2); a database that
    # is down at start: calls are refused until housekeeping could check it.
    service.keys_checked = _check_keys(engine)
    route_executor = ThreadPoolExecutor(max_workers=cfg.db_threads, thread_name_prefix="callctl-route")
    cdr_executor = ThreadPoolExecutor(max_workers=cfg.db_threads, thread_name_prefix="callctl-cdr")
    spool_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="callctl-spool")
    adapter = AsteriskAdapter(service, route_executor, cdr_executor, spool_executor,
                              decision_timeout=cfg.db_timeout + 1, write_timeout=cfg.db_timeout + 1)
    server = FastAgiServer(
        adapter.routes, cfg.agi.host, cfg.agi.port,
        env_timeout=cfg.agi.env_timeout, command_timeout=cfg.agi.command_timeout,
        allow=AllowList.of(cfg.agi.allow),
    )
    metrics = MetricsServer(cfg.metrics.host, cfg.metrics.port, service.health)
    SESSIONS_OPEN.labels(Protocol.AGI).set_function(lambda: server.active_sessions)
    SPOOL_DEPTH.set_function(spool.depth)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    def apply(fresh) -> None:
        server.env_timeout, server.command_timeout = fresh.agi.env_timeout, fresh.agi.command_timeout
        server.allow = AllowList.of(fresh.agi.allow)

    def on_hup() -> None:
        nonlocal cfg
        cfg = lifecycle.reload(cfg, apply)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    await metrics.start()
    await server.start()
    log.info("serving FastAGI", listen=f"{cfg.agi.host}:{server.port}", allow=cfg.agi.allow,
             database=engine.dialect.name, metrics=f"{cfg.metrics.host}:{metrics.port}")
    lifecycle.notify("READY=1")
    replayer = asyncio.create_task(_housekeeping(service, cdr_executor, stop, cfg.housekeeping_seconds,
                                                 timedelta(days=cfg.quarantine_days)))
    watchdog = asyncio.create_task(lifecycle.watchdog(stop))
    ami = None
    if cfg.ami.username:  # the AMI link's state as a metric (callctl_ami_connected)
        from callctl.asterisk.ami import AmiLink

        ami = AmiLink(cfg.ami.host, cfg.ami.port, cfg.ami.username, cfg.ami.secret, cfg.ami.action_timeout)
        ami.start()
        ami_keepalive = asyncio.create_task(ami.keepalive(stop))
    await stop.wait()
    if replayer.done() and replayer.exception():
        log.error("stopping: the key ring is not this database's", error=str(replayer.exception()))
    lifecycle.notify("STOPPING=1")
    log.info("stopping: no new sessions, finishing those in progress")
    await server.close()
    await watchdog
    if ami is not None:
        await ami_keepalive
        ami.close()
    await replayer  # raises KeyMismatch if that is why we stop: exit 2
    # Flush: spooled CDRs go to the database now if it answers (else they wait, on disk,
    # for the next start).
    await loop.run_in_executor(cdr_executor, service.replay_spool)
    await metrics.close()
    route_executor.shutdown(wait=True)
    cdr_executor.shutdown(wait=True)
    spool_executor.shutdown(wait=True)
    if pg is not None:
        await pg.close()
    engine.dispose()
    log.info("stopped")


async def _housekeeping(service: CallService, executor, stop: asyncio.Event, every: float = 5.0,
                        quarantine: timedelta = timedelta(days=30)) -> None:
    """Replay spooled CDRs whenever the database is back (at start, then every few
    seconds); release expired bindings, their X to quarantine (every few seconds; every
    daemon does it, each taking rows the others do not hold); keep the coming days' CDR
    partitions made (at start, then hourly). On
    PostgreSQL, first open a few call-path connections, so the first calls after a
    start do not each pay for one."""
    loop = asyncio.get_running_loop()
    next_partitions = 0.0
    if service.pg is not None:
        try:
            await service.pg.warm(WARM_CONNECTIONS)
        except PgUnavailable as exc:  # down at start: connections are made when it is back
            log.info("database not reachable at start", error=str(exc))
    while not stop.is_set():
        if not service.keys_checked:
            try:
                service.keys_checked = await loop.run_in_executor(executor, _check_keys, service.engine)
            except KeyMismatch:
                stop.set()
                raise
            if service.keys_checked:
                log.info("key ring checked against the database: routing calls")
        await loop.run_in_executor(executor, service.replay_spool)
        try:
            expired = await loop.run_in_executor(executor, expire_due, service.engine, quarantine)
            if expired:
                log.info("expired bindings released", count=expired)
        except SQLAlchemyError as exc:
            log.warning("expired bindings not released: database unavailable", error=type(exc).__name__)
        if time.monotonic() >= next_partitions:
            try:
                await loop.run_in_executor(executor, ensure_cdr_partitions, service.engine)
                next_partitions = time.monotonic() + 3600
            except SQLAlchemyError as exc:  # database down: the default partition takes CDRs meanwhile
                log.warning("CDR partitions not checked", error=type(exc).__name__)
                next_partitions = time.monotonic() + 60
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass


def _check_keys(engine) -> bool:
    """True once the ring matches the database; False while it cannot answer;
    KeyMismatch if the ring is not the database's."""
    try:
        keycheck.verify(engine)
        return True
    except SQLAlchemyError as exc:
        log.warning("key ring not checked yet: database not reachable; calls are refused until it is",
                    error=type(exc).__name__)
        return False


def _profile_hours(path: str) -> dict:
    """Protection profiles' calling hours from the anomaly rules file (profiles:), as
    times; none when there is no such file. A bad file stops the daemon (ConfigError)."""
    from pathlib import Path

    from callctl.anomaly.config import load

    if not Path(path).exists():
        log.warning("no anomaly rules file: protection profiles have no hours of their own", file=path)
        return {}
    return {name: (dt_time.fromisoformat(start), dt_time.fromisoformat("00:00" if end == "24:00" else end))
            for name, (start, end) in load(path).profile_hours().items()}


def serve(cfg) -> None:
    # uvloop: the same asyncio API on libuv; about half the event loop's CPU per call.
    uvloop.run(run(cfg))
