"""Bindings: bind (an X allocated under row locks, store/allocation.py), unbind, expiry
and late renewal, the binding views, list, extend, update, the customer's policy.

Inputs are checked in store/inputs.py; every error is a ProvisionError with a stable
code and a message that never repeats a real number.
"""
from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from callctl.core.enums import BindingStatus, NumberState
from callctl.core.bounds import MAX_ID
from callctl.core.decision import DEFAULT_PURPOSES, Mode
from callctl.core.numbers import mask
from callctl.errors import Conflict, NotFound, ProvisionError
from callctl.store import events
from callctl.store.allocation import allocate, bind_fresh_x, parties_on
from callctl.store.inputs import (binding_parties, expiry_from, parse_number, parse_profile, parse_purposes,
                                  parse_reference)
from callctl.store.models import Binding, Tenant, VirtualNumber, utcnow
from callctl.store.tenants import tenant_row

UNBOUND, EXPIRED = "unbound", "expired"  # bindings.end_reason
EXPIRE_BATCH = 200  # lapsed bindings released per transaction
BINDING_STATUSES = ("active", "expired", "ended")
MAX_PAGE = 1000


def binding_status(binding: Binding, now: datetime | None = None) -> str:
    """active, expired (past its expiry, whether or not housekeeping has released it yet)
    or ended (unbound)."""
    if binding.status == BindingStatus.ACTIVE:
        lapsed = binding.expires_at is not None and binding.expires_at <= (now or utcnow())
        return "expired" if lapsed else "active"
    return "expired" if binding.end_reason == EXPIRED else "ended"


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
        "status": binding_status(binding),
        "purposes": sorted(_accepted(binding.purposes)),
        "profile": binding.profile,
        "expires_at": binding.expires_at.isoformat() if binding.expires_at else None,
        "created_at": binding.created_at.isoformat() if binding.created_at else None,
        "ended_at": binding.ended_at.isoformat() if binding.ended_at else None,
    }


def _accepted(stored: str | None) -> frozenset[str]:
    return DEFAULT_PURPOSES if stored is None else frozenset(p for p in stored.split(",") if p)


def bind(
    engine: Engine,
    tenant_name: str,
    customer: str,
    *,
    mode: str = "AXN",
    other_party: str | None = None,
    reference: str | None = None,
    expires_at: datetime | None = None,
    ttl_seconds: int | None = None,
    region: str = "CN",
    extension_digits: int = 4,
    now: datetime | None = None,
    purposes: list[str] | None = None,
    profile: str | None = None,
    quarantine: timedelta | None = None,
) -> dict:
    """Bind an X of the tenant's pool to the customer.

    AXN: a free X, exclusive to this binding (on PostgreSQL one statement claims it and
    inserts the binding, allocation.bind_fresh_x; when every free X is held by other
    writers, or none is left, the general path below waits or says so). AXB: an X already serving AXB pairs none of
    which has either party, else a free X. AXE: a free extension of `extension_digits`
    digits on an X already serving AXE, else a free X. A pool with nothing to give is
    `pool_exhausted`; concurrent binds never share what they must not (allocation.allocate).
    With `quarantine` (the cap after expiry, see _expire), the pool's lapsed bindings are
    released when nothing else is left (housekeeping does it too, every few seconds).
    """
    now = now or utcnow()
    pair = binding_parties(mode, customer, other_party, extension_digits, region)
    expires_at = expiry_from(expires_at, ttl_seconds, now)
    # Built (its lookup hashes computed, the key ring loaded) before any row is locked.
    binding = Binding(mode=mode, party_a=pair[0], party_b=pair[1], reference=parse_reference(reference),
                      expires_at=expires_at, created_at=now, purposes=parse_purposes(purposes),
                      profile=parse_profile(profile), status=BindingStatus.ACTIVE)
    if mode == Mode.AXN and engine.dialect.name == "postgresql":
        try:
            x = bind_fresh_x(engine, tenant_name, binding, now)  # one statement, the common case
        except IntegrityError:
            raise Conflict("conflict", "that virtual number was bound concurrently; retry") from None
        if x is not None:
            return binding_view(binding, x, tenant_name)
    try:
        return _bind_row(engine, tenant_name, binding, pair, extension_digits, now)
    except ProvisionError as exc:
        # Nothing left: release the pool's lapsed bindings in a transaction of their own
        # (kept whether or not this bind then finds an X), and look once more.
        if exc.code != "pool_exhausted" or quarantine is None or not _release_lapsed(engine, tenant_name,
                                                                                     quarantine, now):
            raise
    return _bind_row(engine, tenant_name, binding, pair, extension_digits, now)


