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

from callctl.core.enums import BlockDirection, BlockScope


class Reason(StrEnum):
    UNKNOWN_NUMBER = "unknown_number"
    UNKNOWN_CALLER = "unknown_caller"
    EXPIRED = "expired"
    BLOCKED = "blocked"
    OUTSIDE_HOURS = "outside_hours"  # the tenant called a customer outside its calling hours
    UNAVAILABLE = "unavailable"
    INVALID_EXTENSION = "invalid_extension"  # AXE: wrong or no extension keyed
    OPTED_OUT = "opted_out"  # the customer said no to this tenant's calls (or not now)
    PURPOSE_NOT_ALLOWED = "purpose_not_allowed"  # the caller's purpose is not one the customer accepts
    BLACKLISTED = "blacklisted"  # the caller is on the shared harassment blacklist
    CONCURRENT_LIMIT = "concurrent_limit"  # the tenant has its limit of calls up on this PBX (dialplan)


class Purpose(StrEnum):
    """Why an agent calls: the purpose of the caller group its number belongs to."""
    SERVICE = "service"
    CLAIMS = "claims"
    RENEWAL = "renewal"
    MARKETING = "marketing"


# What a binding accepts unless told otherwise: everything but marketing.
DEFAULT_PURPOSES = frozenset(p.value for p in Purpose if p != Purpose.MARKETING)


class Profile(StrEnum):
    """Protection profiles: customers who get tighter calling hours, anomaly thresholds
    and longer automatic blocks (conf/anomaly.yaml, profiles:)."""
    ELDERLY = "elderly"
    CLAIMS = "claims"


class Calls(StrEnum):
    """The customer's word on one tenant's calls."""
    ALLOWED = "allowed"
    NONE = "none"
    SERVICE_ONLY = "service_only"


class Channel(StrEnum):
    """How the customer prefers the tenant to reach them."""
    PHONE = "phone"
    APP = "app"
    SMS = "sms"
    NONE = "none"


class Direction(StrEnum):
    TO_CUSTOMER = "to_customer"  # the tenant's side calls the customer
    FROM_CUSTOMER = "from_customer"  # the customer calls the tenant's side


class Mode(StrEnum):
    AXN = "AXN"
    AXB = "AXB"
    AXE = "AXE"


BLOCK_BOTH = BlockDirection.BOTH
EXTENSION_TRIES = 2  # AXE: one retry after a wrong or missing extension, then reject


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
    caller_purpose: str | None = None  # the agent's caller group's purpose (None: not an agent)
    max_concurrent_calls: int | None = None  # calls up at once on one PBX; None: no limit


@dataclass(frozen=True)
class BindingFacts:
    id: int
    mode: Mode
    party_a: str  # the customer
    party_b: str | None = None  # AXB: the other party
    extension: str | None = None  # AXE
    expires_at: datetime | None = None
    purposes: frozenset[str] | None = None  # the purposes the customer accepts; None: DEFAULT_PURPOSES
    calls: str | None = None  # the customer's preference for this tenant (Calls); None: allowed
    quiet: tuple[time, time] | None = None  # the customer's own quiet hours, tenant's time zone
    profile: str | None = None  # protection profile (tighter hours: decide's profile_hours)


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
    """What the store knows about X at call time. None when X is not ours.

    Of X's bindings only those that can decide the call: an AXN X's one binding; on an
    AXB or AXE X (shared by 10^k), the caller's, where the caller is a party; after an
    AXE prompt, the keyed extension's. `mode` and `extension_digits` describe X itself."""
    x: str
    tenant: TenantFacts
    bindings: tuple[BindingFacts, ...] = ()  # in id order
    blocks: tuple[BlockFacts, ...] = field(default=())  # candidate blocks (filtered here)
    mode: Mode | None = None  # the mode X serves; None: no active binding on X
    extension_digits: int = 0  # AXE: digits of X's longest extension (the prompt's)
    blacklisted: bool = False  # the caller is on the shared blacklist, in force now


@dataclass(frozen=True)
class Bridge:
    destination: str
    present: str
    ring_timeout: int
    max_seconds: int
    binding_id: int | None  # None: a lenient tenant's stranger on a shared (AXE) X
    tenant_id: int
    direction: Direction
    action: str = "bridge"
    max_concurrent: int | None = None  # the PBX refuses the call past this many of the tenant's
    purpose: str | None = None  # why the customer is called (to_customer only; call_purpose)


@dataclass(frozen=True)
class Reject:
    reason: Reason
    tenant_id: int | None = None
    binding_id: int | None = None
    direction: Direction | None = None
    action: str = "reject"
    purpose: str | None = None  # as Bridge.purpose


