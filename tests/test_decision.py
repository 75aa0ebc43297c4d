from datetime import datetime, timedelta, timezone

import pytest

from callctl.core.decision import (
    BindingFacts, BlockFacts, Bridge, Direction, Mode, NumberFacts, Reason, Reject, TenantFacts, decide,
)

NOW = datetime(2026, 11, 28, 10, 0, tzinfo=timezone.utc)
X, A, B, AGENT, HOTLINE = "+8617100000001", "+8613800000001", "+8613800000002", "+8613900000001", "+861058000000"


def facts(agent=True, strict=True, bindings=None, blocks=()):
    tenant = TenantFacts(7, HOTLINE, agent, strict, ring_timeout=25, max_call_seconds=600)
    if bindings is None:
        bindings = (BindingFacts(11, Mode.AXN, A),)
    return NumberFacts(X, tenant, tuple(bindings), tuple(blocks), mode=bindings[0].mode if bindings else None)


def test_agent_reaches_customer_presenting_x():
    d = decide(AGENT, NOW, facts())
    assert d == Bridge(A, X, 25, 600, 11, 7, Direction.TO_CUSTOMER, purpose="service")


@pytest.mark.parametrize("group, decision, reason", [
    ("claims", Bridge, None), ("renewal", Bridge, None), ("marketing", Reject, Reason.PURPOSE_NOT_ALLOWED),
])
def test_a_call_to_a_customer_carries_the_agents_purpose_bridged_or_refused(group, decision, reason):
    tenant = TenantFacts(7, HOTLINE, True, True, ring_timeout=25, max_call_seconds=600, caller_purpose=group)
    d = decide(AGENT, NOW, NumberFacts(X, tenant, (BindingFacts(11, Mode.AXN, A),), mode=Mode.AXN))
    assert isinstance(d, decision) and d.purpose == group and getattr(d, "reason", None) == reason
    # Refused before the customer's word too (a block), the purpose is kept for the CDR.
    blocked = decide(AGENT, NOW, NumberFacts(X, tenant, (BindingFacts(11, Mode.AXN, A),),
                                             (BlockFacts("binding", "both", binding_id=11),), mode=Mode.AXN))
    assert (blocked.reason, blocked.purpose) == (Reason.BLOCKED, group)


def test_a_call_from_a_customer_has_no_purpose():
    assert decide(A, NOW, facts(agent=False)).purpose is None
    assert decide(A, NOW, facts(agent=False, blocks=[BlockFacts("binding", "both", binding_id=11)])).purpose is None


def test_customer_reaches_hotline_presenting_x():
    d = decide(A, NOW, facts(agent=False))
    assert d == Bridge(HOTLINE, X, 25, 600, 11, 7, Direction.FROM_CUSTOMER)


def test_unknown_x_and_unbound_x():
    assert decide(AGENT, NOW, None) == Reject(Reason.UNKNOWN_NUMBER)
    assert decide(AGENT, NOW, facts(bindings=())).reason == Reason.UNKNOWN_NUMBER


@pytest.mark.parametrize("caller", ["+8613700000000", None])
def test_strict_tenant_rejects_strangers_and_withheld(caller):
    d = decide(caller, NOW, facts(agent=False))
    assert isinstance(d, Reject) and d.reason == Reason.UNKNOWN_CALLER


def test_lenient_tenant_sends_strangers_to_hotline_never_to_customer():
    d = decide("+8613700000000", NOW, facts(agent=False, strict=False))
    assert isinstance(d, Bridge) and d.destination == HOTLINE


def test_expiry_is_exact_to_the_second():
    expires = NOW + timedelta(seconds=1)
    f = facts(bindings=[BindingFacts(11, Mode.AXN, A, expires_at=expires)])
    assert isinstance(decide(AGENT, NOW, f), Bridge)
    assert decide(AGENT, expires, f) == Reject(Reason.EXPIRED, 7, 11, Direction.TO_CUSTOMER, purpose="service")


@pytest.mark.parametrize("block, caller, blocked", [
    (BlockFacts("binding", "both", binding_id=11), AGENT, True),
    (BlockFacts("binding", "both", binding_id=12), AGENT, False),
    (BlockFacts("binding", "to_customer", binding_id=11), A, False),
    (BlockFacts("binding", "from_customer", binding_id=11), A, True),
    (BlockFacts("tenant", "to_customer"), AGENT, True),
    (BlockFacts("number", "both"), A, True),
    (BlockFacts("caller", "to_customer", caller=AGENT), AGENT, True),
    (BlockFacts("caller", "to_customer", caller="+8613900000009"), AGENT, False),
    (BlockFacts("tenant", "both", ends_at=NOW), AGENT, False),
    (BlockFacts("tenant", "both", starts_at=NOW + timedelta(seconds=1)), AGENT, False),
])
def test_blocks_by_scope_direction_and_time(block, caller, blocked):
    d = decide(caller, NOW, facts(agent=caller == AGENT, blocks=[block]))
    assert (isinstance(d, Reject) and d.reason == Reason.BLOCKED) is blocked


def test_axb_pairs_pick_the_other_party():
    f = facts(agent=False, bindings=[BindingFacts(21, Mode.AXB, A, B), BindingFacts(22, Mode.AXB, "+8613800000003", "+8613800000004")])
    assert decide(A, NOW, f).destination == B
    assert decide(B, NOW, f).destination == A
    assert decide("+8613800000004", NOW, f).destination == "+8613800000003"
    assert decide(AGENT, NOW, f).reason == Reason.UNKNOWN_CALLER
