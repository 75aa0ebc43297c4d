"""Exports: /exports/regulator and the live feed /regulator/events (regulator tokens, and
they read nothing else); the tenant's EAST contact register /v1/exports/contacts."""
from __future__ import annotations

from typing import Literal

import structlog
from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response, StreamingResponse
from sqlalchemy.engine import Engine

from callctl import feed, register
from callctl import regulator as export
from callctl.api.auth import regulator, tenant
from callctl.api.deps import engine
from callctl.store.tokens import Principal

log = structlog.get_logger("callctl.api")
router = APIRouter(tags=["exports"])


@router.get("/exports/regulator",
            responses={200: {"content": {media: {} for media in export.MEDIA_TYPES.values()}}})
def export_regulator(
    start: str = Query(alias="from", max_length=40, description="ISO date (UTC) or date-time with zone"),
    end: str = Query(alias="to", max_length=40, description="exclusive end, same forms"),
    format: Literal["json", "csv", "html"] = "json",
    who: Principal = Depends(regulator),
    db: Engine = Depends(engine),
):
    """The regulator's export (`callctl export regulator`): contact statistics per tenant
    and per day, findings and reveals. Regulator tokens only."""
    first, last = export.period(start, end)
    rendered = export.RENDER[format](export.report(db, first, last))
    log.info("regulator export read", token=who.token_id, start=first.isoformat(), end=last.isoformat(),
             format=format)
    return Response(rendered, media_type=export.MEDIA_TYPES[format])


@router.get("/regulator/events")
def regulator_events(
    after: str | None = Query(None, max_length=200, description="a cursor from `next` or an event; none: from the start"),
    limit: int = Query(100, ge=1, le=feed.MAX_LIMIT),
    who: Principal = Depends(regulator),
    db: Engine = Depends(engine),
):
    """The live feed (callctl/feed.py): contact-behaviour events after the cursor, in
    order; {"events", "next", "more"}. Pass `next` back to continue; no event is lost or
    repeated. Regulator tokens only."""
    result = feed.page(db, after, limit)
    log.info("regulator feed read", token=who.token_id, events=len(result["events"]))
    return result


@router.get("/v1/exports/contacts", responses={200: {"content": {"text/csv": {}}}})
def contacts_register(
    as_of: str = Query(max_length=40, description="YYYY-MM-DD (end of that day, the tenant's zone) or ISO date-time"),
    who: Principal = Depends(tenant),
    db: Engine = Depends(engine),
):
    """The EAST contact register of this tenant (docs/regulator.md): one CSV row per
    policy reference with the virtual number standing for the customer's contact."""
    rows = register.rows(db, who.tenant_name, as_of)  # a bad date is a 422 here, before any row
    return StreamingResponse(register.csv_lines(rows), media_type="text/csv; charset=utf-8")
