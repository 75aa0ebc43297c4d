"""The provisioning HTTP API (FastAPI): bindings and pool status for a tenant's systems.

Every request carries `Authorization: Bearer <token>` (`callctl token create`). A token
has a role; the binding and pool endpoints take 'tenant' tokens and act only on that
tenant's bindings: another tenant's binding is 404, exactly like a missing one.
`GET /exports/regulator` takes 'regulator' tokens, and they can read nothing else. Real
numbers go in (customer, other_party) and never come out: responses carry them masked.
Every error is JSON `{"error": {"code": ..., "message": ...}}` with a stable code
(the codes of callctl.store.provision.ProvisionError, plus the HTTP-level ones below).
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Literal

import structlog
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException

from callctl import feed, register, regulator
from callctl.api.limits import BODY_TIMEOUT, MAX_BODY_BYTES, BodyGuard
from callctl.store import blacklist, blocks, cdrs, customers, provision, reveal
from callctl.store.provision import ProvisionError
from callctl.store.tokens import Principal, authenticate

log = structlog.get_logger("callctl.api")

# ProvisionError codes that are not 422 (bad input).
STATUS = {
    "binding_not_found": 404,
    "tenant_not_found": 404,
    "number_not_found": 404,
    "block_not_found": 404,
    "block_ended": 409,
    "binding_ended": 409,
    "binding_expired": 409,
    "webhook_not_found": 404,
    "conflict": 409,
    "party_conflict": 409,
    "pool_exhausted": 409,
    "pool_busy": 503,
    "grant_not_found": 404,
    "grant_decided": 409,
    # A refused reveal (callctl.store.reveal): logged in the audit chain, then 403.
    "self_approval": 403,
    "no_grant": 403,
    "not_the_requester": 403,
    "grant_requested": 403,
    "grant_refused": 403,
    "grant_expired": 403,
    "grant_used_up": 403,
    "blacklist_not_found": 404,
}
HTTP_CODES = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BindingIn(Body):
    customer: str = Field(max_length=40, description="the customer's real number (A), E.164 or national")
    mode: Literal["AXN", "AXB", "AXE"] = "AXN"
    other_party: str | None = Field(None, max_length=40, description="AXB: the other party's real number (B)")
    reference: str | None = Field(None, max_length=100, description="e.g. the policy number")
    expires_at: datetime | None = Field(None, description="long-term: ISO date-time with zone")
    ttl_seconds: int | None = Field(None, description="temporary: seconds from now")
    purposes: list[Literal["service", "claims", "renewal", "marketing"]] | None = Field(
        None, description="purposes of calls the customer accepts; default all but marketing")
    profile: Literal["elderly", "claims"] | None = Field(None, description="protection profile")


class ExtendIn(Body):
    expires_at: datetime | None = Field(None, description="new expiry (ISO, with zone); null: never expires")
    ttl_seconds: int | None = Field(None, description="or: seconds from now")


class UpdateIn(Body):
    customer: str | None = Field(None, max_length=40, description="the customer's new real number")
    reference: str | None = Field(None, max_length=100)


class BindingOut(BaseModel):
    id: int
    tenant: str
    x: str = Field(description="the virtual number (the tenant's own)")
    mode: str
    customer: str = Field(description="masked, e.g. +86138****5678")
    other_party: str | None = Field(description="masked")
    extension: str | None
    reference: str | None
    status: str = Field(description="active, expired (past its expiry) or ended (unbound)")
    purposes: list[str] = Field(description="purposes of calls the customer accepts")
    profile: str | None
    expires_at: datetime | None
    created_at: datetime | None
    ended_at: datetime | None


class BindingPage(BaseModel):
    items: list[BindingOut]
    next: int | None = Field(description="pass as `after` for the next page; null on the last page")


class PreferenceIn(Body):
    customer: str = Field(max_length=40, description="the customer's number")
    calls: Literal["allowed", "none", "service_only"] | None = None
    quiet_hours: str | None = Field(None, max_length=11, description="HH:MM-HH:MM in the tenant's zone; '' clears")
    channel: Literal["phone", "app", "sms", "none"] | None = None
    consent_source: str = Field(min_length=1, max_length=100, description="where the customer said so, e.g. app")
    consent_at: datetime = Field(description="when the customer said so (ISO, with zone)")


class PreferenceOut(BaseModel):
    tenant: str
    customer: str = Field(description="masked")
    calls: str
    quiet_hours: str | None
    channel: str
    consent_source: str | None
    consent_at: str | None
    updated_by: str | None
    updated_at: str | None


class CdrPage(BaseModel):
    items: list[dict]
    next: str | None = Field(description="pass as `cursor` for the next (older) page; null on the last")


class PoolOut(BaseModel):
    free: int
    bound: int
    quarantined: int
    disabled: int


class BlockIn(Body):
    scope: Literal["binding", "caller", "number", "tenant"] = Field(
        description="binding (binding_id), caller (tenant + caller), number (number = X), tenant (a suspension)")
    direction: Literal["to_customer", "from_customer", "both"]
    reason: str = Field(max_length=500, description="why; free text without phone numbers")
    by: str = Field(min_length=1, max_length=80, description="the person who sets it")
    tenant: str | None = Field(None, max_length=100)
    binding_id: int | None = None
    number: str | None = Field(None, max_length=40, description="the virtual number X")
    caller: str | None = Field(None, max_length=40, description="the caller's real number")
    starts_at: datetime | None = Field(None, description="ISO date-time with zone; default now")
    ends_at: datetime | None = Field(None, description="ISO date-time with zone; default: until lifted")
    duration_seconds: int | None = Field(None, description="or: seconds from the start")


class BlockOut(BaseModel):
    id: int
    tenant: str
    scope: str
    direction: str
    binding_id: int | None
    x: str | None
    caller: str | None = Field(description="masked")
    reason: str
    created_by: str
    starts_at: datetime
    ends_at: datetime | None
    lifted_by: str | None
    status: str = Field(description="scheduled, active or ended")
    created_at: datetime | None


class RevealIn(Body):
    binding_id: int
    party: Literal["a", "b"] = Field("a", description="a: the customer; b: AXB's other party")
    scenario: Literal["claim", "complaint", "aml"]
    case_reference: str = Field(min_length=1, max_length=100)
    max_uses: int = Field(1, ge=1, le=100)
    ttl_seconds: int = Field(3600, ge=60, le=7 * 86400, description="how long the grant lasts once approved")


class DecisionIn(Body):
    note: str = Field("", max_length=500)


class GrantOut(BaseModel):
    id: int
    binding_id: int
    party: str
    scenario: str
    case_reference: str
    requested_by: str
    requested_at: str
    status: str
    decided_by: str | None
    decided_at: str | None
    expires_at: str | None
    uses: int
    max_uses: int
    ttl_seconds: int
    active: bool


class RevealOut(BaseModel):
    grant: GrantOut
    number: str = Field(description="the real number, E.164: the only response that carries one")


class ErrorOut(BaseModel):
    error: dict[str, str]


ERRORS = {s: {"model": ErrorOut} for s in (401, 403, 404, 408, 409, 413, 422, 503)}


def create_app(engine: Engine, *, quarantine: timedelta, region: str = "CN", extension_digits: int = 4,
               max_body_bytes: int = MAX_BODY_BYTES, body_timeout: float = BODY_TIMEOUT) -> FastAPI:
    app = FastAPI(
        title="callctl provisioning API",
        version="1",
        description=__doc__,
        responses=ERRORS,
    )
    # A body is read only after its token checks out, capped and timed (limits.py).
    app.add_middleware(BodyGuard, authenticate=lambda token: authenticate(engine, token),
                       max_bytes=max_body_bytes, timeout=body_timeout)
    bearer = HTTPBearer(auto_error=False)

    def principal(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
        checked = getattr(request.state, "principal", None)  # by BodyGuard, before the body
        if checked is not None:
            return checked
        if credentials is None:
            raise ApiError(401, "unauthorized", "send Authorization: Bearer <token>")
        found = authenticate(engine, credentials.credentials)
        if found is None:
            raise ApiError(401, "unauthorized", "unknown or revoked token")
        return found

    def role(*roles: str):
        """A dependency admitting only these token roles (new roles add their own endpoints)."""

        def check(who: Principal = Depends(principal)) -> Principal:
            if who.role not in roles:
                raise ApiError(403, "forbidden", f"this needs a {' or '.join(roles)} token")
            return who

        return check

    tenant = role("tenant")
    platform = role("platform")
    regulator_role = role("regulator")

    @app.exception_handler(ApiError)
    def _api_error(_request: Request, exc: ApiError):
        return error(exc.status, exc.code, str(exc))

    @app.exception_handler(ProvisionError)
    def _provision_error(_request: Request, exc: ProvisionError):
        return error(STATUS.get(exc.code, 422), exc.code, str(exc))

    @app.exception_handler(RequestValidationError)
    def _invalid(_request: Request, exc: RequestValidationError):
        # Location and message only: pydantic's 'input' could echo a real number.
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return error(422, "invalid_request", problems)

    @app.exception_handler(HTTPException)
    def _http(_request: Request, exc: HTTPException):
        return error(exc.status_code, HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail))

    @app.exception_handler(DBAPIError)
    def _database(_request: Request, exc: DBAPIError):
        # The statement and its parameters stay out of the log: they may hold a real number.
        log.error("database error", error=type(exc.orig).__name__)
        return error(503, "unavailable", "the database cannot answer; retry")

    @app.post("/v1/bindings", status_code=201, response_model=BindingOut, tags=["bindings"])
    def create_binding(body: BindingIn, who: Principal = Depends(tenant)):
        made = provision.bind(
            engine, who.tenant_name, body.customer, mode=body.mode, other_party=body.other_party,
            reference=body.reference, expires_at=body.expires_at, ttl_seconds=body.ttl_seconds,
            region=region, extension_digits=extension_digits, purposes=body.purposes, profile=body.profile,
            quarantine=quarantine,
        )
        log.info("binding created", binding=made["id"], tenant=who.tenant_id, x=made["x"])
        return made

    @app.get("/v1/bindings", response_model=BindingPage, tags=["bindings"])
    def list_bindings(
        reference: str | None = Query(None, max_length=100),
        status: Literal["active", "expired", "ended"] | None = None,
        after: int = Query(0, ge=0, description="the `next` of the previous page"),
        limit: int = Query(100, ge=1, le=provision.MAX_PAGE),
        who: Principal = Depends(tenant),
    ):
        return provision.list_bindings(engine, tenant_id=who.tenant_id, reference=reference, status=status,
                                       after=after, limit=limit)

    @app.get("/v1/bindings/{binding_id}", response_model=BindingOut, tags=["bindings"])
    def get_binding(binding_id: int, who: Principal = Depends(tenant)):
        return provision.get_binding(engine, binding_id, tenant_id=who.tenant_id)

    @app.post("/v1/bindings/{binding_id}/extend", response_model=BindingOut, tags=["bindings"])
    def extend_binding(binding_id: int, body: ExtendIn, who: Principal = Depends(tenant)):
        if not body.model_fields_set:
            raise ApiError(422, "invalid_expiry", "give expires_at (null: never expires) or ttl_seconds")
        return provision.extend_binding(engine, binding_id, body.expires_at, ttl_seconds=body.ttl_seconds,
                                        tenant_id=who.tenant_id)

    @app.patch("/v1/bindings/{binding_id}", response_model=BindingOut, tags=["bindings"])
    def update_binding(binding_id: int, body: UpdateIn, who: Principal = Depends(tenant)):
        if body.customer is None and body.reference is None:
            raise ApiError(422, "invalid_request", "give customer and/or reference")
        return provision.update_binding(engine, binding_id, customer=body.customer, reference=body.reference,
                                        tenant_id=who.tenant_id, region=region)

    @app.delete("/v1/bindings/{binding_id}", response_model=BindingOut, tags=["bindings"])
    def delete_binding(binding_id: int, who: Principal = Depends(tenant)):
        """End the binding (calls in progress go on); its X rests in quarantine when it was the last on X."""
        ended = provision.unbind(engine, binding_id, quarantine, tenant_id=who.tenant_id)
        log.info("binding ended", binding=binding_id, tenant=who.tenant_id)
        return ended

    @app.get("/v1/pool", response_model=PoolOut, tags=["pool"])
    def pool(who: Principal = Depends(tenant)):
        """How many of the tenant's virtual numbers are free, bound, quarantined, disabled."""
        return provision.pool_status(engine, who.tenant_name)

    # The insurer's read API (issue #16): its own calls and findings, masked, newest first,
    # the CLI's filters, keyset cursors. And the customers' preferences, by number.
    @app.get("/v1/cdrs", response_model=CdrPage, tags=["cdrs"])
    def cdr_page(
        x: str | None = Query(None, max_length=40), binding: int | None = Query(None, ge=1),
        since: str | None = Query(None, max_length=40, description="ISO with zone, or an age: 15m, 2h, 7d"),
        until: str | None = Query(None, max_length=40),
        decision: Literal["bridged", "rejected"] | None = None,
        reason: str | None = Query(None, max_length=40),
        limit: int = Query(100, ge=1, le=provision.MAX_PAGE), cursor: str | None = Query(None, max_length=200),
        who: Principal = Depends(tenant),
    ):
        where = cdrs.CdrFilter.parse(tenant=who.tenant_name, x=x, binding=binding, since=since, until=until,
                                     decision=decision, reason=reason, region=region)
        return cdrs.page_cdrs(engine, where, limit, cursor)

    @app.get("/v1/findings", response_model=CdrPage, tags=["cdrs"])
    def finding_page(
        rule: str | None = Query(None, max_length=32),
        since: str | None = Query(None, max_length=40, description="window ends at or after: ISO, or 15m/2h/7d"),
        limit: int = Query(100, ge=1, le=provision.MAX_PAGE), cursor: str | None = Query(None, max_length=200),
        who: Principal = Depends(tenant),
    ):
        from callctl.anomaly.job import page_findings

        start = cdrs.parse_time(since, datetime.now(timezone.utc), "since")
        return page_findings(engine, who.tenant_id, rule=rule, since=start, limit=limit, cursor=cursor)

    @app.get("/v1/customers/preferences", response_model=PreferenceOut, tags=["customers"])
    def get_preferences(customer: str = Query(max_length=40), who: Principal = Depends(tenant)):
        """The customer's word on this tenant's calls (defaults when they never said)."""
        return customers.get_preference(engine, who.tenant_name, customer, region=region)

    @app.put("/v1/customers/preferences", response_model=PreferenceOut, tags=["customers"])
    def put_preferences(body: PreferenceIn, who: Principal = Depends(tenant)):
        """Set from the insurer's app on the customer's word: consent source and time required.
        Audited; an event for the tenant's webhooks."""
        return customers.set_preference(
            engine, who.tenant_name, body.customer, actor=f"tenant:{who.tenant_name}:{who.name}"[:100],
            calls=body.calls, quiet_hours=body.quiet_hours, channel=body.channel,
            consent_source=body.consent_source, consent_at=body.consent_at, require_consent=True, region=region)

    # Blocks: the platform's control, thin wrappers over callctl.store.blocks. In force on
    # the very next call on every daemon (nothing is cached). No caller filter on GET:
    # a real number does not belong in a URL (access logs).
    @app.post("/v1/blocks", status_code=201, response_model=BlockOut, tags=["blocks"])
    def add_block(body: BlockIn, who: Principal = Depends(platform)):
        made = blocks.add_block(
            engine, scope=body.scope, direction=body.direction, reason=body.reason,
            created_by=f"{body.by} (api token {who.token_id})", tenant=body.tenant, binding_id=body.binding_id,
            number=body.number, caller=body.caller, starts_at=body.starts_at, ends_at=body.ends_at,
            duration_seconds=body.duration_seconds, region=region,
        )
        log.info("block added", block=made["id"], scope=made["scope"], direction=made["direction"])
        return made

    @app.get("/v1/blocks", response_model=list[BlockOut], tags=["blocks"])
    def list_blocks(
        tenant: str | None = Query(None, max_length=100),
        scope: Literal["binding", "caller", "number", "tenant"] | None = None,
        binding_id: int | None = None,
        number: str | None = Query(None, max_length=40, description="the virtual number X"),
        active: bool = Query(False, description="only blocks in force now"),
        limit: int = Query(100, ge=1, le=10000),
        who: Principal = Depends(platform),
    ):
        return blocks.list_blocks(engine, tenant=tenant, scope=scope, binding_id=binding_id, number=number,
                                  active=active, limit=limit, region=region)

    @app.delete("/v1/blocks/{block_id}", response_model=BlockOut, tags=["blocks"])
    def lift_block(block_id: int, by: str = Query(min_length=1, max_length=80, description="the person who lifts it"),
                   who: Principal = Depends(platform)):
        """Lift the block: its end becomes now; the block stays on record as evidence."""
        lifted = blocks.lift_block(engine, block_id, f"{by} (api token {who.token_id})")
        log.info("block lifted", block=block_id)
        return lifted

    # Reveals: the one place a real number comes out, for a claim, complaint or AML case.
    # The person is the one the platform token was issued to (`callctl token create
    # --role platform --name NAME`), never a name typed into the request, so the
    # second-person rule holds. Every step, refusals included, is in the audit chain.
    def person(who: Principal = Depends(platform)) -> str:
        if not who.name or who.name == "platform token":
            raise ApiError(403, "unnamed_token", "reveals need a platform token issued to a named person")
        return who.name

    @app.post("/v1/reveals", status_code=201, response_model=GrantOut, tags=["reveals"])
    def request_reveal(body: RevealIn, by: str = Depends(person)):
        return reveal.request(engine, body.binding_id, body.party, body.scenario, body.case_reference, by,
                              max_uses=body.max_uses, ttl_seconds=body.ttl_seconds)

    @app.get("/v1/reveals", response_model=list[GrantOut], tags=["reveals"])
    def list_reveals(binding_id: int | None = None, _by: str = Depends(person)):
        return reveal.list_grants(engine, binding_id)

    @app.post("/v1/reveals/{grant_id}/approve", response_model=GrantOut, tags=["reveals"])
    def approve_reveal(grant_id: int, body: DecisionIn, by: str = Depends(person)):
        """A second person approves: the grant is active from now for its ttl_seconds."""
        return reveal.approve(engine, grant_id, by, body.note)

    @app.post("/v1/reveals/{grant_id}/refuse", response_model=GrantOut, tags=["reveals"])
    def refuse_reveal(grant_id: int, body: DecisionIn, by: str = Depends(person)):
        return reveal.refuse(engine, grant_id, by, body.note)

    @app.post("/v1/reveals/{grant_id}/use", response_model=RevealOut, tags=["reveals"])
    def use_reveal(grant_id: int, by: str = Depends(person)):
        """The real number, only under an active grant and only for its requester."""
        shown = reveal.use(engine, grant_id, by)
        log.info("reveal used", grant=grant_id, by=by)
        return JSONResponse(shown, headers={"Cache-Control": "no-store"})

    @app.get("/v1/audit", tags=["reveals"])
    def audit_export(format: Literal["json", "csv"] = "json", _by: str = Depends(person)):
        """The audit chain, with the result of verifying it (X-Audit-Verified)."""
        try:
            verified = reveal.verify(engine)["ok"]
        except reveal.CheckpointError:  # a checkpoint file not signed with the audit key
            verified = False
        return Response(reveal.export(engine, format), headers={"X-Audit-Verified": str(verified).lower()},
                        media_type="text/csv" if format == "csv" else "application/json")

    @app.get("/exports/regulator", tags=["exports"],
             responses={200: {"content": {media: {} for media in regulator.MEDIA_TYPES.values()}}})
    def export_regulator(
        start: str = Query(alias="from", max_length=40, description="ISO date (UTC) or date-time with zone"),
        end: str = Query(alias="to", max_length=40, description="exclusive end, same forms"),
        format: Literal["json", "csv", "html"] = "json",
        who: Principal = Depends(regulator_role),
    ):
        """The regulator's export (`callctl export regulator`): contact statistics per tenant
        and per day, findings and reveals. Regulator tokens only."""
        first, last = regulator.period(start, end)
        rendered = regulator.RENDER[format](regulator.report(engine, first, last))
        log.info("regulator export read", token=who.token_id, start=first.isoformat(), end=last.isoformat(),
                 format=format)
        return Response(rendered, media_type=regulator.MEDIA_TYPES[format])

    @app.get("/regulator/events", tags=["exports"])
    def regulator_events(
        after: str | None = Query(None, max_length=200, description="a cursor from `next` or an event; none: from the start"),
        limit: int = Query(100, ge=1, le=feed.MAX_LIMIT),
        who: Principal = Depends(regulator_role),
    ):
        """The live feed (callctl/feed.py): contact-behaviour events after the cursor, in
        order; {"events", "next", "more"}. Pass `next` back to continue; no event is lost or
        repeated. Regulator tokens only."""
        result = feed.page(engine, after, limit)
        log.info("regulator feed read", token=who.token_id, events=len(result["events"]))
        return result

    @app.get("/v1/exports/contacts", tags=["exports"], responses={200: {"content": {"text/csv": {}}}})
    def contacts_register(
        as_of: str = Query(max_length=40, description="YYYY-MM-DD (end of that day, the tenant's zone) or ISO date-time"),
        who: Principal = Depends(tenant),
    ):
        """The EAST contact register of this tenant (docs/regulator.md): one CSV row per
        policy reference with the virtual number standing for the customer's contact."""
        rows = register.rows(engine, who.tenant_name, as_of)  # a bad date is a 422 here, before any row
        return StreamingResponse(register.csv_lines(rows), media_type="text/csv; charset=utf-8")

    @app.get("/v1/blacklist", tags=["blacklist"])
    def tenant_blacklist(who: Principal = Depends(tenant)):
        """The shared blacklist as this tenant may see it: entries on its own callers or
        carrying its evidence, with its own evidence only (masked numbers)."""
        return blacklist.tenant_entries(engine, who.tenant_name)

    return app


