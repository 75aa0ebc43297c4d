"""The customer's own word: per tenant, calls allowed / none / service only, quiet
hours and the preferred channel (issue #16). Kept by the lookup hash of the customer's
number, never the number; every change is audited (callctl.store.reveal.append) and
told to the tenant's webhooks (callctl.store.events), in the same transaction.

Set three ways: the customer on the self-service number (selfservice_*), the insurer's
app over the API (consent source and time required), support staff on the CLI.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from callctl.core.enums import BindingStatus
from callctl.core.decision import Calls, Channel
from callctl.core.numbers import mask
from callctl.errors import ProvisionError
from callctl.store import events, reveal
from callctl.store.crypto import number_hash
from callctl.store.inputs import parse_hours, parse_number
from callctl.store.models import Binding, CustomerPreference, Tenant, utcnow
from callctl.store.tenants import tenant_row

CALLS = tuple(c.value for c in Calls)
CHANNELS = tuple(c.value for c in Channel)
SELFSERVICE_ACTOR = "customer:self-service"
MAX_MENU = 9  # insurers a caller can be offered on one key each


def _view(tenant: Tenant, customer: str, pref: CustomerPreference | None) -> dict:
    return {
        "tenant": tenant.name,
        "customer": mask(customer),
        "calls": pref.calls if pref else Calls.ALLOWED.value,
        "quiet_hours": f"{pref.quiet_from}-{pref.quiet_until}" if pref and pref.quiet_from else None,
        "channel": pref.channel if pref else Channel.PHONE.value,
        "consent_source": pref.consent_source if pref else None,
        "consent_at": pref.consent_at.isoformat() if pref and pref.consent_at else None,
        "updated_by": pref.updated_by if pref else None,
        "updated_at": pref.updated_at.isoformat() if pref else None,
    }


def _find(session: Session, tenant_id: int, customer: str, lock: bool = False) -> CustomerPreference | None:
    query = select(CustomerPreference).where(CustomerPreference.customer_hash == number_hash(customer),
                                             CustomerPreference.tenant_id == tenant_id)
    return session.scalar(query.with_for_update() if lock else query)


def get_preference(engine: Engine, tenant_name: str, customer: str, region: str = "CN") -> dict:
    customer = parse_number(customer, "customer", region)
    with Session(engine) as session:
        tenant = tenant_row(session, tenant_name)
        return _view(tenant, customer, _find(session, tenant.id, customer))


def set_preference(
    engine: Engine, tenant_name: str, customer: str, *, actor: str, calls: str | None = None,
    quiet_hours: str | None = None, channel: str | None = None, consent_source: str | None = None,
    consent_at: datetime | None = None, require_consent: bool = False, region: str = "CN",
    now: datetime | None = None,
) -> dict:
    """Change what is given; quiet_hours '' clears them. Audited, and an event for the
    tenant's webhooks. require_consent (the insurer's API): the customer's consent
    source and time must be given."""
    now = now or utcnow()
    customer = parse_number(customer, "customer", region)
    changes = _changes(calls, quiet_hours, channel)
    if require_consent and not (consent_source and consent_at):
        raise ProvisionError("missing_consent", "an insurer's change needs the customer's consent: source and time")
    if consent_source is not None and not 1 <= len(consent_source) <= 100:
        raise ProvisionError("invalid_consent", "consent source must be 1-100 characters")
    if consent_at is not None and (consent_at.tzinfo is None or consent_at > now):
        raise ProvisionError("invalid_consent", "consent time needs a time zone and must not be in the future")
    if not actor or len(actor) > 100:
        raise ProvisionError("invalid_actor", "who makes the change: 1-100 characters")
    with Session(engine) as session, session.begin():
        tenant = tenant_row(session, tenant_name)
        return _apply(session, tenant, customer, changes, actor, consent_source, consent_at, now)


def _changes(calls: str | None, quiet_hours: str | None, channel: str | None) -> dict:
    changes: dict = {}
    if calls is not None:
        if calls not in CALLS:
            raise ProvisionError("invalid_calls", f"calls must be one of {', '.join(CALLS)}")
        changes["calls"] = calls
    if channel is not None:
        if channel not in CHANNELS:
            raise ProvisionError("invalid_channel", f"channel must be one of {', '.join(CHANNELS)}")
        changes["channel"] = channel
    if quiet_hours is not None:
        if quiet_hours == "":
            changes["quiet_from"] = changes["quiet_until"] = None
        else:
            start, end = parse_hours(quiet_hours)
            if start == end:
                raise ProvisionError("invalid_hours", "quiet hours must not cover the whole day: use calls none")
            changes["quiet_from"], changes["quiet_until"] = start, end
    if not changes:
        raise ProvisionError("nothing_to_change", "give calls, quiet hours or channel")
    return changes


def _apply(session: Session, tenant: Tenant, customer: str, changes: dict, actor: str,
           consent_source: str | None, consent_at: datetime | None, now: datetime) -> dict:
    pref = _find(session, tenant.id, customer, lock=True)
    if pref is None:
        pref = CustomerPreference(tenant_id=tenant.id, customer_hash=number_hash(customer),
                                  calls=Calls.ALLOWED.value, channel=Channel.PHONE.value)
        session.add(pref)
    for column, value in changes.items():
        setattr(pref, column, value)
    pref.consent_source, pref.consent_at = consent_source, consent_at
    pref.updated_by, pref.updated_at = actor, now
    session.flush()
    view = _view(tenant, customer, pref)
    detail = {"tenant": tenant.name, "customer": view["customer"], **{k: view[k] for k in
              ("calls", "quiet_hours", "channel", "consent_source", "consent_at")}}
    reveal.append(session, actor, "preference_set", None, detail, now)
    events.record(session, tenant.id, events.Kind.PREFERENCE_CHANGED, detail, now)
    return view


# --- the self-service number ------------------------------------------------------------

def selfservice_menu(engine: Engine, caller: str) -> list[dict]:
    """The tenants holding an active binding for the caller (as customer), in tenant id
    order, each with the caller's word on its calls: key 1 is the first, and so on."""
    with Session(engine) as session:
        return _menu(session, caller)


def _menu(session: Session, caller: str) -> list[dict]:
    key = number_hash(caller)
    rows = session.execute(
        select(Tenant.id, Tenant.name, CustomerPreference.calls)
        .join(Binding, Binding.tenant_id == Tenant.id)
        .outerjoin(CustomerPreference, (CustomerPreference.tenant_id == Tenant.id)
                   & (CustomerPreference.customer_hash == key))
        .where(Binding.party_a_hash == key, Binding.status == BindingStatus.ACTIVE)
        .distinct().order_by(Tenant.id).limit(MAX_MENU)
    ).all()
    return [{"key": str(i), "tenant_id": t, "tenant": name, "calls": calls or Calls.ALLOWED.value}
            for i, (t, name, calls) in enumerate(rows, start=1)]


def selfservice_toggle(engine: Engine, caller: str, key: str, now: datetime | None = None) -> dict | None:
    """The caller keyed `key` on the menu: stop that tenant's calls, or allow them again
    when they were stopped. None for a key that names no tenant."""
    now = now or utcnow()
    with Session(engine) as session, session.begin():
        chosen = next((m for m in _menu(session, caller) if m["key"] == key), None)
        if chosen is None:
            return None
        calls = Calls.ALLOWED.value if chosen["calls"] != Calls.ALLOWED else Calls.NONE.value
        tenant = session.get(Tenant, chosen["tenant_id"])
        return _apply(session, tenant, caller, {"calls": calls}, SELFSERVICE_ACTOR,
                      "self-service number", now, now)