@dataclass(frozen=True)
class CollectExtension:
    """AXE: prompt the caller for the k-digit extension, then route again with it."""
    digits: int
    tries: int
    tenant_id: int
    direction: Direction = Direction.TO_CUSTOMER
    binding_id: None = None
    action: str = "extension"
    purpose: str | None = None  # as Bridge.purpose


@dataclass(frozen=True)
class SelfService:
    """A call to the customers' self-service number: the dialplan runs its menu."""
    tenant_id: None = None
    binding_id: None = None
    direction: None = None
    action: str = "selfservice"
    purpose: None = None


Decision = Bridge | Reject | CollectExtension | SelfService


def decide(
    caller: str | None, now: datetime, facts: NumberFacts | None, extension: str | None = None,
    profile_hours: dict[str, tuple[time, time]] | None = None,
) -> Decision:
    """Decide a call from `caller` (E.164 or None when withheld) to X at `now`.

    `extension`: what an AXE caller keyed when prompted ('' for nothing); None before.
    `profile_hours`: protection profile -> the hours its customers may be called, within
    the tenant's own (both must allow the call).
    """
    if facts is None or (extension is None and facts.mode is None):
        return Reject(Reason.UNKNOWN_NUMBER, tenant_id=facts.tenant.id if facts else None)
    tenant = facts.tenant
    bindings = facts.bindings
    mode = facts.mode
    if extension is not None:
        # Only agents are prompted (AXE); the keyed extension picks the customer.
        if not tenant.caller_is_agent:
            return Reject(Reason.UNKNOWN_CALLER, tenant_id=tenant.id)
        bindings = tuple(b for b in bindings if b.mode == Mode.AXE and b.extension == extension)
        if not bindings:
            return Reject(Reason.INVALID_EXTENSION, tenant.id, direction=Direction.TO_CUSTOMER,
                          purpose=call_purpose(tenant))
        mode = Mode.AXE
    elif mode == Mode.AXE and _customer_binding(caller, bindings, now) is None:
        return _axe_prompt(caller, now, facts)
    found = _match(caller, tenant, mode, bindings, now)
    if found is None:
        return Reject(Reason.UNKNOWN_CALLER, tenant_id=tenant.id)
    binding, direction, destination = found
    reject = _rejecter(tenant, binding.id, direction)
    if facts.blacklisted and direction == Direction.TO_CUSTOMER:  # it reaches no customer, any tenant's
        return reject(Reason.BLACKLISTED)
    if binding.expires_at is not None and now >= binding.expires_at:
        return reject(Reason.EXPIRED)
    if any(_blocks(block, binding, caller, direction, now) for block in facts.blocks):
        return reject(Reason.BLOCKED)
    if direction == Direction.TO_CUSTOMER:  # customers may always call the tenant
        refusal = _customer_refuses(binding, tenant, now) or _closed(tenant, now)
        if refusal is None and binding.profile and profile_hours and binding.profile in profile_hours:
            start, end = profile_hours[binding.profile]
            if not within_hours(now, tenant.time_zone, start, end):
                refusal = Reason.OUTSIDE_HOURS
        if refusal is not None:
            return reject(refusal)
    return _bridge(facts, destination, binding.id, direction)


def _customer_refuses(binding: BindingFacts, tenant: TenantFacts, now: datetime) -> Reason | None:
    """The customer's word on this call: their preference (no calls, service only, not
    in their quiet hours) outranks the tenant, then the purposes they accept. A caller
    that is no agent of the tenant (AXB's other party) calls for the service itself."""
    purpose = call_purpose(tenant)
    if binding.calls == Calls.NONE or (binding.calls == Calls.SERVICE_ONLY and purpose != Purpose.SERVICE):
        return Reason.OPTED_OUT
    if binding.quiet is not None and within_hours(now, tenant.time_zone, *binding.quiet) is not False:
        return Reason.OPTED_OUT  # (an unknown zone reads as quiet: fail closed)
    if purpose not in (binding.purposes if binding.purposes is not None else DEFAULT_PURPOSES):
        return Reason.PURPOSE_NOT_ALLOWED
    return None


def call_purpose(tenant: TenantFacts) -> str:
    """Why the caller calls a customer: an agent for its caller group's purpose, anyone
    else (AXB's other party) for the service itself. (A purpose this code does not know
    is kept as it is: no customer accepts it, so the call is refused, never let through.)"""
    return tenant.caller_purpose or Purpose.SERVICE


def _closed(tenant: TenantFacts, now: datetime) -> Reason | None:
    """Why the tenant may not call customers now (outside its calling hours), or None."""
    open_now = within_hours(now, tenant.time_zone, tenant.calls_from, tenant.calls_until)
    if open_now is None:  # a zone this system does not know: fail closed
        return Reason.UNAVAILABLE
    return None if open_now else Reason.OUTSIDE_HOURS


