"""/v1/blocks: the platform's control (platform tokens), thin wrappers over
callctl.store.blocks. In force on the very next call on every daemon (nothing is cached).
No caller filter on GET: a real number does not belong in a URL (access logs)."""
from __future__ import annotations

import structlog
from fastapi import APIRouter, Depends, Query
from sqlalchemy.engine import Engine

from callctl.api.auth import platform
from callctl.api.deps import Settings, engine, settings
from callctl.api.schemas import BlockIn, BlockOut, PathId, QueryId, text_query
from callctl.core.enums import BlockScope
from callctl.store import blocks
from callctl.store.tokens import Principal

log = structlog.get_logger("callctl.api")
router = APIRouter(prefix="/v1/blocks", tags=["blocks"])


@router.post("", status_code=201, response_model=BlockOut)
def add_block(body: BlockIn, who: Principal = Depends(platform), db: Engine = Depends(engine),
              cfg: Settings = Depends(settings)):
    made = blocks.add_block(
        db, scope=body.scope, direction=body.direction, reason=body.reason,
        created_by=f"{body.by} (api token {who.token_id})", tenant=body.tenant, binding_id=body.binding_id,
        number=body.number, caller=body.caller, starts_at=body.starts_at, ends_at=body.ends_at,
        duration_seconds=body.duration_seconds, region=cfg.region,
    )
    log.info("block added", block=made["id"], scope=made["scope"], direction=made["direction"])
    return made


@router.get("", response_model=list[BlockOut])
def list_blocks(
    tenant: str | None = text_query(min_length=1, max_length=100),
    scope: BlockScope | None = None,
    binding_id: QueryId = None,
    number: str | None = text_query(min_length=1, max_length=40, description="the virtual number X"),
    active: bool = Query(False, description="only blocks in force now"),
    limit: int = Query(100, ge=1, le=10000),
    who: Principal = Depends(platform),
    db: Engine = Depends(engine),
    cfg: Settings = Depends(settings),
):
    return blocks.list_blocks(db, tenant=tenant, scope=scope, binding_id=binding_id, number=number,
                              active=active, limit=limit, region=cfg.region)


@router.delete("/{block_id}", response_model=BlockOut)
def lift_block(block_id: PathId, by: str = text_query(..., min_length=1, max_length=80, description="the person who lifts it"),
               who: Principal = Depends(platform), db: Engine = Depends(engine)):
    """Lift the block: its end becomes now; the block stays on record as evidence."""
    lifted = blocks.lift_block(db, block_id, f"{by} (api token {who.token_id})")
    log.info("block lifted", block=block_id)
    return lifted