def app_from_config() -> FastAPI:
    """The app as configured (conf/callctl.yaml, CALLCTL_* variables): what each worker
    process of `callctl serve api` runs."""
    from callctl import config, logs
    from callctl.store.db import make_engine

    cfg = config.load()
    logs.setup(cfg.log.format, cfg.log.level)
    reveal.use_checkpoint(cfg.audit_checkpoint)  # reveals advance the audit checkpoint
    # db_timeout: no request waits on a dead or hung database longer than that.
    engine = make_engine(cfg.database_url, pool_size=cfg.db_threads, timeout=cfg.db_timeout)
    return create_app(engine, quarantine=timedelta(days=cfg.quarantine_days), region=cfg.region,
                      extension_digits=cfg.axe_extension_digits, max_body_bytes=cfg.api.max_body_bytes,
                      body_timeout=cfg.api.body_timeout)


def _api_health(cfg):
    """/healthz of the API process: ready while its database answers."""
    import asyncio

    from sqlalchemy import text as sql_text
    from sqlalchemy.exc import SQLAlchemyError

    from callctl.store.db import make_engine

    engine = make_engine(cfg.database_url, pool_size=1, timeout=cfg.db_timeout)

    def probe() -> dict[str, str]:
        try:
            with engine.connect() as conn:
                conn.execute(sql_text("SELECT 1"))
            return {"database": "ok"}
        except SQLAlchemyError as exc:
            return {"database": f"not answering ({type(exc).__name__})"}

    async def health() -> dict[str, str]:
        return await asyncio.get_running_loop().run_in_executor(None, probe)

    def outbox_depth() -> float:
        from sqlalchemy import func, select

        from callctl.store.models import WebhookDelivery

        try:
            with engine.connect() as conn:
                return conn.execute(select(func.count()).select_from(WebhookDelivery)
                                    .where(WebhookDelivery.delivered_at.is_(None))).scalar()
        except SQLAlchemyError:
            return float("nan")  # database down: /healthz says so

    from callctl.metrics import OUTBOX_DEPTH

    OUTBOX_DEPTH.set_function(outbox_depth)

    return health


def serve(cfg) -> None:
    """`callctl serve api`: the API on cfg.api.listen until SIGTERM/SIGINT."""
    import uvicorn

    from callctl.metrics import serve_in_thread

    serve_in_thread(cfg.api.metrics_host, cfg.api.metrics_port, _api_health(cfg))
    log.info("api listening", listen=cfg.api.listen, workers=cfg.api.workers, metrics=cfg.api.metrics_listen)
    uvicorn.run("callctl.api.app:app_from_config", factory=True, host=cfg.api.host, port=cfg.api.port,
                workers=cfg.api.workers, access_log=cfg.api.access_log, log_level="warning",
                server_header=False)
