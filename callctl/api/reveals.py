"""/v1/reveals and /v1/audit: the one place a real number comes out, for a claim,
complaint or AML case (platform tokens issued to a named person). Every step, refusals
included, is in the audit chain."""
from __future__ import annotations

from typing import Literal

import structlog
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from sqlalchemy.engine import Engine

from callctl.api.auth import person
from callctl.api.deps import engine
from callctl.api.schemas import DecisionIn, GrantOut, PathId, QueryId, RevealIn, RevealOut
from callctl.store import reveal

log = structlog.get_logger("callctl.api")
router = APIRouter(tags=["reveals"])


@router.post("/v1/reveals", status_code=201, response_model=GrantOut)
def request_reveal(body: RevealIn, by: str = Depends(person), db: Engine = Depends(engine)):
    return reveal.request(db, body.binding_id, body.party, body.scenario, body.case_reference, by,
                          max_uses=body.max_uses, ttl_seconds=body.ttl_seconds)


@router.get("/v1/reveals", response_model=list[GrantOut])
def list_reveals(binding_id: QueryId = None, _by: str = Depends(person), db: Engine = Depends(engine)):
    return reveal.list_grants(db, binding_id)


@router.post("/v1/reveals/{grant_id}/approve", response_model=GrantOut)
def approve_reveal(grant_id: PathId, body: DecisionIn, by: str = Depends(person), db: Engine = Depends(engine)):
    """A second person approves: the grant is active from now for its ttl_seconds."""
    return reveal.approve(db, grant_id, by, body.note)


@router.post("/v1/reveals/{grant_id}/refuse", response_model=GrantOut)
def refuse_reveal(grant_id: PathId, body: DecisionIn, by: str = Depends(person), db: Engine = Depends(engine)):
    return reveal.refuse(db, grant_id, by, body.note)


@router.post("/v1/reveals/{grant_id}/use", response_model=RevealOut)
def use_reveal(grant_id: PathId, by: str = Depends(person), db: Engine = Depends(engine)):
    """The real number, only under an active grant and only for its requester."""
    shown = reveal.use(db, grant_id, by)
    log.info("reveal used", grant=grant_id, by=by)
    return JSONResponse(shown, headers={"Cache-Control": "no-store"})


@router.get("/v1/audit")
def audit_export(format: Literal["json", "csv"] = "json", _by: str = Depends(person), db: Engine = Depends(engine)):
    """The audit chain, with the result of verifying it (X-Audit-Verified)."""
    try:
        verified = reveal.verify(db)["ok"]
    except reveal.CheckpointError:  # a checkpoint file not signed with the audit key
        verified = False
    return Response(reveal.export(db, format), headers={"X-Audit-Verified": str(verified).lower()},
                    media_type="text/csv" if format == "csv" else "application/json")
