"""Blocks: add, list, lift. Used by the CLI and the API (thin wrappers over these).

A block is evidence: it is never deleted or edited, only lifted (its end set to now,
with who lifted it). Nothing is cached anywhere: the call-time query
(callctl.store.calls) reads the blocks table on every call, so a block added or lifted
here is seen by every daemon on the very next call.
"""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from sqlalchemy import bindparam, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from callctl.core.bounds import MAX_ID, MAX_SECONDS, printable
from callctl.core.enums import BindingStatus, BlockDirection, BlockScope
from callctl.core.numbers import InvalidNumber, mask, to_e164
from callctl.errors import Conflict, NotFound, ProvisionError
from callctl.store.crypto import number_hash
from callctl.store.models import Binding, Block, Tenant, UTCDateTime, VirtualNumber, utcnow
from callctl.store.inputs import parse_number
from callctl.store.tenants import tenant_row
from callctl.store.reveal import append

SCOPES = tuple(BlockScope)
DIRECTIONS = tuple(BlockDirection)
# What each scope needs to name its target (the CLI option / API field).
TARGET = {BlockScope.BINDING: "binding_id", BlockScope.CALLER: "caller", BlockScope.NUMBER: "number",
          BlockScope.TENANT: "tenant"}
_DIGIT_RUN = re.compile(r"\+?\d[\d ()\-]{5,}\d")


def block_view(block: Block, tenant_name: str, x: str | None, now: datetime) -> dict:
    if block.ends_at is not None and block.ends_at <= now:
        status = "ended"
    elif block.starts_at > now:
        status = "scheduled"
    else:
        status = "active"
    return {
        "id": block.id,
        "tenant": tenant_name,
        "scope": block.scope,
        "direction": block.direction,
        "binding_id": block.binding_id,
        "x": x,
        "caller": mask(block.caller) if block.caller else None,
        "reason": block.reason,
        "created_by": block.created_by,
        "starts_at": block.starts_at.isoformat(),
        "ends_at": block.ends_at.isoformat() if block.ends_at else None,
        "lifted_by": block.lifted_by,
        "status": status,
        "created_at": block.created_at.isoformat() if block.created_at else None,
    }


def _text(value: str | None, what: str, longest: int) -> str:
    text = (value or "").strip()
    if not text or len(text) > longest or not printable(text):
        raise ProvisionError(f"invalid_{what.replace(' ', '_')}",
                             f"{what} must be 1-{longest} printable characters")
    return text


def _no_phone_number(reason: str, region: str) -> None:
    """Free text ends up in lists and exports: a real number typed into it would leak."""
    for run in _DIGIT_RUN.findall(reason):
        try:
            to_e164(run, region)
        except InvalidNumber:
            continue
        raise ProvisionError(
            "invalid_reason", "reason must not contain a phone number (name the caller with the caller scope)"
        )


def _aware(value: datetime | None, what: str) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise ProvisionError("invalid_time", f"{what} needs a time zone, e.g. 2027-01-01T00:00:00+08:00")
    try:
        return value.astimezone(timezone.utc) if value is not None else None
    except OverflowError:  # 9999-12-31T23:59-14:00 is in the year 10000
        raise ProvisionError("invalid_time", f"{what} is out of range") from None


def add_block(
    engine: Engine,
    *,
    scope: str,
    direction: str,
    reason: str,
    created_by: str,
    tenant: str | None = None,
    binding_id: int | None = None,
    number: str | None = None,
    caller: str | None = None,
    starts_at: datetime | None = None,
    ends_at: datetime | None = None,
    duration_seconds: int | None = None,
    region: str = "CN",
    now: datetime | None = None,
) -> dict:
    """Add a block. scope 'binding' names binding_id, 'number' names X, 'caller' names
    the tenant and the caller's number, 'tenant' names the tenant (a suspension)."""
    now = now or utcnow()
    _check_target(scope, direction, tenant, {"binding_id": binding_id, "number": number, "caller": caller})
    reason = _text(reason, "reason", 500)
    _no_phone_number(reason, region)
    created_by = _text(created_by, "created by", 100)
    starts_at, ends_at = _block_times(starts_at, ends_at, duration_seconds, now)
    caller_e164 = parse_number(caller, "caller", region) if caller is not None else None
    x = parse_number(number, "virtual number", region) if number is not None else None
    with Session(engine) as session, session.begin():
        owner, number_row, binding = _target(session, scope, tenant, binding_id, x)
        block = Block(
            tenant_id=owner.id,
            scope=scope,
            direction=direction,
            binding_id=binding.id if binding else None,
            number_id=number_row.id if number_row else None,
            caller=caller_e164,
            reason=reason,
            created_by=created_by,
            starts_at=starts_at,
            ends_at=ends_at,
            created_at=now,
        )
        session.add(block)
        session.flush()
        return block_view(block, owner.name, number_row.e164 if number_row else None, now)


