"""Reading CDRs for people and programs: filters, newest-first lists, and following new
ones as they arrive (`callctl cdr list`, `callctl cdr tail`). Numbers are stored masked;
nothing here can reveal a real one."""
from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterator

from sqlalchemy import and_, func, or_, select
from sqlalchemy.engine import Engine

from callctl.core.decision import Reason
from callctl.core.enums import CallDecision
from callctl.core.numbers import caller_e164
from callctl.core.times import parse_time
from callctl.errors import NotFound, ProvisionError
from callctl.store.models import Cdr, Tenant

CDR_COLUMNS = (
    "id", "call_id", "tenant_id", "binding_id", "virtual_number", "direction",
    "caller_masked", "callee_masked", "decision", "reject_reason", "started_at",
    "answered_at", "ended_at", "ring_seconds", "talk_seconds", "dial_status",
    "hangup_cause", "node", "purpose", "hangup_by",
)
DECISIONS = tuple(CallDecision)
REASONS = tuple(str(reason) for reason in Reason)
_WINDOW = 1000  # ids re-read on each poll of follow_cdrs (inserts committing out of order)


@dataclass(frozen=True)
class CdrFilter:
    """Which CDRs; every field optional. Times are UTC-aware; `until` is exclusive."""
    tenant: str | None = None  # tenant name
    x: str | None = None
    binding: int | None = None
    since: datetime | None = None
    until: datetime | None = None
    decision: str | None = None
    reason: str | None = None

    @classmethod
    def parse(cls, *, tenant=None, x=None, binding=None, since=None, until=None, decision=None, reason=None,
              region: str = "CN", now: datetime | None = None) -> "CdrFilter":
        """From what a person typed; a clear ProvisionError('invalid_filter') otherwise."""
        now = now or datetime.now(timezone.utc)
        number = None
        if x is not None:
            number = caller_e164(x, region)
            if number is None:
                raise ProvisionError("invalid_filter", "X must be a phone number, e.g. +8617100000001")
        if decision is not None and decision not in DECISIONS:
            raise ProvisionError("invalid_filter", f"decision must be one of {', '.join(DECISIONS)}")
        if reason is not None and reason not in REASONS:
            raise ProvisionError("invalid_filter", f"reason must be one of {', '.join(REASONS)}")
        start, end = (parse_time(text, what, now, code="invalid_filter") for text, what in ((since, "since"), (until, "until")))
        if start and end and start >= end:
            raise ProvisionError("invalid_filter", "--since must be before --until")
        return cls(tenant, number, binding, start, end, decision, reason)


def _query(engine: Engine, where: CdrFilter):
    query = select(Cdr)
    if where.tenant is not None:
        with engine.connect() as conn:
            tenant_id = conn.execute(select(Tenant.id).where(Tenant.name == where.tenant)).scalar()
        if tenant_id is None:
            raise NotFound("tenant_not_found", f"no tenant named '{where.tenant}'")
        query = query.where(Cdr.tenant_id == tenant_id)
    if where.x is not None:
        query = query.where(Cdr.virtual_number == where.x)
    if where.binding is not None:
        query = query.where(Cdr.binding_id == where.binding)
    if where.since is not None:
        query = query.where(Cdr.started_at >= where.since)
    if where.until is not None:
        query = query.where(Cdr.started_at < where.until)
    if where.decision is not None:
        query = query.where(Cdr.decision == where.decision)
    if where.reason is not None:
        query = query.where(Cdr.reject_reason == where.reason)
    return query


def as_dict(row: Cdr) -> dict:
    return {c: (v.isoformat() if isinstance(v, datetime) else v) for c in CDR_COLUMNS for v in [getattr(row, c)]}


def encode_cursor(moment: datetime, row_id: int) -> str:
    """A page cursor: the last row's (time, id), opaque to clients."""
    return base64.urlsafe_b64encode(f"{moment.isoformat()}~{row_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        moment, _, row_id = text.partition("~")
        value = datetime.fromisoformat(moment)
        if value.tzinfo is None:
            raise ValueError
        return value, int(row_id)
    except (ValueError, UnicodeDecodeError):
        raise ProvisionError("invalid_cursor", "cursor must be the `next` of a previous page") from None


def page_cdrs(engine: Engine, where: CdrFilter, limit: int = 100, cursor: str | None = None) -> dict:
    """Newest first, a page at a time: {"items": [...], "next": cursor or None}. Keyset
    paging on (started_at, id): stable while new calls are written."""
    query = _query(engine, where)
    if cursor:
        moment, row_id = decode_cursor(cursor)
        query = query.where(or_(Cdr.started_at < moment, and_(Cdr.started_at == moment, Cdr.id < row_id)))
    query = query.order_by(Cdr.started_at.desc(), Cdr.id.desc()).limit(limit + 1)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    items = [as_dict(row) for row in rows[:limit]]
    last = rows[limit - 1] if len(rows) > limit else None
    return {"items": items, "next": encode_cursor(last.started_at, last.id) if last else None}


def list_cdrs(engine: Engine, where: CdrFilter = CdrFilter(), limit: int = 50) -> list[dict]:
    """Newest CDRs first (by start time), as plain dicts."""
    query = _query(engine, where).order_by(Cdr.started_at.desc(), Cdr.id.desc()).limit(limit)
    with engine.connect() as conn:
        return [as_dict(row) for row in conn.execute(query)]


def follow_cdrs(engine: Engine, where: CdrFilter = CdrFilter(), *, backlog: int = 10, every: float = 1.0,
                sleep=time.sleep) -> Iterator[dict]:
    """The last `backlog` CDRs, then every new one as it is written, forever.

    New means inserted since: CDRs are followed by id, not start time, so a spooled CDR
    replayed after an outage shows up when it lands. Ids are handed out at insert but
    become visible at commit, possibly out of order, so the last _WINDOW ids are looked
    at again on every poll; each CDR is yielded once.
    """
    query = _query(engine, where)  # here, not at the first next(): a bad filter fails at once
    return _follow(engine, query, backlog, every, sleep)


def _follow(engine: Engine, query, backlog: int, every: float, sleep) -> Iterator[dict]:
    newest = select(func.max(Cdr.id))
    with engine.connect() as conn:
        last = [as_dict(r) for r in conn.execute(query.order_by(Cdr.id.desc()).limit(backlog))]
        high = conn.execute(newest).scalar() or 0
        seen = set(conn.execute(query.with_only_columns(Cdr.id).where(Cdr.id > high - _WINDOW)).scalars())
    yield from reversed(last)
    while True:
        sleep(every)
        with engine.connect() as conn:
            rows = [as_dict(r) for r in conn.execute(query.where(Cdr.id > high - _WINDOW).order_by(Cdr.id))]
            high = max(high, conn.execute(newest).scalar() or 0)
        for row in rows:
            if row["id"] not in seen:
                seen.add(row["id"])
                yield row
        seen = {i for i in seen if i > high - _WINDOW}
