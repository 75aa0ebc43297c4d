"""The decision core: who may reach whom through a virtual number X, right now.

Plain functions over plain data; the store gathers the facts, the PBX adapters act on
the decision. Nothing here does I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, time
from enum import StrEnum
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


class Reason(StrEnum):
    UNKNOWN_NUMBER = "unknown_number"
    UNKNOWN_CALLER = "unknown_caller"
    EXPIRED = "expired"
    BLOCKED = "blocked"
    OUTSIDE_HOURS = "outside_hours"  # the tenant called a customer outside its calling hours
    UNAVAILABLE = "unavailable"


class Direction(StrEnum):
    TO_CUSTOMER = "to_customer"  # the tenant's side calls the customer
    FROM_CUSTOMER = "from_customer"  # the customer calls the tenant's side


class Mode(StrEnum):
    AXN = "AXN"
    AXB = "AXB"
    AXE = "AXE"


BLOCK_BOTH = "both"


@dataclass(frozen=True)
class TenantFacts:
    id: int
    hotline: str
    caller_is_agent: bool  # the caller matches one of the tenant's numbers or prefixes
    strict: bool
    ring_timeout: int
    max_call_seconds: int
    # Calls to customers only in [calls_from, calls_until) local time in time_zone;
    # calls_from > calls_until crosses midnight, equal means all day.
    time_zone: str = "Asia/Shanghai"
    calls_from: time = time(8, 0)
    calls_until: time = time(21, 0)


@dataclass(frozen=True)
class BindingFacts:
    id: int
    mode: Mode
    party_a: str  # the customer
    party_b: str | None = None  # AXB: the other party
    extension: str | None = None  # AXE
    expires_at: datetime | None = None


@dataclass(frozen=True)
class BlockFacts:
    scope: str  # binding | caller | number | tenant
    direction: str  # to_customer | from_customer | both
    binding_id: int | None = None
    caller: str | None = None
    starts_at: datetime | None = None
    ends_at: datetime | None = None

    def active(self, now: datetime) -> bool:
        return (self.starts_at is None or self.starts_at <= now) and (
            self.ends_at is None or now < self.ends_at
        )


@dataclass(frozen=True)
class NumberFacts:
    """What the store knows about X at call time. None when X is not ours."""
    x: str
    tenant: TenantFacts
    bindings: tuple[BindingFacts, ...] = ()  # active bindings on X
    blocks: tuple[BlockFacts, ...] = field(default=())  # candidate blocks (filtered here)


@dataclass(frozen=True)
class Bridge:
    destination: str
    present: str
    ring_timeout: int
    max_seconds: int
    binding_id: int
    tenant_id: int
    direction: Direction
    action: str = "bridge"


@dataclass(frozen=True)
class Reject:
    reason: Reason
    tenant_id: int | None = None
    binding_id: int | None = None
    direction: Direction | None = None
    action: str = "reject"


Decision = Bridge | Reject


def decide(caller: str | None, now: datetime, facts: NumberFacts | None) -> Decision:
    """Decide a call from `caller` (E.164 or None when withheld) to X at `now`."""
    if facts is None or not facts.bindings:
        return Reject(Reason.UNKNOWN_NUMBER, tenant_id=facts.tenant.id if facts else None)
    tenant = facts.tenant
    found = _match(caller, tenant, facts.bindings)
    if found is None:
        return Reject(Reason.UNKNOWN_CALLER, tenant_id=tenant.id)
    binding, direction, destination = found
    reject = _rejecter(tenant.id, binding.id, direction)
    if binding.expires_at is not None and now >= binding.expires_at:
        return reject(Reason.EXPIRED)
    if any(_blocks(block, binding, caller, direction, now) for block in facts.blocks):
        return reject(Reason.BLOCKED)
    if direction == Direction.TO_CUSTOMER:  # customers may always call the tenant
        open_now = within_hours(now, tenant.time_zone, tenant.calls_from, tenant.calls_until)
        if open_now is None:  # a zone this system does not know: fail closed
            return reject(Reason.UNAVAILABLE)
        if not open_now:
            return reject(Reason.OUTSIDE_HOURS)
    return Bridge(
        destination=destination,
        present=facts.x,
        ring_timeout=tenant.ring_timeout,
        max_seconds=tenant.max_call_seconds,
        binding_id=binding.id,
        tenant_id=tenant.id,
        direction=direction,
    )


def within_hours(now: datetime, zone: str, start: time, end: time) -> bool | None:
    """Is `now` inside [start, end) on the wall clock of `zone`? None for an unknown zone."""
    tz = _zone(zone)
    if tz is None:
        return None
    local = now.astimezone(tz).time().replace(tzinfo=None)
    if start == end:
        return True
    if start < end:
        return start <= local < end
    return local >= start or local < end  # e.g. 22:00-06:00 crosses midnight


def known_zone(name: str) -> bool:
    return _zone(name) is not None


@lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def _rejecter(tenant_id: int, binding_id: int, direction: Direction):
    return lambda reason: Reject(reason, tenant_id, binding_id, direction)


def _match(
    caller: str | None, tenant: TenantFacts, bindings: tuple[BindingFacts, ...]
) -> tuple[BindingFacts, Direction, str] | None:
    """Pick the binding the call belongs to, its direction and where it goes."""
    mode = bindings[0].mode
    if mode == Mode.AXB:
        # (X, caller) picks the pair; nobody else reaches anyone through X.
        for binding in bindings:
            if caller is not None and caller == binding.party_a and binding.party_b:
                return binding, Direction.FROM_CUSTOMER, binding.party_b
            if caller is not None and caller == binding.party_b:
                return binding, Direction.TO_CUSTOMER, binding.party_a
        return None
    # AXN (and AXE once an extension has chosen the binding): one binding on X.
    binding = bindings[0]
    if caller is not None and caller == binding.party_a:
        return binding, Direction.FROM_CUSTOMER, tenant.hotline
    if tenant.caller_is_agent:
        return binding, Direction.TO_CUSTOMER, binding.party_a
    if tenant.strict:
        return None
    # A lenient tenant sends strangers to its hotline; they never reach the customer.
    return binding, Direction.FROM_CUSTOMER, tenant.hotline


def _blocks(
    block: BlockFacts,
    binding: BindingFacts,
    caller: str | None,
    direction: Direction,
    now: datetime,
) -> bool:
    if not block.active(now):
        return False
    if block.direction != BLOCK_BOTH and block.direction != direction:
        return False
    if block.scope == "binding":
        return block.binding_id == binding.id
    if block.scope == "caller":
        return caller is not None and block.caller == caller
    return block.scope in ("number", "tenant")  # the store fetched them for this X/tenant
