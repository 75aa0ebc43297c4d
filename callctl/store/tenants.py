"""Tenants: their rows and views, add and update (policy, calling hours, limits), and
their callers (agents' numbers and prefixes, grouped by purpose)."""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from callctl.errors import Conflict, NotFound, ProvisionError
from callctl.store.inputs import check_limits, parse_hours, parse_number, parse_prefix, parse_purpose, parse_zone
from callctl.store.models import Tenant, TenantCaller


def tenant_row(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        raise NotFound("tenant_not_found", f"no tenant named '{name}'")
    return tenant


def tenant_id_of(engine: Engine, tenant_name: str) -> int:
    with Session(engine) as session:
        return tenant_row(session, tenant_name).id


def tenant_view(session: Session, tenant: Tenant) -> dict:
    callers = session.execute(
        select(TenantCaller.pattern, TenantCaller.is_prefix, TenantCaller.purpose)
        .where(TenantCaller.tenant_id == tenant.id)
    ).all()
    groups: dict[str, list[str]] = {}
    for pattern, _, purpose in sorted(callers):
        groups.setdefault(purpose, []).append(pattern)
    return {
        "id": tenant.id,
        "name": tenant.name,
        "hotline": tenant.hotline,  # the tenant's own public number, not a customer's
        "strict": tenant.strict,
        "ring_timeout": tenant.ring_timeout,
        "max_call_seconds": tenant.max_call_seconds,
        "max_concurrent_calls": tenant.max_concurrent_calls,
        "time_zone": tenant.time_zone,
        "hours": f"{tenant.calls_from}-{tenant.calls_until}",
        "callers": sorted(p for p, is_prefix, _ in callers if not is_prefix),
        "caller_prefixes": sorted(p for p, is_prefix, _ in callers if is_prefix),
        "caller_groups": groups,  # purpose -> numbers and prefixes
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
    check_limits(ring_timeout, max_call_seconds)
    calls_from, calls_until = parse_hours(hours)
    tenant = Tenant(
        name=name,
        hotline=parse_number(hotline, "hotline", region),
        strict=strict,
        ring_timeout=ring_timeout,
        max_call_seconds=max_call_seconds,
        time_zone=parse_zone(time_zone),
        calls_from=calls_from,
        calls_until=calls_until,
    )
    patterns = {(parse_number(c, "caller", region), False) for c in callers}
    patterns |= {(parse_prefix(p), True) for p in caller_prefixes}
    with Session(engine) as session, session.begin():
        if session.scalar(select(Tenant.id).where(Tenant.name == name)) is not None:
            raise Conflict("tenant_exists", f"a tenant named '{name}' exists already")
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
    max_concurrent_calls: int | None = None,
) -> dict:
    """Change a tenant's policy; omitted settings stay. Calls see it on the next call.
    max_concurrent_calls 0 removes the limit."""
    check_limits(ring_timeout, max_call_seconds)
    if max_concurrent_calls is not None and not 0 <= max_concurrent_calls <= 100000:
        raise ProvisionError("invalid_limit", "concurrent calls must be 0 (no limit) to 100000")
    changes = {
        "time_zone": parse_zone(time_zone) if time_zone is not None else None,
        "ring_timeout": ring_timeout,
        "max_call_seconds": max_call_seconds,
        "strict": strict,
    }
    if hours is not None:
        changes["calls_from"], changes["calls_until"] = parse_hours(hours)
    with Session(engine) as session, session.begin():
        tenant = tenant_row(session, name)
        for column, value in changes.items():
            if value is not None:
                setattr(tenant, column, value)
        if max_concurrent_calls is not None:
            tenant.max_concurrent_calls = max_concurrent_calls or None
        session.flush()
        return tenant_view(session, tenant)


def list_tenants(engine: Engine) -> list[dict]:
    with Session(engine) as session:
        return [tenant_view(session, t) for t in session.scalars(select(Tenant).order_by(Tenant.id))]


def add_callers(engine: Engine, tenant_name: str, *, callers: list[str] = (), caller_prefixes: list[str] = (),
                purpose: str = "service", region: str = "CN") -> dict:
    """Add agents' numbers or prefixes to the tenant, in the caller group of `purpose`;
    ones it has already move to that group."""
    purpose = parse_purpose(purpose)
    patterns = {parse_number(c, "caller", region): False for c in callers}
    patterns |= {parse_prefix(p): True for p in caller_prefixes}
    if not patterns:
        raise ProvisionError("missing_callers", "give --caller or --caller-prefix")
    with Session(engine) as session, session.begin():
        tenant = tenant_row(session, tenant_name)
        known = {c.pattern: c for c in session.scalars(select(TenantCaller).where(TenantCaller.tenant_id == tenant.id))}
        for pattern, is_prefix in patterns.items():
            row = known.get(pattern) or TenantCaller(tenant_id=tenant.id, pattern=pattern, is_prefix=is_prefix)
            row.purpose = purpose
            session.add(row)
        session.flush()
        return tenant_view(session, tenant)