def _release_lapsed(engine: Engine, tenant_name: str, quarantine: timedelta, now: datetime) -> int:
    with Session(engine) as session, session.begin():
        return _expire(session, now, quarantine, tenant_id=tenant_row(session, tenant_name).id)


def _bind_row(engine: Engine, tenant_name: str, binding: Binding, pair: tuple[str, str | None],
              extension_digits: int, now: datetime) -> dict:
    with Session(engine) as session, session.begin():
        tenant = tenant_row(session, tenant_name)
        number, extension = allocate(session, tenant.id, binding.mode, pair, extension_digits, now)
        binding.tenant_id, binding.number_id, binding.extension = tenant.id, number.id, extension
        session.add(binding)
        try:
            session.flush()
        except IntegrityError:
            # The unique indexes are the last line of defence behind the row locks.
            raise Conflict("conflict", "that virtual number was bound concurrently; retry") from None
        return binding_view(binding, number.e164, tenant.name)


def unbind(
    engine: Engine,
    binding_id: int,
    quarantine: timedelta,
    now: datetime | None = None,
    *,
    tenant_id: int | None = None,
) -> dict:
    """End a binding; when it was the last on its X, X is quarantined for `quarantine`
    before it can be allocated again. Calls in progress are not touched (the PBX holds them)."""
    now = now or utcnow()
    with Session(engine) as session, session.begin():
        binding = _active_binding(session, binding_id, tenant_id)
        _end(session, binding, now, quarantine, UNBOUND)
        return _view(session, binding)


def _end(session: Session, binding: Binding, now: datetime, quarantine: timedelta, reason: str) -> None:
    """End a binding (its row locked); when it was the last on its X, X rests in
    quarantine. X's row lock serialises this with allocation and other ends on X."""
    binding.status = BindingStatus.ENDED
    binding.end_reason = reason
    binding.ended_at = now if reason == UNBOUND else min(now, binding.expires_at)
    number = session.get(VirtualNumber, binding.number_id, with_for_update=True)
    still_used = session.scalar(
        select(func.count()).where(
            Binding.number_id == number.id, Binding.status == BindingStatus.ACTIVE, Binding.id != binding.id
        )
    )
    if not still_used:
        number.state = NumberState.QUARANTINED
        number.mode = None
        number.quarantined_until = binding.ended_at + quarantine
    session.flush()


def expire_due(engine: Engine, quarantine: timedelta, now: datetime | None = None) -> int:
    """Release bindings past their expiry (status expired, X to quarantine when free, for
    the binding's own lifetime at most `quarantine`), one batch per transaction until
    none are left; returns how many. Safe with several
    daemons at once: each takes rows the others do not hold (SKIP LOCKED)."""
    now = now or utcnow()
    total = 0
    while True:
        with Session(engine) as session, session.begin():
            count = _expire(session, now, quarantine)
        total += count
        if count < EXPIRE_BATCH:
            return total


def _expire(session: Session, now: datetime, quarantine: timedelta, tenant_id: int | None = None) -> int:
    query = select(Binding).where(Binding.status == BindingStatus.ACTIVE, Binding.expires_at <= now)
    if tenant_id is not None:
        query = query.where(Binding.tenant_id == tenant_id)
    lapsed = session.scalars(query.order_by(Binding.expires_at).limit(EXPIRE_BATCH)
                             .with_for_update(skip_locked=True)).all()
    for binding in lapsed:
        # X rests as long as the binding lived, at most `quarantine`: a temporary binding's
        # X is soon free again, a policy's rests the full cooldown (docs/api.md).
        lifetime = max(binding.expires_at - binding.created_at, timedelta(0))
        _end(session, binding, now, min(quarantine, lifetime), EXPIRED)
        view = _view(session, binding)
        events.record(session, binding.tenant_id, events.Kind.BINDING_EXPIRED,
                      {key: view[key] for key in ("id", "x", "mode", "customer", "reference", "expires_at")}, now)
    return len(lapsed)


