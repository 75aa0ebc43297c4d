"""Allocation: pick and row-lock an X (and an AXE extension) for a new binding, and the
free (or quarantined) -> bound transition. bind uses `bind_fresh_x` (AXN on PostgreSQL:
one statement) and `allocate` (every mode, every database); bulk's AXN batches use
`bound_columns` and the same lock settings."""
from __future__ import annotations

import functools
import secrets
from datetime import datetime

from sqlalchemy import and_, bindparam, exists, func, insert, null, or_, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from callctl.core.decision import Mode
from callctl.core.enums import BindingStatus, NumberState
from callctl.errors import Conflict, Unavailable
from callctl.store import prepared
from callctl.store.crypto import number_hash
from callctl.store.db import single_statement
from callctl.store.models import Binding, Tenant, VirtualNumber

LOCK_WAIT_SECONDS = 5  # the second allocation pass waits at most this long for a row lock
ALLOCATION_ROUNDS = 50  # looks for an X before `pool_busy` (each round follows a change by another writer)


def has_party(parties: list[str]):
    """SQL: the binding has one of these numbers as a party. Parties are stored
    encrypted: compared by their keyed lookup hashes (docs/keys.md)."""
    hashes = [number_hash(p) for p in parties]
    return or_(Binding.party_a_hash.in_(hashes), Binding.party_b_hash.in_(hashes))


def parties_on(session: Session, number_id: int, parties: list[str], except_id: int | None = None) -> bool:
    """Whether an active binding on X, other than except_id, has one of these parties."""
    query = select(Binding.id).where(Binding.number_id == number_id, Binding.status == BindingStatus.ACTIVE,
                                     has_party(parties))
    if except_id is not None:
        query = query.where(Binding.id != except_id)
    return session.scalar(query.limit(1)) is not None


def allocate(session: Session, tenant_id: int, mode: str, pair: tuple[str, str | None],
             extension_digits: int, now: datetime) -> tuple[VirtualNumber, str | None]:
    """Pick and row-lock an X (and an AXE extension) for a new binding.

    Every binding is created while its X row is locked (PostgreSQL: FOR UPDATE;
    SQLite: the write lock taken at BEGIN IMMEDIATE), so the checks made after the lock
    see every committed binding on that X. Deadlock-free and exact on PostgreSQL:
    - an X is locked inside a savepoint; one that cannot take the binding after all is
      let go at once (rollback to the savepoint releases its row lock), so a writer
      holds at most the one X it takes, and waits only while it holds none;
    - the first look skips rows others hold (SKIP LOCKED: parallel binds take different
      numbers instead of queueing); if it finds nothing, the second waits (at most
      LOCK_WAIT_SECONDS) for a row others hold, whatever it has become meanwhile (a free
      X another writer just bound AXE can take this AXE binding too);
    - `pool_exhausted` only when, after that, no X of the pool could take it.
    """
    capacity = 10 ** extension_digits
    parties = [p for p in pair if p]
    candidates = _candidates(mode, parties, capacity, now)
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_WAIT_SECONDS}s'"))
    tried: set[int] = set()  # X turned down under their lock
    for _ in range(ALLOCATION_ROUNDS):
        for wait in (False, True):
            query = select(VirtualNumber).where(VirtualNumber.id == _first(tenant_id, candidates, tried, wait))
            number, extension = _take_first(session, query, mode, parties, capacity, extension_digits)
            if extension is not False:
                return number, extension
            if number is not None:
                tried.add(number.id)
                break  # look again from the first candidate
        else:
            # Neither look found an X. A row that changed while we waited for it is not
            # returned (e.g. free -> bound AXE): whether anything can still take the
            # binding is asked afresh, and only "nothing" is exhaustion.
            if session.scalar(_untried(select(VirtualNumber.id), tenant_id, candidates, tried).limit(1)) is None:
                raise Conflict("pool_exhausted", f"no virtual number in the pool can take this {mode} binding")
    raise Unavailable("pool_busy", "the pool is busy; retry")


def bind_fresh_x(engine: Engine, tenant_name: str, binding: Binding, now: datetime) -> str | None:
    """PostgreSQL, AXN: claim an X and insert `binding` on it in one statement, a
    transaction of its own (one round trip). The X is the one `allocate` would take
    first: a free X, else one whose quarantine is over, by id, row-locked (SKIP LOCKED:
    parallel binds take different X). Such an X serves nothing, so nothing needs checking
    under its lock (the lock re-reads the row: one another writer bound meanwhile is
    passed over). Fills in binding.id, tenant_id and number_id and returns X; None when
    no X could be taken this way (every free one locked by other writers, or none left:
    `allocate` then waits or says `pool_exhausted`). Nothing is written unless all is:
    a failing insert undoes the claim with it. Prepared once per connection
    (store/prepared.py): PostgreSQL does not parse and plan it for every bind."""
    statement = _fresh_x_statement()
    values = {f"new_{c}": getattr(binding, c) for c in _FRESH_COLUMNS}
    with single_statement(engine) as conn:
        rows = prepared.execute(conn, statement, statement.args({"new_tenant": tenant_name, "new_now": now, **values}))
    if not rows:
        return None
    row = rows[0]
    binding.id, binding.tenant_id, binding.number_id = row[0], row[1], row[2]
    return row[3]


_FRESH_COLUMNS = ("mode", "party_a", "party_a_hash", "reference", "status", "expires_at", "created_at", "purposes",
                  "profile")