def _check_target(scope: str, direction: str, tenant: str | None, targets: dict) -> None:
    """The scope and direction are known, and the block names exactly what its scope needs."""
    if scope not in SCOPES:
        raise ProvisionError("invalid_scope", f"scope must be one of {', '.join(SCOPES)}")
    if direction not in DIRECTIONS:
        raise ProvisionError("invalid_direction", f"direction must be one of {', '.join(DIRECTIONS)}")
    needed = {TARGET[scope]} | ({"tenant"} if scope == "caller" else set())
    extra = sorted(k for k, v in targets.items() if v is not None and k not in needed)
    if extra:
        raise ProvisionError("invalid_target", f"a {scope} block takes no {', '.join(extra)}")
    missing = sorted(k for k in needed if (tenant if k == "tenant" else targets[k]) is None)
    if missing:
        raise ProvisionError("invalid_target", f"a {scope} block needs {' and '.join(missing)}")


def _block_times(starts_at: datetime | None, ends_at: datetime | None, duration_seconds: int | None,
                 now: datetime) -> tuple[datetime, datetime | None]:
    """The block's start (default now) and end (an end, a duration from the start, or none)."""
    starts_at = _aware(starts_at, "start") or now
    if ends_at is not None and duration_seconds is not None:
        raise ProvisionError("invalid_time", "give an end or a duration, not both")
    if duration_seconds is not None:
        if not 0 < duration_seconds <= MAX_SECONDS:
            raise ProvisionError("invalid_time", f"duration must be 1 to {MAX_SECONDS} seconds")
        try:
            ends_at = starts_at + timedelta(seconds=duration_seconds)
        except OverflowError:
            raise ProvisionError("invalid_time", "the end is out of range") from None
    ends_at = _aware(ends_at, "end")
    if ends_at is not None and (ends_at <= starts_at or ends_at <= now):
        raise ProvisionError("invalid_time", "the end must be after the start and in the future")
    return starts_at, ends_at


def _target(session: Session, scope: str, tenant_name: str | None, binding_id: int | None, number: str | None):
    """The tenant a block belongs to, and its X / binding; a named tenant must agree."""
    number_row = binding = None
    if scope == "binding":
        binding = session.get(Binding, binding_id) if 0 < binding_id <= MAX_ID else None
        if binding is None:
            raise NotFound("binding_not_found", f"no binding {binding_id}")
        if binding.status != BindingStatus.ACTIVE:
            raise Conflict("binding_ended", f"binding {binding_id} has ended; block its X or the caller")
        number_row = session.get(VirtualNumber, binding.number_id)
        owner = session.get(Tenant, binding.tenant_id)
    elif scope == "number":
        number_row = session.scalar(select(VirtualNumber).where(VirtualNumber.e164 == number))
        if number_row is None:
            raise NotFound("number_not_found", "that virtual number is in no pool")
        owner = session.get(Tenant, number_row.tenant_id)
    else:
        owner = tenant_row(session, tenant_name)
    if tenant_name is not None and owner.name != tenant_name:
        raise ProvisionError("wrong_tenant", f"that {scope} belongs to another tenant than '{tenant_name}'")
    return owner, number_row, binding


