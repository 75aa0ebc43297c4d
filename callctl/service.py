"""What the PBX adapters call: route one call, record one finished call.

PBX-neutral and synchronous (the adapters run it off their event loop). Decisions
come from callctl.core; facts and CDRs from callctl.store.
"""
from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone

import structlog
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from callctl.core.decision import Bridge, CollectExtension, Decision, Purpose, Reason, Reject, SelfService, decide
from callctl.core.numbers import call_identifier, caller_e164, mask
from callctl.store import customers
from callctl.metrics import DB_ERRORS, SPOOL_REPLAYED
from callctl.store.calls import call_facts, write_cdr, write_cdrs
from callctl.store.crypto import number_hash
from callctl.store.callstore import CallStore, StoreUnavailable, reconnecting
from callctl.store.spool import CdrSpool, SpoolError, encode

log = structlog.get_logger("callctl.calls")
_REASONS = {reason.value for reason in Reason}
_PURPOSES = {purpose.value for purpose in Purpose}
HANGUP_BY = ("caller", "callee", "pbx")  # cdrs.hangup_by
_MAX_EXTENSION = 8  # digits; the width of bindings.extension
_CALL_ID_WIDTH, _NODE_WIDTH = 150, 64  # cdrs.call_id, cdrs.node
_DIAL_STATUS = re.compile(r"[A-Z]{1,20}\Z")  # ANSWER, BUSY, NOANSWER, CHANUNAVAIL...
_MAX_CAUSE = 999  # Q.850 causes are 0-127; anything past 999 is not a cause
LONGEST_WAIT = timedelta(days=1)  # an end this far past now is garbage (so is a start: adapters)


@dataclass(frozen=True)
class FinishedCall:
    """A finished call, typed: each PBX adapter parses its own fields into it. The
    numbers and the decision's words are as the channel carried them (checked here)."""
    call_id: str
    called: str = ""
    caller: str = ""
    destination: str = ""
    action: str = ""
    reason: str = ""
    binding: int | None = None
    tenant: int | None = None
    direction: str = ""
    start: datetime | None = None  # None: the end (or now)
    end: datetime | None = None  # None: when the CDR is made
    ring_seconds: float | None = None  # None: the whole attempt but the talk time
    talk_seconds: float = 0.0
    dial_status: str = ""
    hangup_cause: int | None = None
    node: str = ""
    purpose: str = ""  # the decision's (to_customer calls): why the customer was called
    hangup_by: str = ""  # who ended the call: caller | callee | pbx ("": not reported)


