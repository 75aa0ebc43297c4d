"""Allocation of X for AXN, AXB and AXE bindings, and 8 parallel writers against one
pool on PostgreSQL and SQLite, with an assertion over the whole table afterwards."""
from __future__ import annotations

import multiprocessing
import os
import random
import threading
import time
from collections import Counter, defaultdict
from datetime import timedelta

import pytest
from sqlalchemy import event, text

from callctl.core.decision import Bridge
from callctl.service import CallService
from callctl.store import allocation, bindings, crypto, pool as store_pool, tenants
from callctl.store.db import make_engine
from callctl.errors import ProvisionError
from callctl.store.spool import CdrSpool

HOTLINE, AGENT = "+861058000000", "+8613900000001"
A, B, C, D = "+8613800000001", "+8613800000002", "+8613800000003", "+8613800000004"
X = [f"+86171000000{i:02d}" for i in range(1, 11)]
ALL_DAY = "00:00-24:00"  # calling hours must not make these tests depend on the time of day


def pool(engine, size):
    tenants.add_tenant(engine, "acme", HOTLINE, callers=[AGENT], hours=ALL_DAY)
    store_pool.add_numbers(engine, "acme", X[:size])
    return engine


def code_of(call) -> str:
    with pytest.raises(ProvisionError) as info:
        call()
    return info.value.code


def test_axb_reuses_x_but_never_for_a_shared_party(engine, tmp_path):
    pool(engine, 2)
    ab = bindings.bind(engine, "acme", A, mode="AXB", other_party=B)
    cd = bindings.bind(engine, "acme", C, mode="AXB", other_party=D)
    assert ab["x"] == cd["x"] == X[0]  # two disjoint pairs share X
    assert ab["other_party"] == "+86138****0002"
    ac = bindings.bind(engine, "acme", A, mode="AXB", other_party=C)  # A and C are on X[0]
    assert ac["x"] == X[1]
    assert code_of(lambda: bindings.bind(engine, "acme", C, mode="AXB", other_party=A)) == "pool_exhausted"
    # the pairs route on their X: (X, caller) picks the other party
    service = CallService(engine, CdrSpool(tmp_path / "spool"))
    assert service.route(X[0], A)[1].destination == B
    assert service.route(X[0], D)[1].destination == C
    assert service.route(X[1], C)[1].destination == A
    # an AXN binding never lands on an X serving pairs, nor the other way round
    assert code_of(lambda: bindings.bind(engine, "acme", "+8613800000009")) == "pool_exhausted"
    bindings.unbind(engine, ac["id"], timedelta(0))  # X[1] rests for a cooldown of zero
    axn = bindings.bind(engine, "acme", "+8613800000009")
    assert axn["x"] == X[1]
    assert code_of(lambda: bindings.bind(engine, "acme", A, mode="AXB", other_party=C)) == "pool_exhausted"


@pytest.mark.parametrize("kwargs, code", [
    ({"mode": "AXB"}, "missing_other_party"),
    ({"mode": "AXB", "other_party": "138 0000 0001"}, "invalid_party"),  # same as A
    ({"mode": "AXB", "other_party": "nope"}, "invalid_number"),
    ({"mode": "AXN", "other_party": B}, "invalid_party"),
    ({"mode": "AXQ"}, "invalid_mode"),
    ({"mode": "AXE", "extension_digits": 7}, "invalid_extension_digits"),
])
def test_bad_mode_input_changes_nothing(engine, kwargs, code):
    pool(engine, 1)
    assert code_of(lambda: bindings.bind(engine, "acme", A, **kwargs)) == code
    assert store_pool.pool_status(engine, "acme")["free"] == 1
    assert bindings.list_bindings(engine)["items"] == []


def test_axe_fills_extensions_then_takes_the_next_x(engine):
    pool(engine, 2)
    made = [bindings.bind(engine, "acme", A, mode="AXE", extension_digits=1) for _ in range(20)]
    on_first = [b["extension"] for b in made if b["x"] == X[0]]
    assert sorted(on_first) == [str(d) for d in range(10)]  # every 1-digit extension, once
    assert sorted(b["extension"] for b in made if b["x"] == X[1]) == [str(d) for d in range(10)]
    assert code_of(lambda: bindings.bind(engine, "acme", B, mode="AXE", extension_digits=1)) == "pool_exhausted"
    bindings.unbind(engine, made[3]["id"], timedelta(days=1))
    assert store_pool.pool_status(engine, "acme")["bound"] == 2  # X stays with its other extensions
    again = bindings.bind(engine, "acme", B, mode="AXE", extension_digits=1)
    assert (again["x"], again["extension"]) == (made[3]["x"], made[3]["extension"])


