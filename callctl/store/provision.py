"""Provisioning: tenants, pools, bindings. Used by the CLI (and later the API).

Inputs are validated here, once; every error is a ProvisionError with a stable code
and a message that never repeats a real number.
"""
from __future__ import annotations

import re
import secrets
from datetime import datetime, timedelta, timezone

from sqlalchemy import and_, case, exists, func, or_, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from callctl.core.bounds import MAX_ID, MAX_SECONDS, printable
from callctl.core.decision import DEFAULT_PURPOSES, Mode, Profile, Purpose, known_zone
from callctl.core.enums import NumberState
from callctl.core.numbers import InvalidNumber, mask, to_e164
from callctl.errors import Conflict, NotFound, ProvisionError, Unavailable
from callctl.store import cdrs, events
from callctl.store.crypto import number_hash
from callctl.store.models import Binding, Cdr, Tenant, TenantCaller, VirtualNumber, utcnow


def parse_number(raw: str, what: str, region: str) -> str:
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


def tenant_row(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        raise NotFound("tenant_not_found", f"no tenant named '{name}'")
    return tenant


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
    _limits(ring_timeout, max_call_seconds)
    calls_from, calls_until = parse_hours(hours)
    tenant = Tenant(
        name=name,
        hotline=parse_number(hotline, "hotline", region),
        strict=strict,
        ring_timeout=ring_timeout,
        max_call_seconds=max_call_seconds,
        time_zone=_zone(time_zone),
        calls_from=calls_from,
        calls_until=calls_until,
    )
    patterns = {(parse_number(c, "caller", region), False) for c in callers}
    patterns |= {(_prefix(p), True) for p in caller_prefixes}
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
    _limits(ring_timeout, max_call_seconds)
    if max_concurrent_calls is not None and not 0 <= max_concurrent_calls <= 100000:
        raise ProvisionError("invalid_limit", "concurrent calls must be 0 (no limit) to 100000")
    changes = {
        "time_zone": _zone(time_zone) if time_zone is not None else None,
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


def add_numbers(engine: Engine, tenant_name: str, numbers: list[str], region: str = "CN") -> int:
    """Add virtual numbers to a tenant's pool. Numbers already in a pool are an error."""
    wanted = sorted({parse_number(n, "virtual number", region) for n in numbers})
    with Session(engine) as session, session.begin():
        tenant = tenant_row(session, tenant_name)
        taken = session.scalars(select(VirtualNumber.e164).where(VirtualNumber.e164.in_(wanted))).all()
        if taken:
            raise Conflict(
                "number_exists", f"{len(taken)} number(s) already in a pool, e.g. {sorted(taken)[0]}"
            )
        session.add_all(VirtualNumber(e164=n, tenant_id=tenant.id) for n in wanted)
    return len(wanted)


def pool_status(engine: Engine, tenant_name: str) -> dict:
    with Session(engine) as session:
        tenant = tenant_row(session, tenant_name)
        counts = dict(
            session.execute(
                select(VirtualNumber.state, func.count())
                .where(VirtualNumber.tenant_id == tenant.id)
                .group_by(VirtualNumber.state)
            ).all()
        )
    return {s: counts.get(s, 0) for s in ("free", "bound", "quarantined", "disabled")}


def binding_status(binding: Binding, now: datetime | None = None) -> str:
    """active, expired (past its expiry, whether or not housekeeping has released it yet)
    or ended (unbound)."""
    if binding.status == "active":
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


MODES = tuple(m.value for m in Mode)
PURPOSES = tuple(p.value for p in Purpose)
LOCK_WAIT_SECONDS = 5  # the second allocation pass waits at most this long for a row lock
ALLOCATION_ROUNDS = 50  # looks for an X before `pool_busy` (each round follows a change by another writer)


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

    AXN: a free X, exclusive to this binding. AXB: an X already serving AXB pairs none of
    which has either party, else a free X. AXE: a free extension of `extension_digits`
    digits on an X already serving AXE, else a free X. A pool with nothing to give is
    `pool_exhausted`; concurrent binds never share what they must not (_allocate).
    With `quarantine`, the pool's lapsed bindings are released first when nothing else
    is left (housekeeping does it too, every few seconds).
    """
    now = now or utcnow()
    pair = binding_parties(mode, customer, other_party, extension_digits, region)
    expires_at = expiry_from(expires_at, ttl_seconds, now)
    # Built (its lookup hashes computed, the key ring loaded) before any row is locked.
    binding = Binding(mode=mode, party_a=pair[0], party_b=pair[1], reference=parse_reference(reference),
                      expires_at=expires_at, created_at=now, purposes=_purposes_input(purposes),
                      profile=_profile_input(profile))
    with Session(engine) as session, session.begin():
        tenant = tenant_row(session, tenant_name)
        try:
            number, extension = _allocate(session, tenant.id, mode, pair, extension_digits, now)
        except ProvisionError as exc:
            if exc.code != "pool_exhausted" or quarantine is None or not _expire(session, now, quarantine,
                                                                                   tenant_id=tenant.id):
                raise
            number, extension = _allocate(session, tenant.id, mode, pair, extension_digits, now)
        binding.tenant_id, binding.number_id, binding.extension = tenant.id, number.id, extension
        session.add(binding)
        try:
            session.flush()
        except IntegrityError:
            # The unique indexes are the last line of defence behind the row locks.
            raise Conflict("conflict", "that virtual number was bound concurrently; retry") from None
        return binding_view(binding, number.e164, tenant.name)


def binding_parties(mode: str, customer: str, other_party: str | None, extension_digits: int,
                   region: str) -> tuple[str, str | None]:
    """The (party A, party B) of a new binding, validated for its mode."""
    if mode not in MODES:
        raise ProvisionError("invalid_mode", f"mode must be one of {', '.join(MODES)}")
    if not 1 <= extension_digits <= 6:
        raise ProvisionError("invalid_extension_digits", "an extension has 1-6 digits")
    party_a = parse_number(customer, "customer", region)
    if mode != Mode.AXB:
        if other_party is not None:
            raise ProvisionError("invalid_party", f"only AXB bindings have an other party, not {mode}")
        return party_a, None
    if other_party is None:
        raise ProvisionError("missing_other_party", "an AXB binding needs the other party's number")
    party_b = parse_number(other_party, "other party", region)
    if party_b == party_a:
        raise ProvisionError("invalid_party", "the two parties of an AXB binding must differ")
    return party_a, party_b


def _has_party(parties: list[str]):
    """SQL: the binding has one of these numbers as a party. Parties are stored
    encrypted: compared by their keyed lookup hashes (docs/keys.md)."""
    hashes = [number_hash(p) for p in parties]
    return or_(Binding.party_a_hash.in_(hashes), Binding.party_b_hash.in_(hashes))


def _allocate(session: Session, tenant_id: int, mode: str, pair: tuple[str, str | None],
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
    in_use = and_(Binding.number_id == VirtualNumber.id, Binding.status == "active")
    capacity = 10 ** extension_digits
    parties = [p for p in pair if p]
    candidates = []
    if mode == Mode.AXB:  # fill the X already serving pairs first: AXB exists to reuse X
        candidates.append(and_(VirtualNumber.state == "bound", VirtualNumber.mode == mode,
                               ~exists().where(in_use, _has_party(parties))))
    elif mode == Mode.AXE:
        candidates.append(and_(VirtualNumber.state == "bound", VirtualNumber.mode == mode,
                               select(func.count()).where(in_use).scalar_subquery() < capacity))
    candidates.append(VirtualNumber.state == "free")
    candidates.append(and_(VirtualNumber.state == "quarantined", VirtualNumber.quarantined_until <= now))
    preference = case(*((c, rank) for rank, c in enumerate(candidates)), else_=len(candidates))
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_WAIT_SECONDS}s'"))
    tried: set[int] = set()  # X turned down under their lock
    for _ in range(ALLOCATION_ROUNDS):
        for wait in (False, True):
            query = select(VirtualNumber).where(VirtualNumber.tenant_id == tenant_id, or_(*candidates))
            if tried:
                query = query.where(VirtualNumber.id.not_in(tried))
            savepoint = session.begin_nested()
            try:
                number = session.scalar(
                    query.order_by(preference, VirtualNumber.id).limit(1)
                    .with_for_update(skip_locked=not wait)
                    .execution_options(populate_existing=True)
                )
                extension = False if number is None else _claim(session, number, mode, parties, capacity,
                                                                 extension_digits)
            except OperationalError as exc:
                savepoint.rollback()
                if getattr(exc.orig, "pgcode", None) == "55P03":  # lock_not_available
                    raise Unavailable("pool_busy", "the pool is busy; retry") from None
                raise
            if extension is not False:
                savepoint.commit()
                return number, extension
            savepoint.rollback()  # lets go of an X turned down
            if number is not None:
                tried.add(number.id)
                break  # look again from the first candidate
        else:
            # Neither look found an X. A row that changed while we waited for it is not
            # returned (e.g. free -> bound AXE): whether anything can still take the
            # binding is asked afresh, and only "nothing" is exhaustion.
            query = select(VirtualNumber.id).where(VirtualNumber.tenant_id == tenant_id, or_(*candidates))
            if tried:
                query = query.where(VirtualNumber.id.not_in(tried))
            if session.scalar(query.limit(1)) is None:
                raise Conflict("pool_exhausted", f"no virtual number in the pool can take this {mode} binding")
    raise Unavailable("pool_busy", "the pool is busy; retry")


def _claim(session: Session, number: VirtualNumber, mode: str, parties: list[str], capacity: int,
           digits: int) -> str | None | bool:
    """With X locked, re-check it against the committed bindings (a fresh statement sees
    them all) and take it: returns the AXE extension, None for AXN/AXB, False if X
    cannot take the binding after all."""
    extension = None
    if number.state == "bound":
        if number.mode != mode:
            return False
        if mode == Mode.AXB and _parties_on(session, number.id, parties):
            return False
    if mode == Mode.AXE:
        used = set(session.scalars(select(Binding.extension).where(
            Binding.number_id == number.id, Binding.status == "active")))
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
    one place it is spelled (bind's _claim, bulk's AXN batches)."""
    return {"state": NumberState.BOUND, "mode": Mode(mode), "quarantined_until": None}


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


UNBOUND, EXPIRED = "unbound", "expired"  # bindings.end_reason
EXPIRE_BATCH = 200  # lapsed bindings released per transaction


def _end(session: Session, binding: Binding, now: datetime, quarantine: timedelta, reason: str) -> None:
    """End a binding (its row locked); when it was the last on its X, X rests in
    quarantine. X's row lock serialises this with allocation and other ends on X."""
    binding.status = "ended"
    binding.end_reason = reason
    binding.ended_at = now if reason == UNBOUND else min(now, binding.expires_at)
    number = session.get(VirtualNumber, binding.number_id, with_for_update=True)
    still_used = session.scalar(
        select(func.count()).where(
            Binding.number_id == number.id, Binding.status == "active", Binding.id != binding.id
        )
    )
    if not still_used:
        number.state = "quarantined"
        number.mode = None
        number.quarantined_until = now + quarantine
    session.flush()


def expire_due(engine: Engine, quarantine: timedelta, now: datetime | None = None) -> int:
    """Release bindings past their expiry (status expired, X to quarantine when free),
    one batch per transaction until none are left; returns how many. Safe with several
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
    query = select(Binding).where(Binding.status == "active", Binding.expires_at <= now)
    if tenant_id is not None:
        query = query.where(Binding.tenant_id == tenant_id)
    lapsed = session.scalars(query.order_by(Binding.expires_at).limit(EXPIRE_BATCH)
                             .with_for_update(skip_locked=True)).all()
    for binding in lapsed:
        _end(session, binding, now, quarantine, EXPIRED)
        view = _view(session, binding)
        events.record(session, binding.tenant_id, events.Kind.BINDING_EXPIRED,
                      {key: view[key] for key in ("id", "x", "mode", "customer", "reference", "expires_at")}, now)
    return len(lapsed)


def expiry_from(expires_at: datetime | None, ttl_seconds: int | None, now: datetime) -> datetime | None:
    """A binding's expiry from a date (long-term) or a TTL (temporary); None never expires."""
    if expires_at is not None and ttl_seconds is not None:
        raise ProvisionError("invalid_expiry", "give an expiry date or a TTL, not both")
    if ttl_seconds is not None:
        if not 0 < ttl_seconds <= MAX_SECONDS:
            raise ProvisionError("invalid_expiry", f"TTL must be 1 to {MAX_SECONDS} seconds")
        expires_at = now + timedelta(seconds=ttl_seconds)
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise ProvisionError("invalid_expiry", "expiry needs a time zone, e.g. 2027-01-01T00:00:00+08:00")
        try:
            expires_at = expires_at.astimezone(timezone.utc)  # shown as stored: UTC
        except OverflowError:  # e.g. 9999-12-31T23:59:59-14:00 is in the year 10000
            raise ProvisionError("invalid_expiry", "expiry is out of range") from None
        if expires_at <= now:
            raise ProvisionError("invalid_expiry", "expiry is in the past")
    return expires_at


PROFILES = tuple(p.value for p in Profile)  # protection profiles (conf/anomaly.yaml: profiles)


def _accepted(stored: str | None) -> frozenset[str]:
    return DEFAULT_PURPOSES if stored is None else frozenset(p for p in stored.split(",") if p)


def _purpose(value: str) -> str:
    if value not in PURPOSES:
        raise ProvisionError("invalid_purpose", f"purpose must be one of {', '.join(PURPOSES)}")
    return value


def _purposes_input(purposes: list[str] | None) -> str | None:
    """The stored form of the purposes a customer accepts; None keeps the default."""
    if purposes is None:
        return None
    return ",".join(sorted({_purpose(p.strip()) for p in purposes}))


def _profile_input(profile: str | None) -> str | None:
    if profile is not None and profile not in PROFILES:
        raise ProvisionError("invalid_profile", f"profile must be one of {', '.join(PROFILES)}")
    return profile


def set_binding_policy(engine: Engine, binding_id: int, *, purposes: list[str] | None = None,
                       profile: str | None = None, clear_profile: bool = False,
                       tenant_id: int | None = None) -> dict:
    """Change which purposes the customer accepts and/or the protection profile."""
    accepted = _purposes_input(purposes)
    profile = _profile_input(profile)
    with Session(engine) as session, session.begin():
        binding = _active_binding(session, binding_id, tenant_id)
        if accepted is not None:
            binding.purposes = accepted
        if profile is not None or clear_profile:
            binding.profile = profile
        session.flush()
        return _view(session, binding)


def add_callers(engine: Engine, tenant_name: str, *, callers: list[str] = (), caller_prefixes: list[str] = (),
                purpose: str = "service", region: str = "CN") -> dict:
    """Add agents' numbers or prefixes to the tenant, in the caller group of `purpose`;
    ones it has already move to that group."""
    purpose = _purpose(purpose)
    patterns = {parse_number(c, "caller", region): False for c in callers}
    patterns |= {_prefix(p): True for p in caller_prefixes}
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


def parse_reference(reference: str | None) -> str | None:
    if reference is not None and len(reference) > 100:
        raise ProvisionError("invalid_reference", "reference must be at most 100 characters")
    if reference is not None and not printable(reference):
        raise ProvisionError("invalid_reference", "reference must be printable text (no control characters)")
    return reference


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
    if binding.status != "active":
        raise Conflict("binding_ended", f"binding {binding_id} has ended already")
    return binding


def _view(session: Session, binding: Binding) -> dict:
    x = session.scalar(select(VirtualNumber.e164).where(VirtualNumber.id == binding.number_id))
    tenant = session.scalar(select(Tenant.name).where(Tenant.id == binding.tenant_id))
    return binding_view(binding, x, tenant)


def tenant_id_of(engine: Engine, tenant_name: str) -> int:
    with Session(engine) as session:
        return tenant_row(session, tenant_name).id


def get_binding(engine: Engine, binding_id: int, *, tenant_id: int | None = None) -> dict:
    with Session(engine) as session:
        return _view(session, _scoped_binding(session, binding_id, tenant_id))


BINDING_STATUSES = ("active", "expired", "ended")
MAX_PAGE = 1000


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
    expired_end = and_(Binding.status == "ended", Binding.end_reason == EXPIRED)
    if status == "ended":
        query = query.where(Binding.status == "ended", ~expired_end)
    elif status == "active":
        query = query.where(Binding.status == "active", in_force)
    elif status == "expired":
        query = query.where(or_(and_(Binding.status == "active", ~in_force), expired_end))
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
        if binding.status != "active" and binding.end_reason == EXPIRED:
            _revive(session, binding)
        elif binding.status != "active":
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
    if number.state == "quarantined":
        free = True
    elif number.state == "bound" and number.mode == binding.mode and binding.mode != Mode.AXN:
        taken = (_parties_on(session, number.id, [p for p in (binding.party_a, binding.party_b) if p])
                 if binding.mode == Mode.AXB else
                 session.scalar(select(Binding.id).where(Binding.number_id == number.id, Binding.status == "active",
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
                if party_a == binding.party_b or _parties_on(session, binding.number_id, [party_a], binding.id):
                    raise Conflict(
                        "party_conflict", "that number is already a party of a binding on this virtual number"
                    )
            binding.party_a = party_a
        if reference is not None:
            binding.reference = reference
        session.flush()
        return _view(session, binding)


def _parties_on(session: Session, number_id: int, parties: list[str], except_id: int | None = None) -> bool:
    """Whether an active binding on X, other than except_id, has one of these parties."""
    query = select(Binding.id).where(Binding.number_id == number_id, Binding.status == "active",
                                     _has_party(parties))
    if except_id is not None:
        query = query.where(Binding.id != except_id)
    return session.scalar(query.limit(1)) is not None


def list_cdrs(engine: Engine, limit: int = 50, tenant_name: str | None = None) -> list[dict]:
    """Newest CDRs first, as plain dicts (callctl.store.cdrs has the filters)."""
    return cdrs.list_cdrs(engine, cdrs.CdrFilter(tenant=tenant_name or None), limit=limit)
