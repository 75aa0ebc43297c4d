"""Provisioning: tenants, pools, bindings. Used by the CLI (and later the API).

Inputs are validated here, once; every error is a ProvisionError with a stable code
and a message that never repeats a real number.
"""
from __future__ import annotations

import re
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from callctl.core.decision import Mode, known_zone
from callctl.core.numbers import InvalidNumber, mask, to_e164
from callctl.store.models import Binding, Cdr, Tenant, TenantCaller, VirtualNumber, utcnow


class ProvisionError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _number(raw: str, what: str, region: str) -> str:
    try:
        return to_e164(raw, region)
    except InvalidNumber as exc:
        raise ProvisionError("invalid_number", f"{what}: {exc}") from None


def _prefix(raw: str) -> str:
    text = raw.strip()
    if not (text.startswith("+") and text[1:].isdigit() and 2 <= len(text) <= 16):
        raise ProvisionError("invalid_prefix", "caller prefix must be '+' and 1-15 digits")
    return text


_HOURS = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-(([01]\d|2[0-3]):[0-5]\d|24:00)$")


def parse_hours(text: str) -> tuple[str, str]:
    """'08:00-21:00' -> ('08:00', '21:00'). An end before the start crosses midnight
    ('22:00-06:00'); equal ends, or '00:00-24:00', mean all day."""
    if not _HOURS.match((text or "").strip()):
        raise ProvisionError("invalid_hours", "calling hours must be HH:MM-HH:MM, e.g. 08:00-21:00")
    start, end = text.strip().split("-")
    return start, "00:00" if end == "24:00" else end


def _zone(name: str) -> str:
    if not known_zone(name):
        raise ProvisionError("invalid_time_zone", "unknown time zone; use an IANA name, e.g. Asia/Shanghai")
    return name


def _limits(ring_timeout: int | None, max_call_seconds: int | None) -> None:
    if ring_timeout is not None and not 1 <= ring_timeout <= 300:
        raise ProvisionError("invalid_limit", "ring timeout must be 1-300 seconds")
    if max_call_seconds is not None and not 1 <= max_call_seconds <= 86400:
        raise ProvisionError("invalid_limit", "maximum call duration must be 1-86400 seconds")


def _tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        raise ProvisionError("tenant_not_found", f"no tenant named '{name}'")
    return tenant


def tenant_view(session: Session, tenant: Tenant) -> dict:
    callers = session.execute(
        select(TenantCaller.pattern, TenantCaller.is_prefix).where(TenantCaller.tenant_id == tenant.id)
    ).all()
    return {
        "id": tenant.id,
        "name": tenant.name,
        "hotline": tenant.hotline,  # the tenant's own public number, not a customer's
        "strict": tenant.strict,
        "ring_timeout": tenant.ring_timeout,
        "max_call_seconds": tenant.max_call_seconds,
        "time_zone": tenant.time_zone,
        "hours": f"{tenant.calls_from}-{tenant.calls_until}",
        "callers": sorted(p for p, is_prefix in callers if not is_prefix),
        "caller_prefixes": sorted(p for p, is_prefix in callers if is_prefix),
    }


def add_tenant(
    engine: Engine,
    name: str,
    hotline: str,
    *,
    callers: list[str] = (),
    caller_prefixes: list[str] = (),
    strict: bool = True,
    ring_timeout: int = 30,
    max_call_seconds: int = 3600,
    hours: str = "08:00-21:00",
    time_zone: str = "Asia/Shanghai",
    region: str = "CN",
) -> dict:
    if not name or len(name) > 100:
        raise ProvisionError("invalid_name", "tenant name must be 1-100 characters")
    _limits(ring_timeout, max_call_seconds)
    calls_from, calls_until = parse_hours(hours)
    tenant = Tenant(
        name=name,
        hotline=_number(hotline, "hotline", region),
        strict=strict,
        ring_timeout=ring_timeout,
        max_call_seconds=max_call_seconds,
        time_zone=_zone(time_zone),
        calls_from=calls_from,
        calls_until=calls_until,
    )
    patterns = {(_number(c, "caller", region), False) for c in callers}
    patterns |= {(_prefix(p), True) for p in caller_prefixes}
    with Session(engine) as session, session.begin():
        if session.scalar(select(Tenant.id).where(Tenant.name == name)) is not None:
            raise ProvisionError("tenant_exists", f"a tenant named '{name}' exists already")
        session.add(tenant)
        session.flush()
        session.add_all(TenantCaller(tenant_id=tenant.id, pattern=p, is_prefix=f) for p, f in patterns)
        session.flush()
        return tenant_view(session, tenant)