def test_axe_extensions_have_k_digits(engine):
    pool(engine, 1)
    ext = bindings.bind(engine, "acme", A, mode="AXE", extension_digits=4)["extension"]
    assert len(ext) == 4 and ext.isdigit()


def test_quarantined_x_is_not_reallocated_to_any_mode_before_its_cooldown(engine):
    pool(engine, 1)
    first = bindings.bind(engine, "acme", A, mode="AXB", other_party=B)
    bindings.unbind(engine, first["id"], timedelta(hours=1))
    for mode, other in (("AXN", None), ("AXB", D), ("AXE", None)):
        assert code_of(lambda: bindings.bind(engine, "acme", C, mode=mode, other_party=other)) == "pool_exhausted"
    later = bindings.bind(engine, "acme", C, mode="AXE", now=first_time(first) + timedelta(hours=1, seconds=1))
    assert later["x"] == X[0]


def first_time(binding):
    from datetime import datetime

    return datetime.fromisoformat(binding["created_at"])


# ------------------------------------------------------------------ parallel writers

WRITERS, BINDS_PER_WRITER = 8, 30
PARTIES = [f"+861380000{i:04d}" for i in range(1, 13)]  # few parties: AXB conflicts are likely


def writer(url: str, seed: int, start_at: float) -> list[tuple[str, str]]:
    """One writer process with its own connections: a mix of modes against one pool."""
    engine = make_engine(url, pool_size=1)
    rng = random.Random(seed)
    outcomes = []
    while time.time() < start_at:
        time.sleep(0.001)
    try:
        for i in range(BINDS_PER_WRITER):
            mode = rng.choice(["AXN", "AXB", "AXB", "AXE"])
            a, b = rng.sample(PARTIES, 2)
            try:
                made = bindings.bind(engine, "acme", a, mode=mode, other_party=b if mode == "AXB" else None,
                                      extension_digits=1)
                outcomes.append(("ok", mode))
                if rng.random() < 0.5:  # unbinds, so X moves between states while others bind
                    bindings.unbind(engine, made["id"], timedelta(0))
            except ProvisionError as exc:
                outcomes.append((exc.code, mode))
    finally:
        engine.dispose()
    return outcomes


def assert_no_conflict(engine) -> None:
    """Over the whole table: nothing was given out that must not be."""
    with engine.connect() as conn:
        numbers = {r.id: r for r in conn.execute(text("SELECT id, tenant_id, state, mode FROM virtual_numbers"))}
        active = conn.execute(text(
            "SELECT id, tenant_id, number_id, mode, party_a_hash, party_b_hash, extension FROM bindings"
            " WHERE status = 'active'"
        )).all()
    by_number = defaultdict(list)
    for row in active:
        by_number[row.number_id].append(row)
        assert numbers[row.number_id].tenant_id == row.tenant_id  # X from the tenant's own pool
    for number_id, number in numbers.items():
        rows = by_number.get(number_id, [])
        assert (number.state == "bound") == bool(rows), f"X {number_id} is {number.state} with {len(rows)} binding(s)"
        assert all(r.mode == number.mode for r in rows), f"X {number_id} mixes modes"
        if number.mode == "AXN":
            assert len(rows) <= 1, f"X {number_id} serves {len(rows)} AXN customers"
        if number.mode == "AXB":
            # Parties are stored encrypted (randomised): the same number has the same hash.
            parties = Counter(p for r in rows for p in (r.party_a_hash, r.party_b_hash))
            assert max(parties.values(), default=1) == 1, f"X {number_id} has a party in two bindings"
        if number.mode == "AXE":
            extensions = Counter(r.extension for r in rows)
            room = 10 ** max((len(r.extension) for r in rows), default=1)
            assert len(rows) <= room and max(extensions.values(), default=1) == 1, f"X {number_id} reuses an extension"


@pytest.mark.timeout(240)
def test_eight_parallel_writers_never_conflict(engine):
    pool(engine, 10)
    url = engine.url.render_as_string(hide_password=False)
    context = multiprocessing.get_context("fork")
    start_at = time.time() + 1.5
    with context.Pool(WRITERS) as workers:
        results = workers.starmap(writer, [(url, seed, start_at) for seed in range(WRITERS)])
    outcomes = Counter(code for r in results for code, _ in r)
    assert sum(outcomes.values()) == WRITERS * BINDS_PER_WRITER
    assert set(outcomes) <= {"ok", "pool_exhausted"}, outcomes  # no 'conflict', 'pool_busy' or other error
    assert outcomes["ok"] >= 30 and outcomes["pool_exhausted"] >= 1, outcomes  # the pool really was contended
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM bindings")).scalar() == outcomes["ok"]
    assert_no_conflict(engine)


