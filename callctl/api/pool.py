"""/v1/pool: the tenant's virtual numbers by state (tenant tokens)."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from sqlalchemy.engine import Engine

from callctl.api.auth import tenant
from callctl.api.deps import engine
from callctl.api.schemas import PoolOut
from callctl.store.pool import pool_status
from callctl.store.tokens import Principal

router = APIRouter(prefix="/v1/pool", tags=["pool"])


@router.get("", response_model=PoolOut)
def pool(who: Principal = Depends(tenant), db: Engine = Depends(engine)):
    """How many of the tenant's virtual numbers are free, bound, quarantined, disabled."""
    return pool_status(db, who.tenant_name)
