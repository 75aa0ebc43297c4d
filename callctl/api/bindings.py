"""/v1/bindings: a tenant's bindings (tenant tokens; another tenant's binding is 404)."""
from __future__ import annotations

import structlog
from fastapi import APIRouter, Depends, Query
from sqlalchemy.engine import Engine

from callctl.api.auth import tenant
from callctl.api.deps import Settings, engine, settings
from callctl.api.schemas import BindingIn, BindingOut, BindingPage, ExtendIn, PathId, UpdateIn, text_query
from callctl.core.bounds import MAX_ID
from callctl.core.enums import BindingView
from callctl.errors import ProvisionError
from callctl.store import bindings
from callctl.store.tokens import Principal

log = structlog.get_logger("callctl.api")
router = APIRouter(prefix="/v1/bindings", tags=["bindings"])


@router.post("", status_code=201, response_model=BindingOut)
def create_binding(body: BindingIn, who: Principal = Depends(tenant), db: Engine = Depends(engine),
                   cfg: Settings = Depends(settings)):
    made = bindings.bind(
        db, who.tenant_name, body.customer, mode=body.mode, other_party=body.other_party,
        reference=body.reference, expires_at=body.expires_at, ttl_seconds=body.ttl_seconds,
        region=cfg.region, extension_digits=cfg.extension_digits, purposes=body.purposes, profile=body.profile,
        quarantine=cfg.expiry_quarantine,
    )
    log.info("binding created", binding=made["id"], tenant=who.tenant_id, x=made["x"])
    return made


@router.get("", response_model=BindingPage)
def list_bindings(
    reference: str | None = text_query(max_length=100),
    status: BindingView | None = None,
    after: int = Query(0, ge=0, le=MAX_ID, description="the `next` of the previous page"),
    limit: int = Query(100, ge=1, le=bindings.MAX_PAGE),
    who: Principal = Depends(tenant),
    db: Engine = Depends(engine),
):
    return bindings.list_bindings(db, tenant_id=who.tenant_id, reference=reference, status=status,
                                   after=after, limit=limit)


@router.get("/{binding_id}", response_model=BindingOut)
def get_binding(binding_id: PathId, who: Principal = Depends(tenant), db: Engine = Depends(engine)):
    return bindings.get_binding(db, binding_id, tenant_id=who.tenant_id)


@router.post("/{binding_id}/extend", response_model=BindingOut)
def extend_binding(binding_id: PathId, body: ExtendIn, who: Principal = Depends(tenant), db: Engine = Depends(engine)):
    if not body.model_fields_set:
        raise ProvisionError("invalid_expiry", "give expires_at (null: never expires) or ttl_seconds")
    return bindings.extend_binding(db, binding_id, body.expires_at, ttl_seconds=body.ttl_seconds,
                                    tenant_id=who.tenant_id)


@router.patch("/{binding_id}", response_model=BindingOut)
def update_binding(binding_id: PathId, body: UpdateIn, who: Principal = Depends(tenant), db: Engine = Depends(engine),
                   cfg: Settings = Depends(settings)):
    if body.customer is None and body.reference is None:
        raise ProvisionError("invalid_request", "give customer and/or reference")
    return bindings.update_binding(db, binding_id, customer=body.customer, reference=body.reference,
                                    tenant_id=who.tenant_id, region=cfg.region)


@router.delete("/{binding_id}", response_model=BindingOut)
def delete_binding(binding_id: PathId, who: Principal = Depends(tenant), db: Engine = Depends(engine),
                   cfg: Settings = Depends(settings)):
    """End the binding (calls in progress go on); its X rests in quarantine when it was the last on X."""
    ended = bindings.unbind(db, binding_id, cfg.quarantine, tenant_id=who.tenant_id)
    log.info("binding ended", binding=binding_id, tenant=who.tenant_id)
    return ended