def test_the_table_check_catches_a_conflict(engine):
    """The whole-table assertion above can fail: a forged double AXB party is caught."""
    pool(engine, 1)
    bindings.bind(engine, "acme", A, mode="AXB", other_party=B)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO bindings (tenant_id, number_id, mode, party_a, party_a_hash, party_b, party_b_hash, status)"
            " SELECT tenant_id, number_id, mode, party_a, party_a_hash, :c, :c_hash, status FROM bindings"
        ), {"c": crypto.ring().seal(C), "c_hash": crypto.number_hash(C)})
    with pytest.raises(AssertionError, match="party in two bindings"):
        assert_no_conflict(engine)


def test_bound_pairs_route(engine, tmp_path):
    pool(engine, 1)
    bindings.bind(engine, "acme", A, mode="AXB", other_party=B)
    service = CallService(engine, CdrSpool(tmp_path / "spool"))
    decision = service.route(X[0], B)[1]
    assert isinstance(decision, Bridge) and decision.destination == A


def test_a_pool_held_by_another_writer_is_a_clear_error_not_a_hang(engine):
    """PostgreSQL: when the only X is locked by a transaction that does not finish, bind
    waits a bounded time (LOCK_WAIT_SECONDS) and says so; once it is released, bind works."""
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time: a held write lock is its busy_timeout")
    pool(engine, 1)
    holder = engine.connect()
    try:
        holder.begin()
        holder.execute(text("SELECT id FROM virtual_numbers FOR UPDATE"))
        started = time.monotonic()
        assert code_of(lambda: bindings.bind(engine, "acme", A)) == "pool_busy"
        waited = time.monotonic() - started
        assert allocation.LOCK_WAIT_SECONDS - 0.5 <= waited < allocation.LOCK_WAIT_SECONDS + 5
    finally:
        holder.rollback()
        holder.close()
    assert bindings.bind(engine, "acme", A)["x"] == X[0]


# ------------------------------------------------------------------ lock discipline (PostgreSQL)

def postgresql_only(engine) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time: no row locks to wait for or deadlock on")