class CallService:
    def __init__(self, engine: Engine, spool: CdrSpool, region: str = "CN", node: str = "",
                 store: CallStore | None = None, selfservice: frozenset[str] = frozenset()):
        self.engine = engine
        self.selfservice = selfservice  # the self-service line's numbers: no routing, a menu
        self.profile_hours: dict = {}  # protection profile -> (from, until): conf/anomaly.yaml profiles
        self.spool = spool
        self.region = region
        self.node = node
        # The asyncio daemon's call store (callctl.store.callstore): route_on_loop and
        # store_row_on_loop go through it. The synchronous methods use the engine.
        self.store = store
        # False until the key ring was checked against the database (the daemon starts
        # while it is down): calls are rejected as unavailable meanwhile, never decided
        # with a ring that may not be the database's (callctl/store/keycheck.py).
        self.keys_checked = True

    def route(
        self, called: str, caller: str, now: datetime | None = None, extension: str | None = None
    ) -> tuple[str | None, Decision]:
        """Decide a call to `called` from `caller` (both as the PBX sent them), and
        for AXE the `extension` the caller keyed when prompted (None before that).

        Returns X in E.164 (None if unreadable) and the decision. Fails closed: a
        database that cannot answer gives Reject(unavailable), never a guess.
        """
        now = now or datetime.now(timezone.utc)
        x, caller_number, extension, early = self._before_facts(called, caller, extension)
        if early is not None:
            return x, early
        try:
            facts = reconnecting(call_facts, self.engine, x, caller_number, now, extension)
        except SQLAlchemyError as exc:
            return x, _unavailable(x, type(exc).__name__)
        return x, decide(caller_number, now, facts, extension, self.profile_hours)

    async def route_on_loop(
        self, called: str, caller: str, now: datetime | None = None, extension: str | None = None
    ) -> tuple[str | None, Decision]:
        """route(), the facts read through the daemon's call store (self.store), awaited."""
        now = now or datetime.now(timezone.utc)
        x, caller_number, extension, early = self._before_facts(called, caller, extension)
        if early is not None:
            return x, early
        try:
            facts = await self.store.facts(x, caller_number, now, extension)
        except StoreUnavailable as exc:
            return x, _unavailable(x, str(exc))
        return x, decide(caller_number, now, facts, extension, self.profile_hours)

    def _before_facts(self, called: str, caller: str, extension: str | None):
        """The numbers read, and the decisions that need no facts: (x, caller, extension,
        decision or None)."""
        x, caller_number, extension = self._read_call(called, caller, extension)
        if x is None:
            return None, caller_number, extension, Reject(Reason.UNKNOWN_NUMBER)
        if not self.keys_checked:
            return x, caller_number, extension, _unavailable(x, "key ring not checked against the database yet")
        if x in self.selfservice:
            return x, caller_number, extension, SelfService()
        return x, caller_number, extension, None

    async def health(self) -> dict[str, str]:
        """/healthz: does the database answer, is the spool writable? "ok" or what is wrong."""
        parts = {}
        try:
            await self.store.ping()
            parts["database"] = "ok"
        except StoreUnavailable as exc:
            DB_ERRORS.labels("health").inc()
            parts["database"] = f"not answering ({exc})"
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.spool.check_writable)
            parts["spool"] = "ok"
        except SpoolError as exc:
            parts["spool"] = str(exc)
        return parts

    def _read_call(self, called: str, caller: str, extension: str | None):
        x = caller_e164(called, self.region)
        caller_number = caller_e164(caller, self.region)
        if extension is not None:
            extension = extension.strip()
            if not (extension.isascii() and extension.isdigit() and len(extension) <= _MAX_EXTENSION):
                extension = ""  # keyed nothing, '*', '#' or garbage: matches no binding
        return x, caller_number, extension

    def record(self, call: FinishedCall, now: datetime | None = None) -> str:
        """Make the CDR of a finished call durable: committed to the database, or else
        fsync'd to the spool. Returns 'written', 'duplicate' or 'spooled'; raises
        SpoolError when neither could take it (the PBX must then not be told it is kept).

        A database that hangs without an error is not cut short here: an adapter that
        must answer in time gives write_row a deadline and calls spool_row past it."""
        return self.write_row(self.cdr_row(call, now))

    def store_row(self, row: dict) -> bool:
        """Insert one CDR row; True if it was new. Database errors are raised."""
        return reconnecting(write_cdr, self.engine, row)

    async def store_row_on_loop(self, row: dict) -> bool:
        """store_row() through the daemon's call store (self.store). StoreUnavailable when
        the database did not take the row: the daemon spools it then, off the loop
        (spooling fsyncs)."""
        return await self.store.write_cdr(row)

    def write_row(self, row: dict) -> str:
        try:
            written = self.store_row(row)
        except SQLAlchemyError as exc:
            return self.spool_row(row, type(exc).__name__)
        return "written" if written else "duplicate"

    def spool_row(self, row: dict, why: str) -> str:
        """Spool a CDR the database did not take. Should a write that timed out commit
        after all, replay finds the CDR there and skips it (unique call key)."""
        DB_ERRORS.labels("cdr").inc()
        self.spool.append(row)
        log.warning("database unavailable, CDR spooled", call_id=row["call_id"], error=why)
        return "spooled"

    def replay_spool(self) -> int:
        """Replay spooled CDRs if the database is back; returns rows replayed (0 if still down)."""
        if not self.spool.pending():
            return 0
        try:
            count = self.spool.replay(self._write_replayed)
        except SQLAlchemyError as exc:
            DB_ERRORS.labels("replay").inc()
            log.info("spool replay deferred: database unavailable", error=type(exc).__name__)
            return 0
        if count:
            SPOOL_REPLAYED.inc(count)
            log.info("spooled CDRs replayed", count=count)
        return count

    def _write_replayed(self, rows: list[dict]) -> None:
        try:
            new = write_cdrs(self.engine, rows)
        except DBAPIError as exc:
            if _is_connectivity(exc):
                raise
            # The database is up but refuses a row (bad data): write the others one by
            # one and keep each refused row for a person, instead of retrying forever.
            new = 0
            for row in rows:
                try:
                    new += write_cdr(self.engine, row)
                except DBAPIError as refused:
                    if _is_connectivity(refused):
                        raise
                    self.spool.set_aside(encode(row))
        if new != len(rows):
            log.info("spooled CDRs already in the database skipped", count=len(rows) - new)

    def selfservice_menu(self, caller: str) -> dict[str, str]:
        """The self-service menu for `caller` as channel variables: CALLCTL_SS_COUNT
        insurers, CALLCTL_SS_<key> each one's state (allowed | none | service_only)."""
        number = caller_e164(caller, self.region)
        menu = customers.selfservice_menu(self.engine, number) if number else []
        return {"SS_COUNT": str(len(menu)), **{f"SS_{m['key']}": m["calls"] for m in menu}}

    def selfservice_key(self, caller: str, key: str) -> dict[str, str]:
        """The caller keyed `key`: that insurer's calls stopped (none) or allowed again;
        CALLCTL_SS_RESULT says which, or invalid."""
        number = caller_e164(caller, self.region)
        done = customers.selfservice_toggle(self.engine, number, key) if number and key.isdigit() else None
        if done is not None:
            log.info("customer set a preference on the self-service line", caller=mask(number),
                     tenant=done["tenant"], calls=done["calls"])
        return {"SS_RESULT": done["calls"] if done else "invalid"}

    def cdr_row(self, call: FinishedCall, now: datetime | None = None) -> dict:
        bridged = call.action == "bridge"
        if call.action == CollectExtension.action:
            # The caller hung up at the extension prompt: no valid extension was keyed.
            call = replace(call, reason=str(Reason.INVALID_EXTENSION))
        # Every value is checked and clamped (the PBX, or anyone on its port, may send
        # anything); a value that makes no sense is dropped, the CDR is always kept.
        # started_at is part of the CDR's key (callctl.store.calls.cdr_insert): adapters
        # must report it the same every time the same call is reported (from the PBX's
        # own channel times).
        now = now or datetime.now(timezone.utc)
        end = call.end
        if end is None or end > now + LONGEST_WAIT:
            end = now
        started = call.start or end
        ended = max(end, started)
        duration = (ended - started).total_seconds()
        talk = min(max(call.talk_seconds, 0.0), duration)
        # No ring time reported: the whole attempt but the talk (routing is a few ms of it).
        ring = duration - talk if call.ring_seconds is None else min(max(call.ring_seconds, 0.0), duration - talk)
        answered_at = ended - timedelta(seconds=talk) if talk else None
        reason = None if bridged else (call.reason if call.reason in _REASONS else Reason.UNAVAILABLE)
        x = caller_e164(call.called, self.region)
        caller = caller_e164(call.caller, self.region)
        callee = caller_e164(call.destination, self.region) if bridged else None
        return {
            "call_id": call_identifier(call.call_id, _CALL_ID_WIDTH),
            "tenant_id": call.tenant,
            "binding_id": call.binding,
            "virtual_number": x,
            "direction": call.direction if call.direction in ("to_customer", "from_customer") else None,
            "caller_masked": mask(caller) if caller else "anonymous",
            # Keyed, not reversible: lets the anomaly job count one caller's calls.
            "caller_hash": number_hash(caller) if caller else None,
            "callee_masked": mask(callee) if callee else None,
            # "self": a call to the self-service line (not routed, neither bridged nor refused)
            "decision": "bridged" if bridged else "self" if call.action == SelfService.action else "rejected",
            "reject_reason": str(reason) if reason and call.action != SelfService.action else None,
            "started_at": started,
            "answered_at": answered_at,
            "ended_at": ended,
            "ring_seconds": round(ring, 3) if bridged else None,
            "talk_seconds": round(talk, 3) if bridged else None,
            "dial_status": call.dial_status if _DIAL_STATUS.match(call.dial_status) else None,
            "hangup_cause": call.hangup_cause if call.hangup_cause is not None and call.hangup_cause <= _MAX_CAUSE else None,
            "node": call_identifier(call.node or self.node, _NODE_WIDTH) or None,
            "purpose": call.purpose if call.purpose in _PURPOSES else None,
            "hangup_by": call.hangup_by if call.hangup_by in HANGUP_BY else None,
        }


