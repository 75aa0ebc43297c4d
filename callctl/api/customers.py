"""/v1/customers/preferences: the customer's word on a tenant's calls (tenant tokens)."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from sqlalchemy.engine import Engine

from callctl.api.auth import tenant
from callctl.api.deps import Settings, engine, settings
from callctl.api.schemas import PreferenceIn, PreferenceOut, text_query
from callctl.store import customers
from callctl.store.tokens import Principal

router = APIRouter(prefix="/v1/customers", tags=["customers"])


@router.get("/preferences", response_model=PreferenceOut)
def get_preferences(customer: str = text_query(..., min_length=1, max_length=40), who: Principal = Depends(tenant),
                    db: Engine = Depends(engine), cfg: Settings = Depends(settings)):
    """The customer's word on this tenant's calls (defaults when they never said)."""
    return customers.get_preference(db, who.tenant_name, customer, region=cfg.region)


@router.put("/preferences", response_model=PreferenceOut)
def put_preferences(body: PreferenceIn, who: Principal = Depends(tenant), db: Engine = Depends(engine),
                    cfg: Settings = Depends(settings)):
    """Set from the insurer's app on the customer's word: consent source and time required.
    Audited; an event for the tenant's webhooks."""
    return customers.set_preference(
        db, who.tenant_name, body.customer, actor=f"tenant:{who.tenant_name}:{who.name}"[:100],
        calls=body.calls, quiet_hours=body.quiet_hours, channel=body.channel,
        consent_source=body.consent_source, consent_at=body.consent_at, require_consent=True, region=cfg.region)