def in_thread(name: str, call) -> tuple[threading.Thread, list]:
    """Run call() in a named thread; its result (or the exception it raised) lands in the list."""
    out: list = []

    def run():
        try:
            out.append(call())
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            out.append(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread, out


def wait_for_lock_waiters(engine, count: int) -> None:
    """Until `count` sessions of this database wait for a row lock (a deadline, not a timing)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            waiting = conn.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'")).scalar()
        if waiting >= count:
            return
        time.sleep(0.05)
    raise AssertionError("no session came to wait for the row lock")


@pytest.mark.parametrize("mode", ["AXE", "AXB"])
def test_a_bind_that_waited_for_the_only_x_takes_it(engine, monkeypatch, mode):
    """#15.5: the tenant's only X is free; while a first bind holds it, a second one waits
    for it. X then serves the first binding and has room for the second: no
    `pool_exhausted` (today's second pass looked for a *free* X, found it bound after the
    wait, and gave up)."""
    postgresql_only(engine)
    pool(engine, 1)
    holding, go = threading.Event(), threading.Event()
    claim = allocation.claim

    def held_claim(*args):
        if threading.current_thread().name == "holder":
            holding.set()
            go.wait(60)
        return claim(*args)

    monkeypatch.setattr(allocation, "claim", held_claim)
    other = lambda party: party if mode == "AXB" else None  # noqa: E731
    first, first_out = in_thread("holder", lambda: bindings.bind(engine, "acme", A, mode=mode, other_party=other(B)))
    assert holding.wait(60)
    second, second_out = in_thread("waiter", lambda: bindings.bind(engine, "acme", C, mode=mode, other_party=other(D)))
    wait_for_lock_waiters(engine, 1)
    go.set()
    first.join(60), second.join(60)
    assert isinstance(first_out[0], dict) and isinstance(second_out[0], dict), (first_out, second_out)
    assert first_out[0]["x"] == second_out[0]["x"] == X[0]
    assert_no_conflict(engine)


@pytest.mark.parametrize("mode", ["AXE", "AXB"])
def test_a_writer_never_holds_an_x_it_turned_down(engine, monkeypatch, mode):
    """#15.4: two writers each lock an X, find under the lock that it cannot take their
    binding (here: forced, as when it changed after they read it) and look further.
    Today each kept its lock on the X it turned down and waited for the other's:
    PostgreSQL's DeadlockDetected. Now an X turned down is let go at once. (An AXN bind
    claims a free X in one statement, with nothing to check under the lock: AXE and
    AXB binds are the ones that go through `claim`.)"""
    postgresql_only(engine)
    pool(engine, 2)
    both_hold = threading.Barrier(2, timeout=60)
    turned_down: set[str] = set()
    claim = allocation.claim

    def changed_under_us(session, number, *args):
        name = threading.current_thread().name
        if name not in turned_down:
            turned_down.add(name)
            both_hold.wait()  # both writers hold one X each
            return False
        return claim(session, number, *args)

    monkeypatch.setattr(allocation, "claim", changed_under_us)
    # disjoint AXB pairs could share one X: both look for a free X first only when none serves AXB yet
    other = {"one": B if mode == "AXB" else None, "two": D if mode == "AXB" else None}
    runs = [in_thread(name, lambda name=name, party=party: bindings.bind(engine, "acme", party, mode=mode,
                                                                          other_party=other[name]))
            for name, party in (("one", A), ("two", C))]
    for thread, _ in runs:
        thread.join(60)
    outcomes = [out[0] for _, out in runs]
    assert all(isinstance(o, dict) for o in outcomes), outcomes
    assert_no_conflict(engine)


# ------------------------------------------------------------------ AXN in one statement (PostgreSQL)

def statements_of(engine, call) -> list[str]:
    """The SQL statements call() sent (the pool's liveness ping is not one)."""
    sent: list[str] = []

    def record(_conn, _cursor, statement, *_):
        sent.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        call()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    return sent


def test_an_axn_bind_is_one_statement(engine):
    """The common bind, an AXN binding on a free X, is one statement on PostgreSQL: the
    X claimed and the binding inserted, committed as the statement ends."""
    postgresql_only(engine)
    pool(engine, 2)
    sent = statements_of(engine, lambda: bindings.bind(engine, "acme", A, reference="POL-1", purposes=["claims"],
                                                        profile="elderly", ttl_seconds=3600))
    # prepared once per connection (store/prepared.py), then one EXECUTE per bind
    assert [s.split()[0] for s in sent] in (["EXECUTE"], ["PREPARE", "EXECUTE"]), sent
    made = bindings.list_bindings(engine)["items"]
    assert [(b["x"], b["customer"], b["reference"], b["purposes"], b["profile"], b["status"]) for b in made] == [
        (X[0], "+86138****0001", "POL-1", ["claims"], "elderly", "active")]
    assert store_pool.pool_status(engine, "acme")["free"] == 1
    assert_no_conflict(engine)


def test_an_axn_bind_passes_over_an_x_another_writer_holds(engine):
    """A free X row-locked by another transaction is skipped at once (SKIP LOCKED), not
    waited for: the bind takes the next free X."""
    postgresql_only(engine)
    pool(engine, 2)
    holder = engine.connect()
    try:
        holder.begin()
        holder.execute(text("SELECT id FROM virtual_numbers WHERE e164 = :x FOR UPDATE"), {"x": X[0]})
        assert bindings.bind(engine, "acme", A)["x"] == X[1]
    finally:
        holder.rollback()
        holder.close()
    assert bindings.bind(engine, "acme", B)["x"] == X[0]


def test_an_axn_bind_whose_insert_fails_leaves_nothing_half_written(engine):
    """The claim of X and the insert are one statement: when the insert fails (here an
    active AXN binding forged onto a free X, which the unique index refuses a second
    of), X is not left bound without a binding."""
    postgresql_only(engine)
    pool(engine, 1)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO bindings (tenant_id, number_id, mode, party_a, party_a_hash, status)"
            " SELECT tenant_id, id, 'AXN', :a, :a_hash, 'active' FROM virtual_numbers"
        ), {"a": crypto.ring().seal(C), "a_hash": crypto.number_hash(C)})
    assert code_of(lambda: bindings.bind(engine, "acme", A)) == "conflict"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT state, mode FROM virtual_numbers")).one() == ("free", None)
        assert conn.execute(text("SELECT count(*) FROM bindings")).scalar() == 1  # the forged one only


def test_an_axn_bind_prefers_a_free_x_to_one_out_of_quarantine(engine):
    """The one statement keeps allocate's order: a free X first, then one whose
    quarantine is over; one still resting is never taken."""
    postgresql_only(engine)
    pool(engine, 3)
    first = bindings.bind(engine, "acme", A)
    second = bindings.bind(engine, "acme", B)
    bindings.unbind(engine, first["id"], timedelta(0))  # X[0]: quarantine over at once
    bindings.unbind(engine, second["id"], timedelta(days=1))  # X[1]: resting
    assert bindings.bind(engine, "acme", C)["x"] == X[2]  # free
    assert bindings.bind(engine, "acme", D)["x"] == X[0]  # out of quarantine
    assert code_of(lambda: bindings.bind(engine, "acme", "+8613800000005")) == "pool_exhausted"
    assert_no_conflict(engine)


