"""Call-time queries: the facts for one decision, and the CDR write.

One indexed query per call (one database round trip); nothing is cached, so a block
or an unbind is seen by every daemon on the very next call. The daemon on PostgreSQL
runs these same statements on its event loop (callctl.store.pgcalls).
"""
from __future__ import annotations

from datetime import datetime, time

from sqlalchemy import String, and_, bindparam, exists, or_, select, true
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from callctl.core.decision import BindingFacts, BlockFacts, Mode, NumberFacts, TenantFacts
from callctl.store.crypto import number_hash
from callctl.store.db import READ_ONLY
from callctl.store.models import Binding, Block, Cdr, Tenant, TenantCaller, VirtualNumber


def _facts_statement(by_extension: bool):
    """X's number and tenant, its active bindings and the blocks in force on them, as
    one row per (binding, block) pair: blocks are rare, so mostly one row per binding.

    Statements are built once: constructing them per call cost more than running them.
    A NULL caller (anonymous) matches no agent pattern and no caller block."""
    caller = bindparam("caller", type_=String)
    now = bindparam("now", type_=Block.starts_at.type)
    agent = exists().where(
        TenantCaller.tenant_id == Tenant.id,
        or_(
            TenantCaller.pattern == caller,
            and_(TenantCaller.is_prefix, caller.like(TenantCaller.pattern + "%")),
        ),
    )
    binding_on = and_(
        Binding.number_id == VirtualNumber.id,
        Binding.status == "active",
        VirtualNumber.state == "bound",
        # AXE, once the caller keyed an extension: only that binding (X may hold 10^k).
        Binding.extension == bindparam("extension") if by_extension else true(),
    )
    block_on = and_(
        Binding.id.is_not(None),  # no binding, no decision a block could change
        Block.tenant_id == Tenant.id,
        Block.starts_at <= now,
        or_(Block.ends_at.is_(None), Block.ends_at > now),
        or_(
            Block.scope == "tenant",
            and_(Block.scope == "number", Block.number_id == VirtualNumber.id),
            and_(Block.scope == "binding", Block.binding_id == Binding.id),
            # Caller blocks hold a (maybe customer's) number encrypted: found by its hash.
            and_(Block.scope == "caller", Block.caller_hash == bindparam("caller_hash", type_=String)),
        ),
    )
    return (
        select(
            VirtualNumber.state, Tenant.id, Tenant.hotline, Tenant.strict, Tenant.ring_timeout,
            Tenant.max_call_seconds, Tenant.time_zone, Tenant.calls_from, Tenant.calls_until,
            agent.label("agent"),
            Binding.id.label("binding_id"), Binding.mode, Binding.party_a, Binding.party_b,
            Binding.extension, Binding.expires_at,
            Block.id.label("block_id"), Block.scope, Block.direction,
            Block.binding_id.label("block_binding_id"), Block.caller, Block.starts_at, Block.ends_at,
        )
        .join(Tenant, Tenant.id == VirtualNumber.tenant_id)
        .outerjoin(Binding, binding_on)
        .outerjoin(Block, block_on)
        .where(VirtualNumber.e164 == bindparam("x"))
        .order_by(Binding.id, Block.id)
    )


_FACTS = _facts_statement(by_extension=False)
_FACTS_BY_EXTENSION = _facts_statement(by_extension=True)


def call_facts(
    engine: Engine, x: str, caller: str | None, now: datetime, extension: str | None = None
) -> NumberFacts | None:
    """Everything the decision needs about a call to X from caller, or None if X is not ours.

    With an extension (AXE, second request) only the bindings holding it are read."""
    params = facts_params(x, caller, now, extension)
    with engine.connect() as conn:
        conn.execution_options(**READ_ONLY)
        rows = conn.execute(_FACTS if extension is None else _FACTS_BY_EXTENSION, params).all()
    return facts_from_rows(x, rows)


def facts_params(x: str, caller: str | None, now: datetime, extension: str | None) -> dict:
    params = {"x": x, "caller": caller, "now": now, "caller_hash": number_hash(caller) if caller else None}
    if extension is not None:
        params["extension"] = extension
    return params


def facts_from_rows(x: str, rows) -> NumberFacts | None:
    """The facts statement's rows (named like its columns) as NumberFacts."""
    if not rows:
        return None
    first = rows[0]
    tenant = TenantFacts(first.id, first.hotline, bool(first.agent), bool(first.strict), first.ring_timeout,
                         first.max_call_seconds, first.time_zone,
                         time.fromisoformat(first.calls_from), time.fromisoformat(first.calls_until))
    # dicts keep the query's order and drop the repeats the join makes.
    bindings = {r.binding_id: BindingFacts(r.binding_id, Mode(r.mode), r.party_a, r.party_b, r.extension,
                                           r.expires_at)
                for r in rows if r.binding_id is not None}
    blocks = {r.block_id: BlockFacts(r.scope, r.direction, r.block_binding_id, r.caller, r.starts_at, r.ends_at)
              for r in rows if r.block_id is not None}
    return NumberFacts(x=x, tenant=tenant, bindings=tuple(bindings.values()), blocks=tuple(blocks.values()))


# Built once, like the reads above. No conflict target: on PostgreSQL the CDR table is
# partitioned by day and its unique key is (call_id, started_at); started_at of a call
# never changes between a first write, a spool replay or a PBX retry (service.cdr_row).
_CDR_INSERT = {
    # (the daemon compiles this one for its event loop: callctl.store.pgcalls)
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
