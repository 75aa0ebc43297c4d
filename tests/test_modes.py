"""AXB and AXE in the decision core (pure), and through the store and CallService on
SQLite and PostgreSQL: the second AXE request reads only the keyed extension's binding."""
from datetime import datetime, time, timedelta, timezone

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from callctl.core.decision import (
    EXTENSION_TRIES, BindingFacts, BlockFacts, Bridge, CollectExtension, Direction, Mode, NumberFacts,
    Reason, Reject, TenantFacts, decide,
)
from callctl.service import CallService, decision_variables
from tests.agicalls import agi_call
from callctl.store import bindings, pool, tenants
from callctl.store.blocks import add_block
from callctl.store.calls import call_facts
from callctl.store.models import Binding, Tenant, VirtualNumber
from callctl.store.spool import CdrSpool

NOW = datetime(2026, 11, 28, 10, 0, tzinfo=timezone.utc)
X, AGENT, HOTLINE, STRANGER = "+8617100000001", "+8613900000001", "+861058000000", "+8613700000000"
A1, B1, A2, B2 = "+8613800000001", "+8613600000001", "+8613800000002", "+8613600000002"
C1, C2 = "+8613800000011", "+8613800000012"


def facts(bindings, agent=False, strict=True, blocks=()):
    """Facts with every binding on X (a superset of what the store reads for one caller)."""
    tenant = TenantFacts(7, HOTLINE, agent, strict, ring_timeout=25, max_call_seconds=600)
    return NumberFacts(X, tenant, tuple(bindings), tuple(blocks), **described(bindings))


def described(bindings) -> dict:
    """What the store says of X itself: its mode and its longest extension."""
    return {"mode": bindings[0].mode if bindings else None,
            "extension_digits": max((len(b.extension or "") for b in bindings), default=0)}


def bridge(destination, binding_id, direction):
    purpose = "service" if direction == Direction.TO_CUSTOMER else None  # calls to customers say why
    return Bridge(destination, X, 25, 600, binding_id, 7, direction, purpose=purpose)


AXB_PAIRS = (BindingFacts(21, Mode.AXB, A1, B1), BindingFacts(22, Mode.AXB, A2, B2))
AXE_SHARED = (BindingFacts(31, Mode.AXE, C1, extension="135"), BindingFacts(32, Mode.AXE, C2, extension="468"))


# --- AXB ------------------------------------------------------------------------------

@pytest.mark.parametrize("caller, expected", [
    (A1, bridge(B1, 21, Direction.FROM_CUSTOMER)),
    (B1, bridge(A1, 21, Direction.TO_CUSTOMER)),
    (A2, bridge(B2, 22, Direction.FROM_CUSTOMER)),
    (B2, bridge(A2, 22, Direction.TO_CUSTOMER)),
])
def test_axb_caller_picks_the_pair_and_the_other_party(caller, expected):
    assert decide(caller, NOW, facts(AXB_PAIRS)) == expected


@pytest.mark.parametrize("caller, agent, strict", [
    (STRANGER, False, True), (STRANGER, False, False), (AGENT, True, True), (None, False, False),
])
def test_axb_nobody_outside_a_pair_reaches_anyone(caller, agent, strict):
    """Not even a lenient tenant's stranger or an agent: X belongs to the pairs only."""
    assert decide(caller, NOW, facts(AXB_PAIRS, agent, strict)) == Reject(Reason.UNKNOWN_CALLER, tenant_id=7)


def test_axb_a_lapsed_pair_never_shadows_a_live_one_of_the_same_party():
    lapsed = BindingFacts(20, Mode.AXB, A1, "+8613600000009", expires_at=NOW - timedelta(days=1))
    f = facts((lapsed,) + AXB_PAIRS)
    assert decide(A1, NOW, f) == bridge(B1, 21, Direction.FROM_CUSTOMER)
    # The other party of the lapsed pair has no live pair: it is told so.
    assert decide("+8613600000009", NOW, f) == Reject(Reason.EXPIRED, 7, 20, Direction.TO_CUSTOMER, purpose="service")


def test_axb_pair_without_second_party_routes_nobody():
    f = facts([BindingFacts(23, Mode.AXB, A1, None)])
    assert decide(A1, NOW, f).reason == Reason.UNKNOWN_CALLER


def test_axb_binding_block_stops_that_pair_only():
    f = facts(AXB_PAIRS, blocks=[BlockFacts("binding", "both", binding_id=21)])
    assert decide(B1, NOW, f) == Reject(Reason.BLOCKED, 7, 21, Direction.TO_CUSTOMER, purpose="service")
    assert isinstance(decide(A2, NOW, f), Bridge)


# --- AXE ------------------------------------------------------------------------------

def test_axe_agent_is_prompted_for_the_extension():
    assert decide(AGENT, NOW, facts(AXE_SHARED, agent=True)) == CollectExtension(
        digits=3, tries=EXTENSION_TRIES, tenant_id=7, purpose="service"
    )
    assert EXTENSION_TRIES == 2  # one retry, then the rejection