# ------------------------------------------------------------------ stress: rounds of writer processes

STRESS_ROUNDS = int(os.environ.get("CALLCTL_STRESS_ROUNDS", "6"))  # per mode and case; README: longer runs
STRESS_WRITERS, STRESS_BINDS = 8, 2


def stress_writer(url: str, tasks, ready, results) -> None:
    """One writer process for every round: connects once, then per round waits for the
    other writers and binds its jobs."""
    engine = make_engine(url, pool_size=1)
    engine.connect().close()
    try:
        for tenant, jobs in iter(tasks.get, None):
            outcomes = []
            ready.wait()
            for mode, a, b, digits in jobs:
                try:
                    bindings.bind(engine, tenant, a, mode=mode, other_party=b, extension_digits=digits)
                    outcomes.append("ok")
                except ProvisionError as exc:
                    outcomes.append(exc.code)
                except Exception as exc:  # noqa: BLE001 - e.g. DeadlockDetected: the test reports it
                    outcomes.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
            results.put(outcomes)
    finally:
        engine.dispose()


def stress_cases(rnd: int):
    """(name, pool size, jobs per writer, bindings the pool can take): demand exceeds
    capacity in some cases, so exactly `capacity` binds succeed; in the others every bind
    must succeed. The pool starts free, as in #15.5."""
    n = STRESS_WRITERS * STRESS_BINDS
    party = [f"+861380{rnd:03d}{i:04d}" for i in range(2 * n + 1)]
    ax = lambda w, i: w * STRESS_BINDS + i  # noqa: E731 - job number
    yield "AXN over a small pool", 5, lambda w: [("AXN", party[ax(w, i)], None, 1) for i in range(STRESS_BINDS)], 5
    yield "AXE, one X, 2-digit extensions", 1, lambda w: [("AXE", party[ax(w, i)], None, 2)
                                                           for i in range(STRESS_BINDS)], n
    yield "AXE, one X, 1-digit extensions", 1, lambda w: [("AXE", party[ax(w, i)], None, 1)
                                                           for i in range(STRESS_BINDS)], 10
    yield "AXB, one X, disjoint pairs", 1, lambda w: [("AXB", party[2 * ax(w, i)], party[2 * ax(w, i) + 1], 1)
                                                       for i in range(STRESS_BINDS)], n
    yield "AXB, three X, one shared party", 3, lambda w: [("AXB", party[-1], party[ax(w, i)], 1)
                                                           for i in range(STRESS_BINDS)], 3


@pytest.mark.timeout(300)
def test_stress_parallel_writer_processes_per_mode(engine):
    """#15.4/#15.5: rounds of parallel writer processes for each mode on PostgreSQL:
    no deadlock or other error, exactly as many bindings as the pool can take (no false
    `pool_exhausted`, nothing given twice) and the whole-table invariants."""
    postgresql_only(engine)
    url = engine.url.render_as_string(hide_password=False)
    context = multiprocessing.get_context("fork")
    crypto.number_hash(A)  # the writers inherit the loaded key ring
    ready, results = context.Barrier(STRESS_WRITERS, timeout=120), context.Queue()
    tasks = [context.Queue() for _ in range(STRESS_WRITERS)]
    writers = [context.Process(target=stress_writer, args=(url, q, ready, results), daemon=True) for q in tasks]
    for w in writers:
        w.start()
    try:
        serial = 0
        for rnd in range(STRESS_ROUNDS):
            for name, size, jobs, capacity in stress_cases(rnd):
                serial += 1
                tenant = f"t{serial}"
                tenants.add_tenant(engine, tenant, HOTLINE, hours=ALL_DAY)
                store_pool.add_numbers(engine, tenant, [f"+8617{serial:05d}{i:04d}" for i in range(size)])
                for w, q in enumerate(tasks):
                    q.put((tenant, jobs(w)))
                outcomes = Counter(code for _ in writers for code in results.get(timeout=120))
                demand = STRESS_WRITERS * STRESS_BINDS
                expected = Counter({"ok": min(demand, capacity), "pool_exhausted": max(0, demand - capacity)})
                assert outcomes == +expected, f"round {rnd}, {name}: {dict(outcomes)}"
                assert_no_conflict(engine)
    finally:
        for q in tasks:
            q.put(None)
        for w in writers:
            w.join(30)
