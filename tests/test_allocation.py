"""Allocation of X for AXN, AXB and AXE bindings, and 8 parallel writers against one
pool on PostgreSQL and SQLite, with an assertion over the whole table afterwards."""
from __future__ import annotations

import multiprocessing
import random
import time
from collections import Counter, defaultdict
from datetime import timedelta

import pytest
from sqlalchemy import text

from callctl.core.decision import Bridge
from callctl.service import CallService
from callctl.store import crypto, provision
from callctl.store.db import make_engine
from callctl.store.provision import ProvisionError
from callctl.store.spool import CdrSpool

HOTLINE, AGENT = "+861058000000", "+8613900000001"
A, B, C, D = "+8613800000001", "+8613800000002", "+8613800000003", "+8613800000004"
X = [f"+86171000000{i:02d}" for i in range(1, 11)]
ALL_DAY = "00:00-24:00"  # calling hours must not make these tests depend on the time of day


def pool(engine, size):
    provision.add_tenant(engine, "acme", HOTLINE, callers=[AGENT], hours=ALL_DAY)
    provision.add_numbers(engine, "acme", X[:size])
    return engine


def code_of(call) -> str:
    with pytest.raises(ProvisionError) as info:
        call()
    return info.value.code


def test_axb_reuses_x_but_never_for_a_shared_party(engine, tmp_path):
    pool(engine, 2)
    ab = provision.bind(engine, "acme", A, mode="AXB", other_party=B)
    cd = provision.bind(engine, "acme", C, mode="AXB", other_party=D)
    assert ab["x"] == cd["x"] == X[0]  # two disjoint pairs share X
    assert ab["other_party"] == "+86138****0002"
    ac = provision.bind(engine, "acme", A, mode="AXB", other_party=C)  # A and C are on X[0]
    assert ac["x"] == X[1]
    assert code_of(lambda: provision.bind(engine, "acme", C, mode="AXB", other_party=A)) == "pool_exhausted"
    # the pairs route on their X: (X, caller) picks the other party
    service = CallService(engine, CdrSpool(tmp_path / "spool"))
    assert service.route(X[0], A)[1].destination == B
    assert service.route(X[0], D)[1].destination == C
    assert service.route(X[1], C)[1].destination == A
    # an AXN binding never lands on an X serving pairs, nor the other way round
    assert code_of(lambda: provision.bind(engine, "acme", "+8613800000009")) == "pool_exhausted"
    provision.unbind(engine, ac["id"], timedelta(0))  # X[1] rests for a cooldown of zero
    axn = provision.bind(engine, "acme", "+8613800000009")
    assert axn["x"] == X[1]
    assert code_of(lambda: provision.bind(engine, "acme", A, mode="AXB", other_party=C)) == "pool_exhausted"


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
    assert code_of(lambda: provision.bind(engine, "acme", A, **kwargs)) == code
    assert provision.pool_status(engine, "acme")["free"] == 1
    assert provision.list_bindings(engine)["items"] == []


def test_axe_fills_extensions_then_takes_the_next_x(engine):
    pool(engine, 2)
    made = [provision.bind(engine, "acme", A, mode="AXE", extension_digits=1) for _ in range(20)]
    on_first = [b["extension"] for b in made if b["x"] == X[0]]
    assert sorted(on_first) == [str(d) for d in range(10)]  # every 1-digit extension, once
    assert sorted(b["extension"] for b in made if b["x"] == X[1]) == [str(d) for d in range(10)]
    assert code_of(lambda: provision.bind(engine, "acme", B, mode="AXE", extension_digits=1)) == "pool_exhausted"
    provision.unbind(engine, made[3]["id"], timedelta(days=1))
    assert provision.pool_status(engine, "acme")["bound"] == 2  # X stays with its other extensions
    again = provision.bind(engine, "acme", B, mode="AXE", extension_digits=1)
    assert (again["x"], again["extension"]) == (made[3]["x"], made[3]["extension"])


def test_axe_extensions_have_k_digits(engine):
    pool(engine, 1)
    ext = provision.bind(engine, "acme", A, mode="AXE", extension_digits=4)["extension"]
    assert len(ext) == 4 and ext.isdigit()


def test_quarantined_x_is_not_reallocated_to_any_mode_before_its_cooldown(engine):
    pool(engine, 1)
    first = provision.bind(engine, "acme", A, mode="AXB", other_party=B)
    provision.unbind(engine, first["id"], timedelta(hours=1))
    for mode, other in (("AXN", None), ("AXB", D), ("AXE", None)):
        assert code_of(lambda: provision.bind(engine, "acme", C, mode=mode, other_party=other)) == "pool_exhausted"
    later = provision.bind(engine, "acme", C, mode="AXE", now=first_time(first) + timedelta(hours=1, seconds=1))
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
                made = provision.bind(engine, "acme", a, mode=mode, other_party=b if mode == "AXB" else None,
                                      extension_digits=1)
                outcomes.append(("ok", mode))
                if rng.random() < 0.5:  # unbinds, so X moves between states while others bind
                    provision.unbind(engine, made["id"], timedelta(0))
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
            assert len(rows) <= 10 and max(extensions.values(), default=1) == 1, f"X {number_id} reuses an extension"


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
    provision.bind(engine, "acme", A, mode="AXB", other_party=B)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO bindings (tenant_id, number_id, mode, party_a, party_a_hash, party_b, party_b_hash, status)"
            " SELECT tenant_id, number_id, mode, party_a, party_a_hash, :c, :c_hash, status FROM bindings"
        ), {"c": crypto.ring().seal(C), "c_hash": crypto.number_hash(C)})
    with pytest.raises(AssertionError, match="party in two bindings"):
        assert_no_conflict(engine)


def test_bound_pairs_route(engine, tmp_path):
    pool(engine, 1)
    provision.bind(engine, "acme", A, mode="AXB", other_party=B)
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
        assert code_of(lambda: provision.bind(engine, "acme", A)) == "pool_busy"
        waited = time.monotonic() - started
        assert provision.LOCK_WAIT_SECONDS - 0.5 <= waited < provision.LOCK_WAIT_SECONDS + 5
    finally:
        holder.rollback()
        holder.close()
    assert provision.bind(engine, "acme", A)["x"] == X[0]