@pytest.mark.parametrize("extension, expected", [
    ("135", bridge(C1, 31, Direction.TO_CUSTOMER)),
    ("468", bridge(C2, 32, Direction.TO_CUSTOMER)),
    ("999", Reject(Reason.INVALID_EXTENSION, 7, None, Direction.TO_CUSTOMER, purpose="service")),
    ("", Reject(Reason.INVALID_EXTENSION, 7, None, Direction.TO_CUSTOMER, purpose="service")),  # nothing keyed
    ("13", Reject(Reason.INVALID_EXTENSION, 7, None, Direction.TO_CUSTOMER, purpose="service")),
])
def test_axe_keyed_extension_picks_the_customer(extension, expected):
    assert decide(AGENT, NOW, facts(AXE_SHARED, agent=True), extension) == expected


def test_axe_customer_reaches_hotline_without_a_prompt():
    assert decide(C2, NOW, facts(AXE_SHARED)) == bridge(HOTLINE, 32, Direction.FROM_CUSTOMER)


def test_axe_strangers_are_never_prompted():
    assert decide(STRANGER, NOW, facts(AXE_SHARED)) == Reject(Reason.UNKNOWN_CALLER, tenant_id=7)
    assert decide(None, NOW, facts(AXE_SHARED)) == Reject(Reason.UNKNOWN_CALLER, tenant_id=7)
    # A lenient tenant's stranger reaches the hotline, on no customer's binding.
    assert decide(STRANGER, NOW, facts(AXE_SHARED, strict=False)) == bridge(HOTLINE, None, Direction.FROM_CUSTOMER)


def test_axe_extension_from_someone_never_prompted_is_refused():
    """A forged second request: only agents key extensions."""
    assert decide(STRANGER, NOW, facts(AXE_SHARED), "135") == Reject(Reason.UNKNOWN_CALLER, tenant_id=7)


def test_axe_expiry_and_binding_blocks_apply_once_the_extension_chose():
    lapsed = (BindingFacts(31, Mode.AXE, C1, extension="135", expires_at=NOW),) + AXE_SHARED[1:]
    assert decide(AGENT, NOW, facts(lapsed, agent=True), "135") == Reject(Reason.EXPIRED, 7, 31, Direction.TO_CUSTOMER, purpose="service")
    blocked = facts(AXE_SHARED, agent=True, blocks=[BlockFacts("binding", "to_customer", binding_id=32)])
    assert isinstance(decide(AGENT, NOW, blocked), CollectExtension)  # the binding is not known yet
    assert decide(AGENT, NOW, blocked, "468") == Reject(Reason.BLOCKED, 7, 32, Direction.TO_CUSTOMER, purpose="service")
    assert isinstance(decide(AGENT, NOW, blocked, "135"), Bridge)


@pytest.mark.parametrize("block", [
    BlockFacts("caller", "to_customer", caller=AGENT), BlockFacts("number", "both"), BlockFacts("tenant", "to_customer"),
])
def test_axe_blocks_that_need_no_binding_stop_the_call_before_the_prompt(block):
    d = decide(AGENT, NOW, facts(AXE_SHARED, agent=True, blocks=[block]))
    assert d == Reject(Reason.BLOCKED, 7, None, Direction.TO_CUSTOMER, purpose="service")


def test_axe_outside_calling_hours_is_rejected_before_the_prompt():
    tenant = TenantFacts(7, HOTLINE, True, True, 25, 600, "Asia/Shanghai", time(8, 0), time(9, 0))
    f = NumberFacts(X, tenant, AXE_SHARED, **described(AXE_SHARED))
    assert decide(AGENT, NOW, f) == Reject(Reason.OUTSIDE_HOURS, 7, None, Direction.TO_CUSTOMER, purpose="service")
    assert decide(C1, NOW, f).destination == HOTLINE  # customers may always call


def test_axe_extension_when_x_was_unbound_meanwhile_is_invalid():
    assert decide(AGENT, NOW, facts((), agent=True), "135").reason == Reason.INVALID_EXTENSION
    assert decide(AGENT, NOW, None, "135") == Reject(Reason.UNKNOWN_NUMBER)


def test_decision_variables_for_the_prompt_and_a_bindingless_bridge():
    prompt = decision_variables(CollectExtension(digits=4, tries=2, tenant_id=7))
    assert prompt == {"ext_digits": "4", "ext_tries": "2", "tenant": "7", "direction": "to_customer",
                      "action": "extension"}
    assert list(prompt)[-1] == "action"
    hotline = decision_variables(bridge(HOTLINE, None, Direction.FROM_CUSTOMER))
    assert "binding" not in hotline and hotline["dest"] == HOTLINE and list(hotline)[-1] == "action"


# --- through the store, on SQLite and PostgreSQL ---------------------------------------

def bind_on(engine, tenant: str, x: str, mode: str, party_a: str, party_b: str | None = None,
            extension: str | None = None) -> int:
    """Put an AXB pair / AXE extension of our choosing on the given X; returns the
    binding id. (bindings.bind picks X and a random extension; the lab keys extensions
    that Debian's DTMF pcaps can play, see sipp_scenarios/uac_extension.xml.)"""
    with Session(engine) as session, session.begin():
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == tenant))
        number = session.scalar(select(VirtualNumber).where(VirtualNumber.e164 == x))
        number.state, number.mode = "bound", mode
        binding = Binding(tenant_id=tenant_id, number_id=number.id, mode=mode, party_a=party_a,
                          party_b=party_b, extension=extension)
        session.add(binding)
        session.flush()
        return binding.id


