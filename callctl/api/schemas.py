"""The API's request and response bodies (pydantic). Requests forbid unknown fields;
numbers in responses are masked (RevealOut is the one exception, under an audited grant)."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import Path, Query
from pydantic import BaseModel, ConfigDict, Field

from callctl.core.bounds import MAX_ID, MAX_SECONDS, PRINTABLE_PATTERN
from callctl.core.decision import Mode
from callctl.core.enums import BlockDirection, BlockScope, RevealParty, RevealScenario


# Every bound the server enforces on an input is stated here, so the OpenAPI document
# says it (callctl/core/bounds.py): ids the database can hold, TTLs and durations of at
# most a century, text without control characters (PostgreSQL refuses NUL).
Id = Annotated[int, Field(ge=1, le=MAX_ID)]
Seconds = Annotated[int, Field(ge=1, le=MAX_SECONDS)]
PathId = Annotated[int, Path(ge=1, le=MAX_ID)]
QueryId = Annotated[int | None, Query(ge=1, le=MAX_ID)]


def text(default=..., *, min_length: int | None = None, max_length: int, **kw):
    """A text field: printable, at most max_length characters."""
    return Field(default, min_length=min_length, max_length=max_length, pattern=PRINTABLE_PATTERN, **kw)


def text_query(default=None, *, min_length: int | None = None, max_length: int, **kw):
    return Query(default, min_length=min_length, max_length=max_length, pattern=PRINTABLE_PATTERN, **kw)


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BindingIn(Body):
    customer: str = text(min_length=1, max_length=40, description="the customer's real number (A), E.164 or national")
    mode: Mode = Mode.AXN
    other_party: str | None = text(None, min_length=1, max_length=40,
                                   description="AXB: the other party's real number (B)")
    reference: str | None = text(None, max_length=100, description="e.g. the policy number")
    expires_at: datetime | None = Field(None, description="long-term: ISO date-time with zone, in the future")
    ttl_seconds: Seconds | None = Field(None, description="temporary: seconds from now")
    purposes: list[Literal["service", "claims", "renewal", "marketing"]] | None = Field(
        None, description="purposes of calls the customer accepts; default all but marketing")
    profile: Literal["elderly", "claims"] | None = Field(None, description="protection profile")


class ExtendIn(Body):
    expires_at: datetime | None = Field(None, description="new expiry (ISO, with zone); null: never expires")
    ttl_seconds: Seconds | None = Field(None, description="or: seconds from now")


class UpdateIn(Body):
    customer: str | None = text(None, min_length=1, max_length=40, description="the customer's new real number")
    reference: str | None = text(None, max_length=100)


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


# Quiet hours as store/inputs.py parse_hours reads them (ASCII digits), or '' to clear.
QUIET_HOURS = r"^$|^([01][0-9]|2[0-3]):[0-5][0-9]-(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$"


class PreferenceIn(Body):
    """The customer's word, from the insurer's app: at least one of calls, quiet_hours,
    channel (else 422 nothing_to_change), with the customer's consent."""

    customer: str = text(min_length=1, max_length=40, description="the customer's number")
    calls: Literal["allowed", "none", "service_only"] | None = None
    quiet_hours: str | None = Field(None, max_length=11, pattern=QUIET_HOURS, description=(
        "HH:MM-HH:MM in the tenant's zone (an end before the start crosses midnight; the two must differ: "
        "quiet all day is calls none); '' clears"))
    channel: Literal["phone", "app", "sms", "none"] | None = None
    consent_source: str = text(min_length=1, max_length=100, description="where the customer said so, e.g. app")
    consent_at: datetime = Field(description="when the customer said so (ISO, with zone), not in the future")


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
    scope: BlockScope = Field(
        description="binding (binding_id), caller (tenant + caller), number (number = X), tenant (a suspension)")
    direction: BlockDirection
    reason: str = text(min_length=1, max_length=500, description="why; free text without phone numbers")
    by: str = text(min_length=1, max_length=80, description="the person who sets it")
    tenant: str | None = text(None, min_length=1, max_length=100)
    binding_id: Id | None = None
    number: str | None = text(None, min_length=1, max_length=40, description="the virtual number X")
    caller: str | None = text(None, min_length=1, max_length=40, description="the caller's real number")
    starts_at: datetime | None = Field(None, description="ISO date-time with zone; default now")
    ends_at: datetime | None = Field(None, description="ISO date-time with zone; default: until lifted")
    duration_seconds: Seconds | None = Field(None, description="or: seconds from the start")


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
    binding_id: Id
    party: RevealParty = Field(RevealParty.A, description="a: the customer; b: AXB's other party")
    scenario: RevealScenario
    case_reference: str = text(min_length=1, max_length=100)
    max_uses: int = Field(1, ge=1, le=100)
    ttl_seconds: int = Field(3600, ge=60, le=7 * 86400, description="how long the grant lasts once approved")


class DecisionIn(Body):
    note: str = text("", max_length=500)


class BlacklistIn(Body):
    caller: str = text(min_length=1, max_length=40, description="the caller's number")
    reason: str = text(min_length=1, max_length=500, description="why; free text without phone numbers")
    findings: list[Id] = Field([], max_length=1000, description="evidence: findings about this caller")
    cdrs: list[Id] = Field([], max_length=1000, description="evidence: CDRs of calls from this caller")
    seconds: Seconds | None = Field(None, description="in force this long from the second approval; "
                                                      "default: until lifted")


class AppealIn(Body):
    note: str = text(min_length=1, max_length=1000, description="the appeal's grounds")


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
