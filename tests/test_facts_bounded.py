"""The call-time facts are bounded by the caller, not by how many bindings X carries.

An AXE X shared by many customers and an AXB X shared by many pairs: each call reads
what X is (its mode, its extensions' width) and the caller's own bindings on X, never
the others'; the statement's rows and the database's work stay those of a small X
(SQLite: virtual machine steps; PostgreSQL: rows each plan node touched, generic and
custom plans). Every decision is the one the whole crowd of bindings would give.

The crowd's numbers are generated (+86138... customers, +86136... other parties) and
go into the bindings table only, encrypted; the ones that call here are registered
with the leak check (tests/realnumbers.py).
"""
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import insert, select, text, update
from sqlalchemy.orm import Session

from callctl.core.decision import (
    BindingFacts, Bridge, CollectExtension, Direction, Mode, NumberFacts, Reason, Reject, TenantFacts, decide,
)
from callctl.service import CallService
from callctl.store import bindings, pool, tenants
from callctl.store.calls import _FACTS, _FACTS_BY_EXTENSION, call_facts, facts_params
from callctl.store.models import Binding, Tenant, VirtualNumber
from callctl.store.calls import FACTS_BY_EXTENSION_COMPILED, FACTS_COMPILED
from callctl.store.spool import CdrSpool
from tests import realnumbers

N = 400  # bindings on each crowded X
NOW = datetime.now(timezone.utc)
AGENT, HOTLINE = realnumbers.tenant_line("+8613900007001", "+861058007000")
X_AXE, X_AXB, X_AXE_SMALL, X_AXB_SMALL, X_AXN = (f"+861710000700{i}" for i in range(1, 6))
STRANGER = realnumbers.person("+8613700007000")


def customer(i: int) -> str:
    return f"+861380007{i:04d}"


def other_party(i: int) -> str:
    return f"+861360007{i:04d}"


