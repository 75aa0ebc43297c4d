"""Call-time queries: the facts for one decision, and the CDR write.

One indexed query per call (one database round trip); nothing is cached, so a block
or an unbind is seen by every daemon on the very next call. The daemon on PostgreSQL
runs these same statements on its event loop (callctl.store.pgcalls).
"""
from __future__ import annotations

from datetime import datetime, time, timedelta, timezone

from sqlalchemy import (
    ARRAY, String, and_, bindparam, case, cast, column, exists, func, literal_column, null, or_, select, true, union_all,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import aliased

from callctl.core.decision import BindingFacts, BlockFacts, Mode, NumberFacts, TenantFacts
from callctl.core.enums import BlockScope
from callctl.core.numbers import mask
from callctl.store.crypto import number_hash
from callctl.store.db import READ_ONLY
from callctl.store.events import PG_CALL_EVENT, PG_CALL_EVENTS, call_event, write_call_event
from callctl.store.prepared import Compiled, execute
from callctl.store.models import BlacklistEntry, Binding, Block, Cdr, CustomerPreference, Tenant, TenantCaller, VirtualNumber


# Constants written into the SQL, not sent as parameters: a prepared statement's generic
# plan can then use the partial indexes (WHERE status = 'active' AND mode = ...).
_ACTIVE, _BOUND = literal_column("'active'"), literal_column("'bound'")
_AXN, _AXE = literal_column("'AXN'"), literal_column("'AXE'")


def _facts_statement(by_extension: bool):
    """X's number and tenant, what X serves, the caller's bindings on X, the blocks in
    force and whether the caller is blacklisted, as one row per (binding, block) pair:
    blocks are rare, so mostly one row per binding, and one row when the caller has none.

    Bounded by the caller, not by X: an AXB or AXE X may carry 10^k bindings, of which
    the caller is a party to one or two. The bindings read are X's AXN binding (an AXN
    X has one), the AXB/AXE bindings with the caller as a party (found by the parties'
    lookup hashes) or, once an AXE caller keyed an extension, that extension's binding;
    each branch is one index lookup (sql/*/0070). Of X itself, index probes that read
    no binding's numbers give the mode X serves (NULL: no active binding) and the width
    of its AXE extensions (the longest).

    Statements are built once: constructing them per call cost more than running them.
    A NULL caller (anonymous) matches no agent pattern, no party and no caller block."""
    x = bindparam("x", type_=String)
    caller = bindparam("caller", type_=String)
    caller_hash = bindparam("caller_hash", type_=String)
    now = bindparam("now", type_=Block.starts_at.type)
    one = literal_column("1")  # LIMIT 1 in the SQL text, not a parameter a plan must allow for
    # The agent's purpose (its caller group's), NULL when the caller is no agent: an
    # exact number before a prefix, a longer prefix before a shorter one.
    purpose = (
        select(TenantCaller.purpose)
        .where(
            TenantCaller.tenant_id == Tenant.id,
            or_(
                TenantCaller.pattern == caller,
                and_(TenantCaller.is_prefix, caller.like(TenantCaller.pattern + "%")),
            ),
        )
        .order_by(TenantCaller.is_prefix, func.length(TenantCaller.pattern).desc())
        .limit(one)
        .scalar_subquery()
    )
    # Each read once per call (CTEs, used several times): X's id, NULL when X is not ours
    # or not bound; and one active binding on X, which tells X's mode (an X never mixes
    # modes, allocation.claim) and is an AXN X's binding (it has one).
    x_row = select(VirtualNumber.id).where(VirtualNumber.e164 == x, VirtualNumber.state == _BOUND).cte("x")
    x_id = select(x_row.c.id).scalar_subquery()
    columns = (Binding.id, Binding.mode, Binding.party_a, Binding.party_b, Binding.extension, Binding.expires_at,
               Binding.purposes, Binding.profile, Binding.party_a_hash)
    first = select(*columns).where(Binding.number_id == x_id, Binding.status == _ACTIVE).limit(one).cte("first_on_x")
    x_mode = select(first.c.mode).scalar_subquery()
    # The prompt asks for as many digits as X's longest extension (NULL unless AXE). Not
    # gated on the mode: SQLite would test the gate on every binding of X, not once.
    probe = aliased(Binding)
    width = func.length(probe.extension)
    x_width = (select(width).where(probe.number_id == x_id, probe.status == _ACTIVE)
               .order_by(width.desc()).limit(one).scalar_subquery())

    def bindings(*where):
        return select(*columns).where(Binding.number_id == x_id, Binding.status == _ACTIVE, *where)

    if by_extension:
        mine = bindings(Binding.mode == _AXE, Binding.extension == bindparam("extension"))
    else:
        mine = union_all(
            select(first).where(first.c.mode == _AXN),  # an AXN X has that one binding
            # AXB, AXE: the caller's, by its lookup hash (not looked up on an AXN X).
            *(bindings(party == caller_hash, x_mode != _AXN)
              for party in (Binding.party_a_hash, Binding.party_b_hash)),
        )
    mine = mine.subquery("mine")
    block_on = and_(
        x_mode.is_not(None),  # no binding on X, no decision a block could change
        Block.tenant_id == Tenant.id,
        Block.starts_at <= now,
        or_(Block.ends_at.is_(None), Block.ends_at > now),
        or_(
            Block.scope == BlockScope.TENANT,
            and_(Block.scope == BlockScope.NUMBER, Block.number_id == VirtualNumber.id),
            and_(Block.scope == BlockScope.BINDING, Block.binding_id == mine.c.id),
            # Caller blocks hold a (maybe customer's) number encrypted: found by its hash.
            and_(Block.scope == BlockScope.CALLER, Block.caller_hash == caller_hash),
        ),
    )
    # The customer's word on this tenant: one unique-index probe per binding (0090).
    pref_on = and_(CustomerPreference.customer_hash == mine.c.party_a_hash, CustomerPreference.tenant_id == Tenant.id)
    # The shared blacklist, by the caller's lookup hash: one probe of ix_blacklist_caller.
    blacklisted = exists().where(
        BlacklistEntry.caller_hash == caller_hash, BlacklistEntry.status == _ACTIVE,
        BlacklistEntry.starts_at <= now, or_(BlacklistEntry.ends_at.is_(None), BlacklistEntry.ends_at > now),
    )
    return (
        select(
            VirtualNumber.state, Tenant.id, Tenant.hotline, Tenant.strict, Tenant.ring_timeout,
            Tenant.max_call_seconds, Tenant.time_zone, Tenant.calls_from, Tenant.calls_until,
            Tenant.max_concurrent_calls, purpose.label("caller_purpose"), blacklisted.label("blacklisted"),
            x_mode.label("x_mode"), x_width.label("x_extension_digits"),
            mine.c.id.label("binding_id"), mine.c.mode, mine.c.party_a, mine.c.party_b,
            mine.c.extension, mine.c.expires_at, mine.c.purposes, mine.c.profile,
            CustomerPreference.calls, CustomerPreference.quiet_from, CustomerPreference.quiet_until,
            Block.id.label("block_id"), Block.scope, Block.direction,
            Block.binding_id.label("block_binding_id"), Block.caller, Block.starts_at, Block.ends_at,
        )
        .join(Tenant, Tenant.id == VirtualNumber.tenant_id)
        .outerjoin(mine, true())
        .outerjoin(CustomerPreference, pref_on)
        .outerjoin(Block, block_on)
        .where(VirtualNumber.e164 == x)
        .order_by(mine.c.id, Block.id)
    )


_FACTS = _facts_statement(by_extension=False)
_FACTS_BY_EXTENSION = _facts_statement(by_extension=True)
FACTS_COMPILED, FACTS_BY_EXTENSION_COMPILED = Compiled(_FACTS), Compiled(_FACTS_BY_EXTENSION)  # PostgreSQL


def call_facts(
    engine: Engine, x: str, caller: str | None, now: datetime, extension: str | None = None
) -> NumberFacts | None:
    """Everything the decision needs about a call to X from caller, or None if X is not ours.

    The bindings read are X's AXN binding or the caller's on X (_facts_statement); with
    an extension (AXE, second request), the binding holding it."""
    params = facts_params(x, caller, now, extension)
    with engine.connect() as conn:
        conn.execution_options(**READ_ONLY)
        if engine.dialect.name == "postgresql":
            statement = FACTS_COMPILED if extension is None else FACTS_BY_EXTENSION_COMPILED
            rows = statement.rows(execute(conn, statement, statement.args(params), read_only=True))
        else:
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
    tenant = TenantFacts(first.id, first.hotline, first.caller_purpose is not None, bool(first.strict),
                         first.ring_timeout, first.max_call_seconds, first.time_zone,
                         time.fromisoformat(first.calls_from), time.fromisoformat(first.calls_until),
                         caller_purpose=first.caller_purpose, max_concurrent_calls=first.max_concurrent_calls)
    # dicts keep the query's order and drop the repeats the join makes.
    bindings = {r.binding_id: BindingFacts(r.binding_id, Mode(r.mode), r.party_a, r.party_b, r.extension,
                                           r.expires_at, _purposes(r.purposes), r.calls,
                                           _quiet(r.quiet_from, r.quiet_until), r.profile)
                for r in rows if r.binding_id is not None}
    blocks = {r.block_id: BlockFacts(r.scope, r.direction, r.block_binding_id, r.caller, r.starts_at, r.ends_at)
              for r in rows if r.block_id is not None}
    return NumberFacts(x=x, tenant=tenant, bindings=tuple(bindings.values()), blocks=tuple(blocks.values()),
                       mode=Mode(first.x_mode) if first.x_mode else None,
                       extension_digits=first.x_extension_digits or 0, blacklisted=bool(first.blacklisted))


# One CDR per call: a call is its PBX call id and node, whatever else a report says. On
# PostgreSQL the CDR table is partitioned by day on started_at and a unique key must hold
# it, so the key (call_id, started_at) only catches a report repeated exactly (a spool
# replay, a write that timed out and was spooled). A report of the same call with another
# start is caught by looking first, in the same statement: the index on (call_id,
# started_at) finds an earlier CDR of the call within CDR_WINDOW of this one's start, a
# few partitions at most. service.cdr_row keeps every start of one call inside that
# window (the Asterisk uniqueid carries the channel's creation time).
CDR_WINDOW = timedelta(days=2)
_CDR_INSERTS: dict[tuple, object] = {}


def cdr_insert(dialect: str, keys: tuple[str, ...], many: bool = False):
    """The INSERT of one CDR with these columns (built once per dialect and key set).

    Also masks X unless it is one of our pool's numbers (a call to an unknown X may
    carry a person's number there), and keeps a tenant or binding id only if it is one
    (an id field may hold any digits, a phone number too). Its parameters: cdr_params(row).

    many=True (PostgreSQL): the same INSERT of many CDRs in one statement, each
    parameter an array of the rows' values, read back as rows with unnest(); the
    statement must not hold two rows of one call (the check for an earlier CDR of the
    call cannot see a row of its own statement)."""
    statement = _CDR_INSERTS.get((dialect, keys, many))
    if statement is not None:
        return statement
    table = Cdr.__table__
    # Texts as text, not varchar(n): a cast to varchar(n) cuts a longer value short
    # silently, where the column refuses it.
    types = {key: String() if isinstance(table.c[key].type, String) else table.c[key].type for key in keys} | {
        "window_from": table.c.started_at.type, "window_to": table.c.started_at.type,
        "virtual_number_masked": String()}
    if many:
        rows = func.unnest(*(bindparam(name, type_=ARRAY(type_)) for name, type_ in types.items())) \
            .table_valued(*(column(name, type_) for name, type_ in types.items())).render_derived(name="r")

        def param(name, type_):
            return rows.c[name]
    else:
        def param(name, type_):
            value = bindparam(name, type_=type_)
            # PostgreSQL types the parameters of INSERT ... SELECT as text unless told
            # (SQLite's CAST AS DATETIME would make a number of the text).
            return cast(value, type_) if dialect == "postgresql" else value

    values = {key: param(key, types[key]) for key in keys}
    if "virtual_number" in values:
        x = values["virtual_number"]
        values["virtual_number"] = case((exists().where(VirtualNumber.e164 == x), x),
                                        else_=param("virtual_number_masked", types["virtual_number_masked"]))
    for key, model in (("tenant_id", Tenant), ("binding_id", Binding)):
        if key in values:
            values[key] = select(model.id).where(model.id == values[key]).scalar_subquery()
    earlier = table.alias("earlier")
    node = values.get("node", null())
    same_call = exists().where(
        earlier.c.call_id == values["call_id"], earlier.c.node.is_not_distinct_from(node),
        earlier.c.started_at >= param("window_from", types["window_from"]),
        earlier.c.started_at <= param("window_to", types["window_to"]),
    )
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    source = select(*values.values()).where(~same_call)
    statement = insert(table).from_select(list(keys), source.select_from(rows) if many else source)
    statement = _CDR_INSERTS[(dialect, keys, many)] = statement.on_conflict_do_nothing()
    return statement


def cdr_params(row: dict) -> dict:
    started = row.get("started_at")
    if not isinstance(started, datetime):  # a broken row: the database refuses it
        return {**row, "window_from": None, "window_to": None, "virtual_number_masked": None}
    return {**row, "window_from": started - CDR_WINDOW, "window_to": started + CDR_WINDOW,
            "virtual_number_masked": mask(row.get("virtual_number")) or None}


def _purposes(text: str | None) -> frozenset[str] | None:
    return None if text is None else frozenset(p for p in text.split(",") if p)


def _quiet(start: str | None, end: str | None) -> tuple[time, time] | None:
    return None if not (start and end) else (time.fromisoformat(start), time.fromisoformat(end))


def write_cdr(engine: Engine, row: dict) -> bool:
    """Insert one CDR; a second write of the same call changes nothing. True if new."""
    return write_cdrs(engine, [row]) == 1


def write_cdrs(engine: Engine, rows: list[dict]) -> int:
    """Insert CDRs in one transaction (all or none), each new one with its event for the
    tenant's webhooks (callctl.store.events); returns how many were new."""
    dialect = engine.dialect.name
    now = datetime.now(timezone.utc)
    new = 0
    with engine.begin() as conn:
        for row in rows:
            if dialect == "postgresql":  # prepared, the event in the same statement
                statement = cdr_with_event(tuple(row))
                new += execute(conn, statement, cdr_with_event_args(statement, row, now))[0][0]
            elif conn.execute(cdr_insert(dialect, tuple(row)), cdr_params(row)).rowcount:
                new += 1
                write_call_event(conn, row, now)
    return new


_WITH_EVENTS: dict[tuple, Compiled] = {}


def cdr_with_event(keys: tuple[str, ...], many: bool = False) -> Compiled:
    """PostgreSQL: the CDR insert (many=True: of many CDRs, cdr_insert) and the event of
    each new CDR for the tenant's webhooks in one statement (events.PG_CALL_EVENT(S)),
    compiled once per key set. Its arguments: cdr_with_event_args or cdrs_with_events_args."""
    statement = _WITH_EVENTS.get((keys, many))
    if statement is None:
        statement = _WITH_EVENTS[(keys, many)] = Compiled(cdr_insert("postgresql", keys, many))
        n = len(statement.keys)
        statement.sql = (PG_CALL_EVENTS if many else PG_CALL_EVENT).format(
            insert=statement.sql, k=n + 1, n=n + 2, b=n + 3, c=n + 4, d=n + 5)
    return statement


def cdr_with_event_args(statement: Compiled, row: dict, now: datetime) -> list:
    kind, body = call_event(row) or (None, None)
    return statement.args(cdr_params(row)) + [kind, now, body]


def cdrs_with_events_args(statement: Compiled, rows: list[dict], now: datetime) -> list:
    params = [cdr_params(row) for row in rows]
    events = [call_event(row) or (None, None) for row in rows]
    return statement.args({key: [p[key] for p in params] for key in statement.keys}) + [
        [kind for kind, _ in events], now, [body for _, body in events],
        [row.get("call_id") for row in rows], [row.get("node") for row in rows]]