def _bridge(facts: NumberFacts, destination: str, binding_id: int | None, direction: Direction) -> Bridge:
    tenant = facts.tenant
    return Bridge(
        destination=destination,
        present=facts.x,
        ring_timeout=tenant.ring_timeout,
        max_seconds=tenant.max_call_seconds,
        binding_id=binding_id,
        tenant_id=tenant.id,
        direction=direction,
        max_concurrent=tenant.max_concurrent_calls,
        purpose=call_purpose(tenant) if direction == Direction.TO_CUSTOMER else None,
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


def _rejecter(tenant: TenantFacts, binding_id: int, direction: Direction):
    purpose = call_purpose(tenant) if direction == Direction.TO_CUSTOMER else None
    return lambda reason: Reject(reason, tenant.id, binding_id, direction, purpose=purpose)


def _axe_prompt(caller: str | None, now: datetime, facts: NumberFacts) -> Decision:
    """Someone other than a customer calls a shared (AXE) X: prompt an agent for the
    extension. A stranger never hears the prompt: a strict tenant rejects them, a
    lenient one sends them to its hotline (no binding: X is shared)."""
    tenant = facts.tenant
    if tenant.caller_is_agent:
        if facts.blacklisted:
            return Reject(Reason.BLACKLISTED, tenant.id, direction=Direction.TO_CUSTOMER, purpose=call_purpose(tenant))
        # Blocks that need no binding (caller, X, tenant) and calling hours stop the
        # call before the prompt: it is answered (and charged) once prompted.
        if any(_blocks(block, None, caller, Direction.TO_CUSTOMER, now) for block in facts.blocks):
            return Reject(Reason.BLOCKED, tenant.id, direction=Direction.TO_CUSTOMER, purpose=call_purpose(tenant))
        closed = _closed(tenant, now)
        if closed is not None:
            return Reject(closed, tenant.id, direction=Direction.TO_CUSTOMER, purpose=call_purpose(tenant))
        return CollectExtension(digits=facts.extension_digits, tries=EXTENSION_TRIES, tenant_id=tenant.id,
                                purpose=call_purpose(tenant))
    if tenant.strict:
        return Reject(Reason.UNKNOWN_CALLER, tenant_id=tenant.id)
    return _bridge(facts, tenant.hotline, None, Direction.FROM_CUSTOMER)


def _live_first(bindings, now: datetime) -> BindingFacts | None:
    """The first binding that has not expired, else the first expired one, else None:
    a lapsed binding still marked active never shadows a live one of the same party."""
    expired = None
    for binding in bindings:
        if binding.expires_at is None or now < binding.expires_at:
            return binding
        expired = expired or binding
    return expired


def _customer_binding(caller: str | None, bindings, now: datetime) -> BindingFacts | None:
    if caller is None:
        return None
    return _live_first((b for b in bindings if b.party_a == caller), now)


def _match(
    caller: str | None, tenant: TenantFacts, mode: Mode, bindings: tuple[BindingFacts, ...], now: datetime
) -> tuple[BindingFacts, Direction, str] | None:
    """Pick the binding the call belongs to, its direction and where it goes.

    Parties are compared here in Python: the store found the caller's bindings by
    their lookup hashes, which say nothing of which party the caller is.
    """
    if mode == Mode.AXB:
        # (X, caller) picks the pair; nobody else reaches anyone through X.
        pair = None if caller is None else _live_first(
            (b for b in bindings if b.party_b and caller in (b.party_a, b.party_b)), now
        )
        if pair is None:
            return None
        if caller == pair.party_a:
            return pair, Direction.FROM_CUSTOMER, pair.party_b
        return pair, Direction.TO_CUSTOMER, pair.party_a
    # AXN: one binding on X; AXE: the binding the extension chose, or a customer's.
    customer = _customer_binding(caller, bindings, now)
    if customer is not None:
        return customer, Direction.FROM_CUSTOMER, tenant.hotline
    binding = _live_first(bindings, now)
    if tenant.caller_is_agent:
        return binding, Direction.TO_CUSTOMER, binding.party_a
    if tenant.strict:
        return None
    # A lenient tenant sends strangers to its hotline; they never reach the customer.
    return binding, Direction.FROM_CUSTOMER, tenant.hotline


def _blocks(
    block: BlockFacts,
    binding: BindingFacts | None,
    caller: str | None,
    direction: Direction,
    now: datetime,
) -> bool:
    if not block.active(now):
        return False
    if block.direction != BLOCK_BOTH and block.direction != direction:
        return False
    if block.scope == BlockScope.BINDING:
        return binding is not None and block.binding_id == binding.id
    if block.scope == BlockScope.CALLER:
        return caller is not None and block.caller == caller
    return block.scope in (BlockScope.NUMBER, BlockScope.TENANT)  # the store fetched them for this X/tenant
