"""Allocation: pick and row-lock an X (and an AXE extension) for a new binding, and the
free (or quarantined) -> bound transition. bind uses `allocate`; bulk's AXN batches use
`bound_columns` and the same lock settings."""
from __future__ import annotations

import secrets
from datetime import datetime

from sqlalchemy import and_, case, exists, func, or_, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from callctl.core.decision import Mode
from callctl.core.enums import BindingStatus, NumberState
from callctl.errors import Conflict, Unavailable
from callctl.store.crypto import number_hash
from callctl.store.models import Binding, VirtualNumber

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
    preference = case(*((c, rank) for rank, c in enumerate(candidates)), else_=len(candidates))
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_WAIT_SECONDS}s'"))
    tried: set[int] = set()  # X turned down under their lock
    for _ in range(ALLOCATION_ROUNDS):
        for wait in (False, True):
            query = _untried(select(VirtualNumber), tenant_id, candidates, tried)
            number, extension = _take_first(session, query.order_by(preference, VirtualNumber.id), wait,
                                            mode, parties, capacity, extension_digits)
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


def _untried(query, tenant_id: int, candidates: list, tried: set[int]):
    query = query.where(VirtualNumber.tenant_id == tenant_id, or_(*candidates))
    return query.where(VirtualNumber.id.not_in(tried)) if tried else query


def _take_first(session: Session, query, wait: bool, mode: str, parties: list[str], capacity: int,
                digits: int) -> tuple[VirtualNumber | None, str | None | bool]:
    """Lock the first X of `query` inside a savepoint and claim it. Returns (X or None,
    what `claim` said; False when there was no X). An X turned down is let go at once."""
    savepoint = session.begin_nested()
    try:
        number = session.scalar(
            query.limit(1).with_for_update(skip_locked=not wait).execution_options(populate_existing=True)
        )
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