def update_tenant(
    engine: Engine,
    name: str,
    *,
    hours: str | None = None,
    time_zone: str | None = None,
    ring_timeout: int | None = None,
    max_call_seconds: int | None = None,
    strict: bool | None = None,
) -> dict:
    """Change a tenant's policy; omitted settings stay. Calls see it on the next call."""
    _limits(ring_timeout, max_call_seconds)
    changes = {
        "time_zone": _zone(time_zone) if time_zone is not None else None,
        "ring_timeout": ring_timeout,
        "max_call_seconds": max_call_seconds,
        "strict": strict,
    }
    if hours is not None:
        changes["calls_from"], changes["calls_until"] = parse_hours(hours)
    with Session(engine) as session, session.begin():
        tenant = _tenant(session, name)
        for column, value in changes.items():
            if value is not None:
                setattr(tenant, column, value)
        session.flush()
        return tenant_view(session, tenant)


def list_tenants(engine: Engine) -> list[dict]:
    with Session(engine) as session:
        return [tenant_view(session, t) for t in session.scalars(select(Tenant).order_by(Tenant.id))]


def add_numbers(engine: Engine, tenant_name: str, numbers: list[str], region: str = "CN") -> int:
    """Add virtual numbers to a tenant's pool. Numbers already in a pool are an error."""
    wanted = sorted({_number(n, "virtual number", region) for n in numbers})
    with Session(engine) as session, session.begin():
        tenant = _tenant(session, tenant_name)
        taken = session.scalars(select(VirtualNumber.e164).where(VirtualNumber.e164.in_(wanted))).all()
        if taken:
            raise ProvisionError(
                "number_exists", f"{len(taken)} number(s) already in a pool, e.g. {sorted(taken)[0]}"
            )
        session.add_all(VirtualNumber(e164=n, tenant_id=tenant.id) for n in wanted)
    return len(wanted)


def pool_status(engine: Engine, tenant_name: str) -> dict:
    with Session(engine) as session:
        tenant = _tenant(session, tenant_name)
        counts = dict(
            session.execute(
                select(VirtualNumber.state, func.count())
                .where(VirtualNumber.tenant_id == tenant.id)
                .group_by(VirtualNumber.state)
            ).all()
        )
    return {s: counts.get(s, 0) for s in ("free", "bound", "quarantined", "disabled")}


def binding_view(binding: Binding, x: str, tenant_name: str) -> dict:
    return {
        "id": binding.id,
        "tenant": tenant_name,
        "x": x,
        "mode": binding.mode,
        "customer": mask(binding.party_a),
        "other_party": mask(binding.party_b) if binding.party_b else None,
        "extension": binding.extension,
        "reference": binding.reference,
        "status": binding.status,
        "expires_at": binding.expires_at.isoformat() if binding.expires_at else None,
        "created_at": binding.created_at.isoformat() if binding.created_at else None,
        "ended_at": binding.ended_at.isoformat() if binding.ended_at else None,
    }


