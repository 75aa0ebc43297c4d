"""/v1/cdrs and /v1/findings: the insurer's read API (tenant tokens): its own calls and
findings, masked, newest first, the CLI's filters, keyset cursors."""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query
from sqlalchemy.engine import Engine

from callctl.api.auth import tenant
from callctl.api.deps import Settings, engine, settings
from callctl.api.schemas import CdrPage, QueryId
from callctl.core.times import parse_time
from callctl.store import bindings, cdrs
from callctl.store.tokens import Principal

router = APIRouter(tags=["cdrs"])


@router.get("/v1/cdrs", response_model=CdrPage)
def cdr_page(
    x: str | None = Query(None, max_length=40), binding: QueryId = None,
    since: str | None = Query(None, max_length=40, description="ISO with zone, or an age: 15m, 2h, 7d"),
    until: str | None = Query(None, max_length=40),
    decision: Literal["bridged", "rejected"] | None = None,
    reason: str | None = Query(None, max_length=40),
    limit: int = Query(100, ge=1, le=bindings.MAX_PAGE), cursor: str | None = Query(None, max_length=200),
    who: Principal = Depends(tenant), db: Engine = Depends(engine), cfg: Settings = Depends(settings),
):
    where = cdrs.CdrFilter.parse(tenant=who.tenant_name, x=x, binding=binding, since=since, until=until,
                                 decision=decision, reason=reason, region=cfg.region)
    return cdrs.page_cdrs(db, where, limit, cursor)


@router.get("/v1/findings", response_model=CdrPage)
def finding_page(
    rule: str | None = Query(None, max_length=32),
    since: str | None = Query(None, max_length=40, description="window ends at or after: ISO, or 15m/2h/7d"),
    limit: int = Query(100, ge=1, le=bindings.MAX_PAGE), cursor: str | None = Query(None, max_length=200),
    who: Principal = Depends(tenant), db: Engine = Depends(engine),
):
    from callctl.anomaly.job import page_findings

    start = parse_time(since, "since", code="invalid_filter")
    return page_findings(db, who.tenant_id, rule=rule, since=start, limit=limit, cursor=cursor)