def set_binding_policy(engine: Engine, binding_id: int, *, purposes: list[str] | None = None,
                       profile: str | None = None, clear_profile: bool = False,
                       tenant_id: int | None = None) -> dict:
    """Change which purposes the customer accepts and/or the protection profile."""
    accepted = parse_purposes(purposes)
    profile = parse_profile(profile)
    with Session(engine) as session, session.begin():
        binding = _active_binding(session, binding_id, tenant_id)
        if accepted is not None:
            binding.purposes = accepted
        if profile is not None or clear_profile:
            binding.profile = profile
        session.flush()
        return _view(session, binding)


def _scoped_binding(session: Session, binding_id: int, tenant_id: int | None, *, lock: bool = False) -> Binding:
    """The binding, if it exists and (when tenant_id is given) belongs to that tenant.
    Another tenant's binding is reported exactly like a missing one."""
    # (an id past what the database stores is nobody's: SQLite would overflow on it)
    binding = session.get(Binding, binding_id, with_for_update=lock) if 0 < binding_id <= MAX_ID else None
    if binding is None or (tenant_id is not None and binding.tenant_id != tenant_id):
        raise NotFound("binding_not_found", f"no binding {binding_id}")
    return binding


def _active_binding(session: Session, binding_id: int, tenant_id: int | None) -> Binding:
    binding = _scoped_binding(session, binding_id, tenant_id, lock=True)
    if binding.status != BindingStatus.ACTIVE:
        raise Conflict("binding_ended", f"binding {binding_id} has ended already")
    return binding


def _view(session: Session, binding: Binding) -> dict:
    x = session.scalar(select(VirtualNumber.e164).where(VirtualNumber.id == binding.number_id))
    tenant = session.scalar(select(Tenant.name).where(Tenant.id == binding.tenant_id))
    return binding_view(binding, x, tenant)


def get_binding(engine: Engine, binding_id: int, *, tenant_id: int | None = None) -> dict:
    with Session(engine) as session:
        return _view(session, _scoped_binding(session, binding_id, tenant_id))


def list_bindings(
    engine: Engine,
    *,
    tenant_id: int | None = None,
    reference: str | None = None,
    status: str | None = None,
    after: int = 0,
    limit: int = 100,
    now: datetime | None = None,
) -> dict:
    """A page of bindings in id order: {"items": [...], "next": id to pass as `after`, or None}.

    status: active (in force), expired (not ended, but past its expiry), ended. Keyset
    paging (id > after) stays fast however many bindings exist.
    """
    now = now or utcnow()
    if status is not None and status not in BINDING_STATUSES:
        raise ProvisionError("invalid_status", f"status must be one of {', '.join(BINDING_STATUSES)}")
    if not 1 <= limit <= MAX_PAGE:
        raise ProvisionError("invalid_page", f"limit must be 1-{MAX_PAGE}")
    if after < 0:
        raise ProvisionError("invalid_page", "after must be a binding id (0 for the first page)")
    query = (
        select(Binding, VirtualNumber.e164, Tenant.name)
        .join(VirtualNumber, VirtualNumber.id == Binding.number_id)
        .join(Tenant, Tenant.id == Binding.tenant_id)
        .where(Binding.id > after)
        .order_by(Binding.id)
        .limit(limit + 1)
    )
    if tenant_id is not None:
        query = query.where(Binding.tenant_id == tenant_id)
    if reference is not None:
        query = query.where(Binding.reference == parse_reference(reference))
    in_force = or_(Binding.expires_at.is_(None), Binding.expires_at > now)
    expired_end = and_(Binding.status == BindingStatus.ENDED, Binding.end_reason == EXPIRED)
    if status == "ended":
        query = query.where(Binding.status == BindingStatus.ENDED, ~expired_end)
    elif status == "active":
        query = query.where(Binding.status == BindingStatus.ACTIVE, in_force)
    elif status == "expired":
        query = query.where(or_(and_(Binding.status == BindingStatus.ACTIVE, ~in_force), expired_end))
    with Session(engine) as session:
        rows = session.execute(query).all()
    items = [binding_view(b, x, t) for b, x, t in rows[:limit]]
    return {"items": items, "next": items[-1]["id"] if len(rows) > limit else None}