def bind(
    engine: Engine,
    tenant_name: str,
    customer: str,
    *,
    mode: str = "AXN",
    reference: str | None = None,
    expires_at: datetime | None = None,
    ttl_seconds: int | None = None,
    region: str = "CN",
    now: datetime | None = None,
) -> dict:
    """Bind a free X of the tenant's pool to the customer (AXN)."""
    now = now or utcnow()
    if mode != Mode.AXN:
        raise ProvisionError("unsupported_mode", f"mode {mode} is not available yet; use AXN")
    if expires_at is not None and ttl_seconds is not None:
        raise ProvisionError("invalid_expiry", "give an expiry date or a TTL, not both")
    if ttl_seconds is not None:
        if ttl_seconds <= 0:
            raise ProvisionError("invalid_expiry", "TTL must be a positive number of seconds")
        expires_at = now + timedelta(seconds=ttl_seconds)
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise ProvisionError("invalid_expiry", "expiry needs a time zone, e.g. 2027-01-01T00:00:00+08:00")
        if expires_at <= now:
            raise ProvisionError("invalid_expiry", "expiry is in the past")
    if reference is not None and len(reference) > 100:
        raise ProvisionError("invalid_reference", "reference must be at most 100 characters")
    party_a = _number(customer, "customer", region)
    with Session(engine) as session, session.begin():
        tenant = _tenant(session, tenant_name)
        # SKIP LOCKED: concurrent binds take different numbers instead of queueing.
        number = session.scalar(
            select(VirtualNumber)
            .where(
                VirtualNumber.tenant_id == tenant.id,
                or_(
                    VirtualNumber.state == "free",
                    (VirtualNumber.state == "quarantined") & (VirtualNumber.quarantined_until <= now),
                ),
            )
            .order_by(VirtualNumber.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        if number is None:
            raise ProvisionError("pool_exhausted", f"tenant '{tenant_name}' has no free virtual number")
        number.state = "bound"
        number.quarantined_until = None
        binding = Binding(
            tenant_id=tenant.id,
            number_id=number.id,
            mode=mode,
            party_a=party_a,
            reference=reference,
            expires_at=expires_at,
            created_at=now,
        )
        session.add(binding)
        try:
            session.flush()
        except IntegrityError:
            raise ProvisionError("conflict", "that virtual number was bound concurrently; retry") from None
        return binding_view(binding, number.e164, tenant.name)


def unbind(engine: Engine, binding_id: int, quarantine: timedelta, now: datetime | None = None) -> dict:
    """End a binding and quarantine its X. Calls in progress are not touched (the PBX holds them)."""
    now = now or utcnow()
    with Session(engine) as session, session.begin():
        binding = session.get(Binding, binding_id, with_for_update=True)
        if binding is None:
            raise ProvisionError("binding_not_found", f"no binding {binding_id}")
        if binding.status != "active":
            raise ProvisionError("binding_ended", f"binding {binding_id} has ended already")
        binding.status = "ended"
        binding.ended_at = now
        number = session.get(VirtualNumber, binding.number_id, with_for_update=True)
        still_used = session.scalar(
            select(func.count()).where(
                Binding.number_id == number.id, Binding.status == "active", Binding.id != binding.id
            )
        )
        if not still_used:
            number.state = "quarantined"
            number.quarantined_until = now + quarantine
        tenant = session.get(Tenant, binding.tenant_id)
        session.flush()
        return binding_view(binding, number.e164, tenant.name)


CDR_COLUMNS = (
    "id", "call_id", "tenant_id", "binding_id", "virtual_number", "direction",
    "caller_masked", "callee_masked", "decision", "reject_reason", "started_at",
    "answered_at", "ended_at", "ring_seconds", "talk_seconds", "dial_status",
    "hangup_cause", "node",
)


def list_cdrs(engine: Engine, limit: int = 50, tenant_name: str | None = None) -> list[dict]:
    """Newest CDRs first, as plain dicts (numbers are stored masked already)."""
    with Session(engine) as session:
        query = select(Cdr).order_by(Cdr.started_at.desc(), Cdr.id.desc()).limit(limit)
        if tenant_name:
            query = query.where(Cdr.tenant_id == _tenant(session, tenant_name).id)
        rows = session.scalars(query).all()
        return [
            {c: (v.isoformat() if isinstance(v, datetime) else v)
             for c in CDR_COLUMNS for v in [getattr(row, c)]}
            for row in rows
        ]
