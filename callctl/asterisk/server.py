"""Asterisk backend: FastAGI scripts `route` and `hangup` (docs/agi.md).

Translates the AGI session to the daemon's route/record and back, nothing more; the
daemon (callctl.daemon) owns the store, spool, timeouts and housekeeping.
"""
from __future__ import annotations

import asyncio
from datetime import timedelta

import structlog
from sqlalchemy.exc import SQLAlchemyError

from callctl.asterisk.fastagi import AgiSession, FastAgiServer
from callctl.daemon import AsyncBackend
from callctl.metrics import SESSIONS_OPEN, Protocol
from callctl.netacl import AllowList
from callctl.service import LONGEST_WAIT, FinishedCall, decision_variables, parse_epoch, parse_int, parse_ms
from callctl.store.spool import SpoolError

log = structlog.get_logger("callctl.asterisk")
_SKEW = timedelta(minutes=1)  # a start this much before the uniqueid's time: clocks

# AGI argument name -> FinishedCall field (docs/agi.md, section 2), those kept as text.
_TEXT_ARGS = {
    "called": "called", "caller": "caller", "dest": "destination", "action": "action",
    "reason": "reason", "direction": "direction", "dialstatus": "dial_status", "node": "node",
    "purpose": "purpose", "hangupby": "hangup_by",
}


def keyword_args(args: list[str]) -> dict[str, str]:
    """AGI arguments of the form key=value; anything else is ignored."""
    pairs = (arg.partition("=") for arg in args)
    return {key.strip(): value.strip() for key, sep, value in pairs if sep}


def finished_call(call_id: str, given: dict[str, str]) -> FinishedCall:
    """The hangup AGI's key=value arguments (docs/agi.md, section 2) as a FinishedCall."""
    talk = parse_ms(given.get("answeredtime", "")) or 0.0
    # Asterisk leaves DIALEDTIME_MS empty unless the callee answered: then the whole
    # attempt (routing is a few ms of it) was ringing, which None tells the service.
    dialed = parse_ms(given.get("dialedtime", ""))
    return FinishedCall(
        call_id=call_id,
        **{field: given.get(arg, "") for arg, field in _TEXT_ARGS.items()},
        binding=parse_int(given.get("binding", "")),
        tenant=parse_int(given.get("tenant", "")),
        start=_start(call_id, parse_epoch(given.get("start", ""))),
        end=parse_epoch(given.get("end", "")),
        ring_seconds=max(dialed - talk, 0.0) if dialed else None,
        talk_seconds=talk,
        hangup_cause=parse_int(given.get("hangupcause", "")),
    )


def _start(call_id: str, start):
    """started_at is part of the CDR's key (callctl.store.calls.cdr_insert): every report
    of one call must give a start within CDR_WINDOW of the others. Asterisk writes the
    channel's creation time into the uniqueid ("node-1795887084.12"): a start not within
    a day after it is garbage, and that time is used instead."""
    created = parse_epoch(call_id.rpartition("-")[2].partition(".")[0])
    if created and not (start and created - _SKEW <= start <= created + LONGEST_WAIT):
        return created
    return start


class AsteriskBackend(AsyncBackend):
    name = "FastAGI"

    @property
    def routes(self):
        return {"route": self.route, "hangup": self.hangup, "selfservice": self.selfservice}

    async def start(self) -> dict:
        agi = self.daemon.cfg.agi
        self.server = FastAgiServer(
            self.routes, agi.host, agi.port,
            env_timeout=agi.env_timeout, command_timeout=agi.command_timeout, allow=AllowList.of(agi.allow),
        )
        SESSIONS_OPEN.labels(Protocol.AGI).set_function(lambda: self.server.active_sessions)
        await self.server.start()
        self.ami = None
        if self.daemon.cfg.ami.username:  # the AMI link's state as a metric (callctl_ami_connected)
            from callctl.asterisk.ami import AmiLink

            ami = self.daemon.cfg.ami
            self.ami = AmiLink(ami.host, ami.port, ami.username, ami.secret, ami.action_timeout)
            self.ami.start()
            self.ami_keepalive = asyncio.create_task(self.ami.keepalive(self.daemon.stop))
        return {"listen": f"{agi.host}:{self.server.port}", "allow": agi.allow}

    def apply(self, fresh) -> None:
        """SIGHUP: the reloaded config's timeouts and allow-list."""
        self.server.env_timeout, self.server.command_timeout = fresh.agi.env_timeout, fresh.agi.command_timeout
        self.server.allow = AllowList.of(fresh.agi.allow)

    async def close(self) -> None:
        await self.server.close()
        if self.ami is not None:
            await self.ami_keepalive
            self.ami.close()

    async def selfservice(self, session: AgiSession) -> None:
        """The customers' self-service line (dialplan context callctl-selfservice): without
        key=, the caller's menu; with key=, that insurer's calls switched. Not the call
        path: SQLAlchemy in the routing threads, on either database."""
        given = keyword_args(session.args)
        caller = given.get("caller", session.env.get("agi_callerid", ""))
        key = given.get("key")
        service = self.daemon.service
        work = service.selfservice_menu if key is None else service.selfservice_key
        args = (caller,) if key is None else (caller, key)
        try:
            values = await self.daemon.in_thread(work, *args)
        except (TimeoutError, SQLAlchemyError) as exc:
            log.error("self-service line: database unavailable", error=type(exc).__name__)
            return  # no CALLCTL_SS_* set: the dialplan plays the unavailable prompt
        await session.set_variables_at_once({f"CALLCTL_{name}": value for name, value in values.items()})

    async def route(self, session: AgiSession) -> None:
        given = keyword_args(session.args)
        called = given.get("called", session.env.get("agi_extension", ""))
        caller = given.get("caller", session.env.get("agi_callerid", ""))
        extension = given.get("extension")  # AXE: the digits keyed at the prompt
        _, decision = await self.daemon.route(called, caller, extension, session.env.get("agi_uniqueid", ""))
        await session.set_variables_at_once(
            {f"CALLCTL_{name.upper()}": value for name, value in decision_variables(decision).items()}
        )

    async def hangup(self, session: AgiSession) -> None:
        call = finished_call(session.env.get("agi_uniqueid", ""), keyword_args(session.args))
        if not call.call_id:
            log.warning("hangup without a call id ignored")
            return
        try:
            outcome = await self.daemon.record(call)
        except SpoolError as exc:
            log.error("CDR not kept: database down and spool unusable", call_id=call.call_id, error=str(exc))
            return
        # The acknowledgement: sent only once the CDR is committed or fsync'd.
        await session.set_variable("CALLCTL_CDR", outcome)
        log.info("call recorded", call_id=call.call_id, outcome=outcome)