def extend_binding(
    engine: Engine,
    binding_id: int,
    expires_at: datetime | None = None,
    *,
    ttl_seconds: int | None = None,
    tenant_id: int | None = None,
    now: datetime | None = None,
) -> dict:
    """Give a binding a new expiry (a date, a TTL from now, or None: no expiry).

    A late renewal of an expired binding revives it on the same X when X can still take
    it (X in quarantine, or a shared X with its extension or parties still free): the
    customer keeps the number they know. Once X was given to someone else: binding_expired
    (bind again). An unbound binding is never revived (binding_ended)."""
    now = now or utcnow()
    new_expiry = expiry_from(expires_at, ttl_seconds, now)
    with Session(engine) as session, session.begin():
        binding = _scoped_binding(session, binding_id, tenant_id, lock=True)
        if binding.status != BindingStatus.ACTIVE and binding.end_reason == EXPIRED:
            _revive(session, binding)
        elif binding.status != BindingStatus.ACTIVE:
            raise Conflict("binding_ended", f"binding {binding_id} has ended already")
        binding.expires_at = new_expiry
        try:
            session.flush()
        except IntegrityError:
            raise Conflict("binding_expired", _REUSED.format(binding_id)) from None
        return _view(session, binding)


_REUSED = "binding {} has expired and its virtual number serves someone else now; bind again"


def _revive(session: Session, binding: Binding) -> None:
    """An expired binding active again on its X, if X can still take it (X row-locked)."""
    number = session.get(VirtualNumber, binding.number_id, with_for_update=True, populate_existing=True)
    if number.state == NumberState.QUARANTINED:
        free = True
    elif number.state == NumberState.BOUND and number.mode == binding.mode and binding.mode != Mode.AXN:
        taken = (parties_on(session, number.id, [p for p in (binding.party_a, binding.party_b) if p])
                 if binding.mode == Mode.AXB else
                 session.scalar(select(Binding.id).where(Binding.number_id == number.id, Binding.status == BindingStatus.ACTIVE,
                                                         Binding.extension == binding.extension).limit(1)))
        free = not taken
    else:
        free = False
    if not free:
        raise Conflict("binding_expired", _REUSED.format(binding.id))
    number.state, number.mode, number.quarantined_until = "bound", binding.mode, None
    binding.status, binding.end_reason, binding.ended_at = "active", None, None


def update_binding(
    engine: Engine,
    binding_id: int,
    *,
    customer: str | None = None,
    reference: str | None = None,
    tenant_id: int | None = None,
    region: str = "CN",
) -> dict:
    """Change the customer's real number (party A) and/or the external reference.
    In AXB the new number must not be a party of another binding on the same X."""
    party_a = parse_number(customer, "customer", region) if customer is not None else None
    reference = parse_reference(reference)
    with Session(engine) as session, session.begin():
        binding = _active_binding(session, binding_id, tenant_id)
        if party_a is not None:
            if binding.mode == Mode.AXB:
                # The X row lock serialises every change to the parties on that X.
                session.get(VirtualNumber, binding.number_id, with_for_update=True)
                if party_a == binding.party_b or parties_on(session, binding.number_id, [party_a], binding.id):
                    raise Conflict(
                        "party_conflict", "that number is already a party of a binding on this virtual number"
                    )
            binding.party_a = party_a
        if reference is not None:
            binding.reference = reference
        session.flush()
        return _view(session, binding)