SAMPLE = (0, 1, N // 2, N - 1)  # the crowd's members that call here
realnumbers.person(*(n for i in SAMPLE for n in (customer(i), other_party(i))),
                   *(customer(N + i) for i in range(2)), *(other_party(N + i) for i in range(2)))
realnumbers.person(customer(N + 9))  # X_AXN's customer


def fill(engine, x: str, mode: str, members: range) -> None:
    """Bind members (customer i; AXB: with other party i; AXE: extension i, 4 digits) to X."""
    with Session(engine) as session, session.begin():
        number = session.scalar(select(VirtualNumber).where(VirtualNumber.e164 == x))
        number.state, number.mode = "bound", mode
        session.execute(insert(Binding), [
            {"tenant_id": number.tenant_id, "number_id": number.id, "mode": mode, "party_a": customer(i),
             "party_b": other_party(i) if mode == "AXB" else None,
             "extension": f"{i:04d}" if mode == "AXE" else None}
            for i in members])


@pytest.fixture
def crowd(engine, tmp_path):
    tenants.add_tenant(engine, "crowd", HOTLINE, callers=[AGENT], hours="00:00-24:00")
    pool.add_numbers(engine, "crowd", [X_AXE, X_AXB, X_AXE_SMALL, X_AXB_SMALL, X_AXN])
    fill(engine, X_AXE, "AXE", range(N))
    fill(engine, X_AXB, "AXB", range(N))
    fill(engine, X_AXE_SMALL, "AXE", range(N, N + 2))
    fill(engine, X_AXB_SMALL, "AXB", range(N, N + 2))
    fill(engine, X_AXN, "AXN", range(N + 9, N + 10))
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("ANALYZE")  # statistics that see the crowd
    return engine, CallService(engine, CdrSpool(tmp_path / "spool"))


def binding_of(engine, x: str, party_a: str) -> int:
    with Session(engine) as session:
        rows = session.scalars(select(Binding).join(VirtualNumber, VirtualNumber.id == Binding.number_id)
                               .where(VirtualNumber.e164 == x)).all()
    (found,) = [b.id for b in rows if b.party_a == party_a]
    return found


def set_strict(engine, strict: bool) -> None:
    with engine.begin() as conn:
        conn.execute(update(Tenant).where(Tenant.name == "crowd").values(strict=strict))


def statement_rows(engine, x: str, caller: str | None, extension: str | None = None) -> list:
    with engine.connect() as conn:
        return conn.execute(_FACTS if extension is None else _FACTS_BY_EXTENSION,
                            facts_params(x, caller, NOW, extension)).all()


def test_agent_first_call_on_a_crowded_axe_x_reads_no_customer(crowd):
    engine, service = crowd
    facts = call_facts(engine, X_AXE, AGENT, NOW)
    assert (facts.bindings, facts.mode, facts.extension_digits) == ((), Mode.AXE, 4)
    assert len(statement_rows(engine, X_AXE, AGENT)) == 1
    assert service.route(X_AXE, AGENT, NOW)[1] == CollectExtension(digits=4, tries=2, tenant_id=1, purpose="service")
    for i in SAMPLE:  # the keyed extension reaches its customer, on its binding
        keyed = call_facts(engine, X_AXE, AGENT, NOW, f"{i:04d}")
        assert [b.party_a for b in keyed.bindings] == [customer(i)]
        decision = service.route(X_AXE, AGENT, NOW, f"{i:04d}")[1]
        assert (decision.destination, decision.binding_id) == (customer(i), binding_of(engine, X_AXE, customer(i)))
    assert service.route(X_AXE, AGENT, NOW, f"{N:04d}")[1].reason == Reason.INVALID_EXTENSION


def test_crowded_axe_customers_reach_the_hotline_on_their_own_binding(crowd):
    engine, service = crowd
    for i in SAMPLE:
        facts = call_facts(engine, X_AXE, customer(i), NOW)
        mine = binding_of(engine, X_AXE, customer(i))
        assert [b.id for b in facts.bindings] == [mine]
        assert len(statement_rows(engine, X_AXE, customer(i))) == 1
        assert service.route(X_AXE, customer(i), NOW)[1] == Bridge(HOTLINE, X_AXE, 30, 3600, mine, 1,
                                                                   Direction.FROM_CUSTOMER)


def test_each_party_of_a_crowded_axb_x_reaches_the_other(crowd):
    engine, service = crowd
    for i in SAMPLE:
        pair = binding_of(engine, X_AXB, customer(i))
        for caller, other, direction in ((customer(i), other_party(i), Direction.FROM_CUSTOMER),
                                         (other_party(i), customer(i), Direction.TO_CUSTOMER)):
            facts = call_facts(engine, X_AXB, caller, NOW)
            assert [b.id for b in facts.bindings] == [pair] and facts.mode == Mode.AXB
            assert len(statement_rows(engine, X_AXB, caller)) == 1
            purpose = "service" if direction == Direction.TO_CUSTOMER else None  # AXB's other party: the service
            assert service.route(X_AXB, caller, NOW)[1] == Bridge(other, X_AXB, 30, 3600, pair, 1, direction,
                                                                  purpose=purpose)
    # A party of a pair on another X is nobody here.
    assert service.route(X_AXB, customer(N), NOW)[1] == Reject(Reason.UNKNOWN_CALLER, tenant_id=1)


@pytest.mark.parametrize("strict", [True, False])
def test_strangers_strict_and_lenient_as_before(crowd, strict):
    """A stranger (or a withheld number) reads no binding of the crowd: a lenient tenant
    sends them to the hotline on an AXE X (no binding) and on an AXN X (its binding), a
    strict one rejects them; on an AXB X nobody outside a pair reaches anyone."""
    engine, service = crowd
    set_strict(engine, strict)
    axn = binding_of(engine, X_AXN, customer(N + 9))
    for caller in (STRANGER, None):
        for x in (X_AXE, X_AXB):
            assert call_facts(engine, x, caller, NOW).bindings == ()
        label = caller or "anonymous"
        rejected = Reject(Reason.UNKNOWN_CALLER, tenant_id=1)
        assert service.route(X_AXB, label, NOW)[1] == rejected
        if strict:
            assert service.route(X_AXE, label, NOW)[1] == rejected
            assert service.route(X_AXN, label, NOW)[1] == rejected
        else:
            assert service.route(X_AXE, label, NOW)[1] == Bridge(HOTLINE, X_AXE, 30, 3600, None, 1,
                                                                 Direction.FROM_CUSTOMER)
            assert service.route(X_AXN, label, NOW)[1] == Bridge(HOTLINE, X_AXN, 30, 3600, axn, 1,
                                                                 Direction.FROM_CUSTOMER)
        # A keyed extension from someone never prompted is refused, strict or not.
        assert service.route(X_AXE, label, NOW, "0001")[1] == rejected


def test_the_prompt_asks_for_the_longest_extension_on_x(crowd):
    """Extensions of two widths on one X (axe_extension_digits changed between binds):
    the prompt takes as many digits as the longest one still bound."""
    engine, service = crowd
    pool.add_numbers(engine, "crowd", ["+8617100007009"])
    realnumbers.person(customer(N + 20), customer(N + 21))
    with Session(engine) as session, session.begin():
        number = session.scalar(select(VirtualNumber).where(VirtualNumber.e164 == "+8617100007009"))
        number.state, number.mode = "bound", "AXE"
        short, long = (Binding(tenant_id=number.tenant_id, number_id=number.id, mode="AXE", party_a=customer(N + i),
                               extension=ext) for i, ext in ((20, "135"), (21, "46802")))
        session.add_all([short, long])
        session.flush()
        longest = long.id
    assert service.route("+8617100007009", AGENT, NOW)[1].digits == 5
    bindings.unbind(engine, longest, timedelta(days=1))
    assert service.route("+8617100007009", AGENT, NOW)[1].digits == 3


# --- the work a call costs does not grow with X --------------------------------------

CALLS = {  # (crowded X, the same call on a small X, caller, extension)
    "axe-agent-prompted": (X_AXE, X_AXE_SMALL, AGENT, None),
    "axe-stranger": (X_AXE, X_AXE_SMALL, STRANGER, None),
    "axe-anonymous": (X_AXE, X_AXE_SMALL, None, None),
    "axe-agent-keyed": (X_AXE, X_AXE_SMALL, AGENT, "0001"),
    "axb-stranger": (X_AXB, X_AXB_SMALL, STRANGER, None),
}


def sqlite_steps(engine, x: str, caller: str | None, extension: str | None) -> int:
    """SQLite virtual machine instructions the facts statement ran."""
    steps = [0]

    def count():
        steps[0] += 1
        return 0

    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")  # (the pool's connection is open)
        raw = conn.connection.dbapi_connection
        raw.set_progress_handler(count, 1)
        try:
            conn.execute(_FACTS if extension is None else _FACTS_BY_EXTENSION,
                         facts_params(x, caller, NOW, extension)).all()
        finally:
            raw.set_progress_handler(None, 1)
    return steps[0]


def pg_rows_touched(engine, x: str, caller: str | None, extension: str | None, plan_mode: str) -> int:
    """Rows every node of the PostgreSQL plan produced or filtered away, the statement
    prepared as the daemon prepares it (asyncpg: $n parameters, generic or custom plan)."""
    statement = FACTS_COMPILED if extension is None else FACTS_BY_EXTENSION_COMPILED
    args = statement.args(facts_params(x, caller, NOW, extension))
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cur:
            cur.execute("DEALLOCATE ALL")
            cur.execute(f"SET plan_cache_mode = {plan_mode}")
            cur.execute(f"PREPARE facts AS {statement.sql}")
            cur.execute("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE facts(" + ", ".join(["%s"] * len(args)) + ")", args)
            (plan,), = cur.fetchall()
            cur.execute("DEALLOCATE facts")
            cur.execute("RESET plan_cache_mode")
        raw.rollback()
    finally:
        raw.close()

    def touched(node) -> int:
        own = node.get("Actual Rows", 0) * node.get("Actual Loops", 1)
        own += node.get("Rows Removed by Filter", 0) + node.get("Rows Removed by Join Filter", 0)
        own += node.get("Rows Removed by Index Recheck", 0)
        return own + sum(touched(child) for child in node.get("Plans", ()))

    return touched(plan[0]["Plan"])


@pytest.mark.parametrize("crowded, small, caller, extension", CALLS.values(), ids=CALLS.keys())
def test_a_call_costs_the_same_on_a_crowded_x_as_on_a_small_one(crowd, crowded, small, caller, extension):
    engine, _ = crowd
    if engine.dialect.name == "sqlite":
        big, little = (sqlite_steps(engine, x, caller, extension) for x in (crowded, small))
        assert big <= little * 1.2, (big, little)
    else:
        for plan_mode in ("force_generic_plan", "force_custom_plan"):
            big, little = (pg_rows_touched(engine, x, caller, extension, plan_mode) for x in (crowded, small))
            assert big <= little + 2, (plan_mode, big, little)


def test_a_party_costs_the_same_on_a_crowded_axb_x(crowd):
    """A party's call: the pair found by its hash, whichever of the N it is."""
    engine, _ = crowd
    if engine.dialect.name == "sqlite":
        little = sqlite_steps(engine, X_AXB_SMALL, other_party(N), None)
        for i in SAMPLE:
            assert sqlite_steps(engine, X_AXB, other_party(i), None) <= little * 1.2
    else:
        little = pg_rows_touched(engine, X_AXB_SMALL, other_party(N), None, "force_generic_plan")
        for i in SAMPLE:
            assert pg_rows_touched(engine, X_AXB, other_party(i), None, "force_generic_plan") <= little + 2


# --- the core: the caller's bindings decide as the whole crowd would -------------------

def test_the_callers_bindings_decide_as_all_of_xs_would():
    """decide() over what the store reads (X's mode and width, the caller's bindings)
    equals decide() over every binding on X, for every caller, mode, tenant kind,
    expiry and extension keyed."""
    lapsed = NOW - timedelta(days=1)
    a, b = customer(N + 30), other_party(N + 30)  # (pure: these numbers reach no output)
    crowds = {
        Mode.AXB: [BindingFacts(1, Mode.AXB, a, other_party(0), expires_at=lapsed),
                   *(BindingFacts(10 + i, Mode.AXB, customer(i), other_party(i)) for i in range(5)),
                   BindingFacts(20, Mode.AXB, customer(7), b)],
        Mode.AXE: [BindingFacts(1, Mode.AXE, a, extension="0007", expires_at=lapsed),
                   *(BindingFacts(10 + i, Mode.AXE, customer(i), extension=f"{i:04d}") for i in range(5)),
                   BindingFacts(20, Mode.AXE, a, extension="123")],
        Mode.AXN: [BindingFacts(1, Mode.AXN, a)],
    }
    callers = [AGENT, STRANGER, None, a, b, customer(0), customer(3), other_party(3), customer(7)]
    checked = set()
    for mode, everyone in crowds.items():
        width = max(len(x.extension or "") for x in everyone)
        for agent in (True, False):
            for strict in (True, False):
                tenant = TenantFacts(1, HOTLINE, agent, strict, 30, 3600, calls_from=NOW.time(),
                                     calls_until=NOW.time())
                for caller in callers:
                    mine = tuple(x for x in everyone if mode == Mode.AXN or caller in (x.party_a, x.party_b))
                    for extension in (None, "", "0003", "0007", "123", "9999"):
                        keyed = tuple(x for x in everyone if extension is not None and x.extension == extension)
                        full = NumberFacts(X_AXE, tenant, tuple(everyone), mode=mode, extension_digits=width)
                        read = NumberFacts(X_AXE, tenant, mine if extension is None else keyed, mode=mode,
                                           extension_digits=width)
                        expected = decide(caller, NOW, full, extension)
                        assert decide(caller, NOW, read, extension) == expected, (mode, agent, strict, caller)
                        checked.add(type(expected).__name__ + str(getattr(expected, "reason", "")))
    # Every kind of outcome was compared.
    assert {"Bridge", "CollectExtension", "Rejectunknown_caller", "Rejectexpired",
            "Rejectinvalid_extension"} <= checked