@pytest.fixture
def shared(engine, tmp_path):
    tenants.add_tenant(engine, "acme", HOTLINE, callers=[AGENT], hours="00:00-24:00")
    pool.add_numbers(engine, "acme", [X, "+8617100000002"])
    ids = [bind_on(engine, "acme", X, "AXE", C1, extension="135"),
           bind_on(engine, "acme", X, "AXE", C2, extension="468")]
    return CallService(engine, CdrSpool(tmp_path / "spool")), ids


def test_axe_reads_only_the_callers_or_the_keyed_binding(shared):
    """The agent's first request reads no customer's binding, only what X is; the
    second reads the keyed extension's; a customer's, its own."""
    service, (first, second) = shared
    prompt = call_facts(service.engine, X, AGENT, NOW)
    assert (prompt.bindings, prompt.mode, prompt.extension_digits) == ((), Mode.AXE, 3)
    assert [b.id for b in call_facts(service.engine, X, AGENT, NOW, "468").bindings] == [second]
    assert call_facts(service.engine, X, AGENT, NOW, "999").bindings == ()
    assert [b.id for b in call_facts(service.engine, X, C1, NOW).bindings] == [first]
    assert call_facts(service.engine, X, None, NOW).bindings == ()


def test_facts_hold_each_binding_and_block_once(shared):
    """The facts are one query joining bindings to the blocks on them: every binding and
    every block in force comes back once, whatever the join repeats."""
    service, (first, second) = shared
    now = datetime.now(timezone.utc)
    add_block(service.engine, scope="tenant", tenant="acme", direction="both", reason="suspended",
              created_by="test", now=now)
    add_block(service.engine, scope="number", number=X, direction="to_customer", reason="abuse",
              created_by="test", now=now)
    add_block(service.engine, scope="binding", binding_id=first, direction="both", reason="abuse",
              created_by="test", now=now)
    add_block(service.engine, scope="binding", binding_id=second, direction="both", reason="over",
              created_by="test", now=now - timedelta(days=2), duration_seconds=60)  # long over
    facts = call_facts(service.engine, X, C1, now + timedelta(seconds=1))  # first's customer
    assert [b.id for b in facts.bindings] == [first]
    assert sorted((b.scope, b.binding_id) for b in facts.blocks) == [
        ("binding", first), ("number", None), ("tenant", None)]
    # The agent, prompted, is a party to no binding: the blocks that need none still come.
    prompt = call_facts(service.engine, X, AGENT, now + timedelta(seconds=1))
    assert prompt.bindings == () and sorted(b.scope for b in prompt.blocks) == ["number", "tenant"]
    keyed = call_facts(service.engine, X, AGENT, now + timedelta(seconds=1), "468")
    assert [b.id for b in keyed.bindings] == [second]
    assert sorted(b.scope for b in keyed.blocks) == ["number", "tenant"]


def test_axe_through_the_service(shared):
    service, (first, second) = shared
    assert isinstance(service.route(X, AGENT)[1], CollectExtension)
    assert service.route(X, AGENT, extension="468")[1].destination == C2
    assert service.route(X, AGENT, extension=" 135 ")[1].binding_id == first
    for garbage in ("", "*", "#", "1 3 5", "135;DROP", "9" * 40, "\u0661\u0663\u0665"):
        assert service.route(X, AGENT, extension=garbage)[1].reason == Reason.INVALID_EXTENSION
    assert service.route(X, C1)[1].destination == HOTLINE


def test_axb_through_the_service(engine, tmp_path):
    tenants.add_tenant(engine, "ride", HOTLINE, hours="00:00-24:00")
    pool.add_numbers(engine, "ride", [X])
    pair = bind_on(engine, "ride", X, "AXB", A1, B1)
    bind_on(engine, "ride", X, "AXB", A2, B2)
    service = CallService(engine, CdrSpool(tmp_path / "spool"))
    assert service.route(X, A1)[1] == Bridge(B1, X, 30, 3600, pair, 1, Direction.FROM_CUSTOMER)
    assert service.route(X, B2)[1].destination == A2
    bindings.unbind(engine, pair, timedelta(days=30))
    assert service.route(X, A1)[1].reason == Reason.UNKNOWN_CALLER  # its pair ended
    assert service.route(X, A2)[1].destination == B2  # X still serves the other pair


def test_caller_gone_at_the_prompt_is_recorded_as_no_extension(shared):
    service, _ = shared
    call = agi_call("lab-1.1", called=X, caller=AGENT, action="extension", tenant="1",
                        direction="to_customer", start="1795887084.0", end="1795887090.0", hangup_cause="16")
    row = service.cdr_row(call, NOW)
    assert row["decision"] == "rejected" and row["reject_reason"] == "invalid_extension"
    assert row["callee_masked"] is None and row["binding_id"] is None
