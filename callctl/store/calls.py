"""Call-time queries: the facts for one decision, and the CDR write.

Three short indexed queries per call; nothing is cached, so a block or an unbind is
seen by every daemon on the very next call.
"""
from __future__ import annotations

from datetime import datetime, time

from sqlalchemy import String, and_, bindparam, exists, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from callctl.core.decision import BindingFacts, BlockFacts, Mode, NumberFacts, TenantFacts
from callctl.store.crypto import number_hash
from callctl.store.db import READ_ONLY
from callctl.store.models import Binding, Block, Cdr, Tenant, TenantCaller, VirtualNumber


# Statements are built once: constructing them per call cost more than running them.
# A NULL caller (anonymous) matches no agent pattern and no caller block.
_CALLER = bindparam("caller", type_=String)

_NUMBER = (
    select(
        VirtualNumber.id,
        VirtualNumber.state,
        Tenant.id,
        Tenant.hotline,
        Tenant.strict,
        Tenant.ring_timeout,
        Tenant.max_call_seconds,
        Tenant.time_zone,
        Tenant.calls_from,
        Tenant.calls_until,
        exists().where(
            TenantCaller.tenant_id == Tenant.id,
            or_(
                TenantCaller.pattern == _CALLER,
                and_(TenantCaller.is_prefix, _CALLER.like(TenantCaller.pattern + "%")),
            ),
        ).label("agent"),
    )
    .join(Tenant, Tenant.id == VirtualNumber.tenant_id)
    .where(VirtualNumber.e164 == bindparam("x"))
)

_BINDINGS = (
    select(Binding.id, Binding.mode, Binding.party_a, Binding.party_b, Binding.extension, Binding.expires_at)
    .where(Binding.number_id == bindparam("number_id"), Binding.status == "active")
    .order_by(Binding.id)
)

# AXE, once the caller keyed an extension: only that binding (X may hold 10^k of them).
_BINDINGS_BY_EXTENSION = _BINDINGS.where(Binding.extension == bindparam("extension"))

_BLOCKS = select(
    Block.scope, Block.direction, Block.binding_id, Block.caller, Block.starts_at, Block.ends_at
).where(
    Block.tenant_id == bindparam("tenant_id"),
    Block.starts_at <= bindparam("now"),
    or_(Block.ends_at.is_(None), Block.ends_at > bindparam("now")),
    or_(
        Block.scope == "tenant",
        and_(Block.scope == "number", Block.number_id == bindparam("number_id")),
        and_(Block.scope == "binding", Block.binding_id.in_(bindparam("binding_ids", expanding=True))),
        # Caller blocks hold a (maybe customer's) number encrypted: found by its hash.
        and_(Block.scope == "caller", Block.caller_hash == bindparam("caller_hash", type_=String)),
    ),
)


def call_facts(
    engine: Engine, x: str, caller: str | None, now: datetime, extension: str | None = None
) -> NumberFacts | None:
    """Everything the decision needs about a call to X from caller, or None if X is not ours.

    With an extension (AXE, second request) only the bindings holding it are read."""
    with engine.connect() as conn:
        conn.execution_options(**READ_ONLY)
        row = conn.execute(_NUMBER, {"x": x, "caller": caller}).first()
        if row is None:
            return None
        number_id, state, tenant_id, hotline, strict, ring, max_seconds, zone, calls_from, calls_until, agent = row
        tenant = TenantFacts(tenant_id, hotline, bool(agent), bool(strict), ring, max_seconds,
                             zone, time.fromisoformat(calls_from), time.fromisoformat(calls_until))
        if state != "bound":
            return NumberFacts(x=x, tenant=tenant)
        bindings = tuple(
            BindingFacts(r.id, Mode(r.mode), r.party_a, r.party_b, r.extension, r.expires_at)
            for r in (
                conn.execute(_BINDINGS, {"number_id": number_id}) if extension is None
                else conn.execute(_BINDINGS_BY_EXTENSION, {"number_id": number_id, "extension": extension})
            )
        )
        if not bindings:
            return NumberFacts(x=x, tenant=tenant)
        blocks = tuple(
            BlockFacts(r.scope, r.direction, r.binding_id, r.caller, r.starts_at, r.ends_at)
            for r in conn.execute(_BLOCKS, {
                "tenant_id": tenant_id, "now": now, "number_id": number_id,
                "caller_hash": number_hash(caller) if caller else None,
                "binding_ids": [b.id for b in bindings],
            })
        )
    return NumberFacts(x=x, tenant=tenant, bindings=bindings, blocks=blocks)


# Built once, like the reads above. No conflict target: on PostgreSQL the CDR table is
# partitioned by day and its unique key is (call_id, started_at); started_at of a call
# never changes between a first write, a spool replay or a PBX retry (service.cdr_row).
_CDR_INSERT = {
    "postgresql": postgresql.insert(Cdr.__table__).on_conflict_do_nothing(),
    "sqlite": sqlite.insert(Cdr.__table__).on_conflict_do_nothing(),
}


def write_cdr(engine: Engine, row: dict) -> bool:
    """Insert one CDR; a second write of the same call changes nothing. True if new."""
    return write_cdrs(engine, [row]) == 1


def write_cdrs(engine: Engine, rows: list[dict]) -> int:
    """Insert CDRs in one transaction (all or none); returns how many were new."""
    insert = _CDR_INSERT[engine.dialect.name]
    with engine.begin() as conn:
        return sum(conn.execute(insert, row).rowcount for row in rows)