def decision_variables(decision: Decision) -> dict[str, str]:
    """The decision as the flat name -> value pairs both PBX dialplans read.

    "action" comes last: adapters set variables in order, so a session cut off
    half-way leaves no action and the dialplan fails closed.
    """
    if isinstance(decision, Bridge):
        values = {
            "dest": decision.destination,
            "clid": decision.present,
            "ring_timeout": str(decision.ring_timeout),
            "max_seconds": str(decision.max_seconds),
        }
        if decision.max_concurrent is not None:
            values["concurrent"] = str(decision.max_concurrent)
    elif isinstance(decision, CollectExtension):
        values = {"ext_digits": str(decision.digits), "ext_tries": str(decision.tries)}
    elif isinstance(decision, SelfService):
        values = {}
    else:
        values = {"reason": str(decision.reason)}
    if decision.binding_id is not None:
        values["binding"] = str(decision.binding_id)
    if decision.tenant_id is not None:
        values["tenant"] = str(decision.tenant_id)
    if decision.direction is not None:
        values["direction"] = str(decision.direction)
    if decision.purpose is not None:
        values["purpose"] = str(decision.purpose)
    values["action"] = decision.action
    return values


def _unavailable(x: str, error: str) -> Reject:
    """Fail closed: no decision without the facts."""
    DB_ERRORS.labels("route").inc()
    # X masked: it was not found to be ours (it may be a person's number).
    log.error("database unavailable for routing", x=mask(x), error=error)
    return Reject(Reason.UNAVAILABLE)


def parse_int(value: str) -> int | None:
    """A PBX's decimal field (ids, causes); None when absent or garbage."""
    return int(value) if value.isascii() and value.isdigit() and len(value) < 18 else None


def parse_epoch(value: str, scale: float = 1.0) -> datetime | None:
    """Epoch time as a PBX writes it (seconds; `scale` 1e-6 for microseconds); None
    when absent, zero or garbage (outside 2001..2286)."""
    try:
        seconds = float(value) * scale
    except ValueError:
        return None
    if not 1e9 < seconds < 1e10:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc)


def parse_ms(value: str) -> float | None:
    """Milliseconds as seconds; None when absent or garbage."""
    return int(value) / 1000.0 if value.isascii() and value.isdigit() and len(value) < 12 else None


def _is_connectivity(exc: DBAPIError) -> bool:
    """Database down or unreachable (retry later), as opposed to a row it refuses."""
    return isinstance(exc, (OperationalError, InterfaceError)) or exc.connection_invalidated