def list_blocks(
    engine: Engine,
    *,
    tenant: str | None = None,
    scope: str | None = None,
    binding_id: int | None = None,
    number: str | None = None,
    caller: str | None = None,
    active: bool = False,
    limit: int = 100,
    region: str = "CN",
    now: datetime | None = None,
) -> list[dict]:
    """Blocks newest first; active=True: only those in force now."""
    now = now or utcnow()
    if scope is not None and scope not in SCOPES:
        raise ProvisionError("invalid_scope", f"scope must be one of {', '.join(SCOPES)}")
    if not 1 <= limit <= 10000:
        raise ProvisionError("invalid_limit", "limit must be 1-10000")
    query = (
        select(Block, Tenant.name, VirtualNumber.e164)
        .join(Tenant, Tenant.id == Block.tenant_id)
        .outerjoin(VirtualNumber, VirtualNumber.id == Block.number_id)
        .order_by(Block.id.desc())
        .limit(limit)
    )
    with Session(engine) as session:
        if tenant is not None:
            query = query.where(Block.tenant_id == tenant_row(session, tenant).id)
        if scope is not None:
            query = query.where(Block.scope == scope)
        if binding_id is not None:
            query = query.where(Block.binding_id == binding_id)
        if number is not None:
            query = query.where(VirtualNumber.e164 == parse_number(number, "virtual number", region))
        if caller is not None:
            query = query.where(Block.caller_hash == number_hash(parse_number(caller, "caller", region)))
        if active:
            query = query.where(Block.starts_at <= now, (Block.ends_at.is_(None)) | (Block.ends_at > now))
        return [block_view(b, name, x, now) for b, name, x in session.execute(query)]


def lift_block(engine: Engine, block_id: int, lifted_by: str, now: datetime | None = None) -> dict:
    """End a block now (kept as evidence, with who lifted it; audited). Calls see it on the next call."""
    now = now or utcnow()
    lifted_by = _text(lifted_by, "lifted by", 100)
    with Session(engine) as session, session.begin():
        block = session.get(Block, block_id, with_for_update=True) if 0 < block_id <= MAX_ID else None
        if block is None:
            raise NotFound("block_not_found", f"no block {block_id}")
        if block.ends_at is not None and block.ends_at <= now:
            raise Conflict("block_ended", f"block {block_id} has ended already")
        block.ends_at = now
        block.lifted_by = lifted_by
        session.flush()
        tenant = session.get(Tenant, block.tenant_id)
        # The lift's record for the regulator's feed (callctl.feed), in the audit chain.
        append(session, lifted_by, "block_lifted", None, {
            "block_id": block.id, "tenant": tenant.name, "scope": block.scope, "direction": block.direction,
            "origin": "automatic" if block.finding_id else "manual", "reason": block.reason,
            "starts_at": block.starts_at.isoformat()}, now)
        number_row = session.get(VirtualNumber, block.number_id) if block.number_id else None
        return block_view(block, tenant.name, number_row.e164 if number_row else None, now)


_FINDING_BLOCKS = """
INSERT INTO blocks (tenant_id, scope, direction, binding_id, reason, created_by, starts_at, ends_at, finding_id)
SELECT f.tenant_id, :scope, :direction, f.binding_id,
       'anomaly finding ' || CAST(f.id AS VARCHAR(20)) || ': ' || f.rule, :created_by, :now,
       COALESCE((SELECT CASE b.profile WHEN 'elderly' THEN :ends_elderly WHEN 'claims' THEN :ends_claims END
                 FROM bindings b WHERE b.id = f.binding_id), :ends_at), f.id
FROM anomaly_findings f
WHERE f.rule = :rule AND f.action = 'block' AND f.tenant_id IN :tenants
  AND f.window_end > COALESCE((SELECT CASE b.profile WHEN 'elderly' THEN :stale_elderly WHEN 'claims' THEN :stale_claims END
                               FROM bindings b WHERE b.id = f.binding_id), :stale_before)
ON CONFLICT (finding_id) DO NOTHING
"""


def place_finding_blocks(conn: Connection, rule: str, scope: str, direction: str, tenant_ids: list[int],
                         now: datetime, lasts: timedelta, factors: dict[str, float]) -> int:
    """The anomaly job's automatic blocks, in its transaction: one per blocking finding of
    `rule` for these tenants (scope: the rule's subject, binding or tenant), lasting
    `lasts` from now (times `factors[profile]` for a binding with a protection profile),
    unless it would already have ended by now. A finding blocks once (unique finding_id),
    however often passes see it."""
    longer = {**{f"ends_{p}": now + lasts * f for p, f in factors.items()},
              **{f"stale_{p}": now - lasts * f for p, f in factors.items()}}
    ends = ("now", "ends_at", "stale_before", *longer)
    statement = text(_FINDING_BLOCKS).bindparams(
        bindparam("tenants", expanding=True), *(bindparam(k, type_=UTCDateTime) for k in ends))
    return conn.execute(statement, {
        "scope": scope, "direction": direction, "created_by": f"anomaly:{rule}", "rule": rule,
        "tenants": tenant_ids, "now": now, "ends_at": now + lasts, "stale_before": now - lasts, **longer,
    }).rowcount
