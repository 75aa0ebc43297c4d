"""/v1/blacklist: the shared blacklist as a tenant may see it (tenant tokens)."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from sqlalchemy.engine import Engine

from callctl.api.auth import tenant
from callctl.api.deps import engine
from callctl.store import blacklist
from callctl.store.tokens import Principal

router = APIRouter(prefix="/v1/blacklist", tags=["blacklist"])


@router.get("")
def tenant_blacklist(who: Principal = Depends(tenant), db: Engine = Depends(engine)):
    """The shared blacklist as this tenant may see it: entries on its own callers or
    carrying its evidence, with its own evidence only (masked numbers)."""
    return blacklist.tenant_entries(db, who.tenant_name)