@functools.cache
def _fresh_x_statement():
    """bind_fresh_x's statement, compiled once (its values are bound parameters, named
    apart from the columns, which SQLAlchemy would read as SET values of the UPDATE; the
    X's cleared quarantine is a NULL literal, not a parameter)."""
    tenant = select(Tenant.id).where(Tenant.name == bindparam("new_tenant")).scalar_subquery()
    now = bindparam("new_now", type_=VirtualNumber.__table__.c.quarantined_until.type)
    claimed = (update(VirtualNumber)
               .where(VirtualNumber.id == _first(tenant, _candidates(Mode.AXN, [], 1, now), set(), wait=False))
               .values({k: null() if v is None else v for k, v in bound_columns(Mode.AXN).items()})
               .returning(VirtualNumber.id, VirtualNumber.tenant_id, VirtualNumber.e164)
               .cte("claimed"))
    values = [bindparam(f"new_{c}", type_=Binding.__table__.c[c].type) for c in _FRESH_COLUMNS]
    return prepared.Compiled(
        insert(Binding)
        .from_select(["tenant_id", "number_id", *_FRESH_COLUMNS], select(claimed.c.tenant_id, claimed.c.id, *values),
                     include_defaults=False)
        .returning(Binding.id, Binding.tenant_id, Binding.number_id, select(claimed.c.e164).scalar_subquery()))


def _candidates(mode: str, parties: list[str], capacity: int, now: datetime) -> list:
    """What can take a binding of `mode`, best first: a shared X already serving the mode
    (AXB exists to reuse X), then a free X, then one whose quarantine is over."""
    in_use = and_(Binding.number_id == VirtualNumber.id, Binding.status == BindingStatus.ACTIVE)
    candidates = []
    if mode == Mode.AXB:
        candidates.append(and_(VirtualNumber.state == NumberState.BOUND, VirtualNumber.mode == mode,
                               ~exists().where(in_use, has_party(parties))))
    elif mode == Mode.AXE:
        candidates.append(and_(VirtualNumber.state == NumberState.BOUND, VirtualNumber.mode == mode,
                               select(func.count()).where(in_use).scalar_subquery() < capacity))
    candidates.append(VirtualNumber.state == NumberState.FREE)
    candidates.append(and_(VirtualNumber.state == NumberState.QUARANTINED, VirtualNumber.quarantined_until <= now))
    return candidates


def _untried(query, tenant_id, candidates: list, tried: set[int]):
    query = query.where(VirtualNumber.tenant_id == tenant_id, or_(*candidates))
    return query.where(VirtualNumber.id.not_in(tried)) if tried else query


def _first(tenant_id, candidates: list, tried: set[int], wait: bool):
    """SQL: the id of the first X by preference (the best candidate kind, then by id),
    row-locked (waiting for it, or skipping X others hold). One look per kind, each an
    index-ordered LIMIT 1 (ix_vn_shared for X serving AXB/AXE, ix_vn_pool for free and
    quarantined X), in a COALESCE: a kind is read only when the better ones have nothing,
    and an X is found as fast with a million AXN X bound."""
    return func.coalesce(*(
        _untried(select(VirtualNumber.id), tenant_id, [kind], tried).order_by(VirtualNumber.id).limit(1)
        .with_for_update(skip_locked=not wait).scalar_subquery()
        for kind in candidates))


def _take_first(session: Session, query, mode: str, parties: list[str], capacity: int,
                digits: int) -> tuple[VirtualNumber | None, str | None | bool]:
    """Lock the first X of `query` inside a savepoint and claim it. Returns (X or None,
    what `claim` said; False when there was no X). An X turned down is let go at once."""
    savepoint = session.begin_nested()
    try:
        number = session.scalar(query.execution_options(populate_existing=True))
        extension = False if number is None else claim(session, number, mode, parties, capacity, digits)
    except OperationalError as exc:
        savepoint.rollback()
        if getattr(exc.orig, "pgcode", None) == "55P03":  # lock_not_available
            raise Unavailable("pool_busy", "the pool is busy; retry") from None
        raise
    if extension is False:
        savepoint.rollback()  # lets go of an X turned down
    else:
        savepoint.commit()
    return number, extension


def claim(session: Session, number: VirtualNumber, mode: str, parties: list[str], capacity: int,
          digits: int) -> str | None | bool:
    """With X locked, re-check it against the committed bindings (a fresh statement sees
    them all) and take it: returns the AXE extension, None for AXN/AXB, False if X
    cannot take the binding after all."""
    extension = None
    if number.state == NumberState.BOUND:
        if number.mode != mode:
            return False
        if mode == Mode.AXB and parties_on(session, number.id, parties):
            return False
    if mode == Mode.AXE:
        used = set(session.scalars(select(Binding.extension).where(
            Binding.number_id == number.id, Binding.status == BindingStatus.ACTIVE)))
        if len(used) >= capacity:
            return False
        # A random free extension: extensions are not handed out in a guessable order.
        while extension is None or extension in used:
            extension = f"{secrets.randbelow(capacity):0{digits}d}"
    for column, value in bound_columns(mode).items():
        setattr(number, column, value)
    return extension


def bound_columns(mode: str) -> dict:
    """X taken for a binding of `mode`: the free (or quarantined) -> bound transition, the
    one place it is spelled (claim here, bulk's AXN batches)."""
    return {"state": NumberState.BOUND, "mode": Mode(mode), "quarantined_until": None}
