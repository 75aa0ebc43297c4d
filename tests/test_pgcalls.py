"""The daemon's call path on PostgreSQL (callctl.store.pgcalls, asyncpg on the event
loop) against the threaded path every other caller uses: the same facts, the same
decisions, the same CDR rows; one prepared statement per connection; connections the
server dropped replaced; a database that is not there fails closed, in time."""
import asyncio
import json
import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import insert, select, text

from callctl.core.decision import Reason, Reject
from callctl.service import CallService
from tests.agicalls import agi_call
from callctl.store import bindings, pool, tenants
from callctl.store.calls import FACTS_COMPILED, call_facts
from callctl.store.models import Block, Cdr
from callctl.store.pgcalls import PgCallStore, PgUnavailable
from callctl.store.spool import CdrSpool
from test_store import AGENT, HOTLINE, X1, A, bound_on_postgresql

X2, X3, B = "+8617100000002", "+8617100000003", "+8613800000002"
# 10:00 in Shanghai, within the tenants' calling hours: the decisions compared are real ones.
NOW = datetime.now(timezone.utc).replace(hour=2, minute=0)


def on_loop(coroutine_fn):
    """Run `coroutine_fn(store)` with a fresh PgCallStore on the test's database."""
    async def main(url):
        store = await PgCallStore.open(url, size=2, timeout=2.0)
        try:
            return await coroutine_fn(store)
        finally:
            await store.close()
    return main


def client_backends(engine) -> int:
    """Client connections to the test's database, other than the one asking."""
    with engine.connect() as conn:
        return conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND backend_type = 'client backend'")).scalar()


@pytest.fixture
def rich(pg_url):
    """acme with agents (exact and prefix), AXN, AXB and AXE bindings, blocks in force
    of three scopes, and tenant blocks lifted and not yet in force."""
    engine = bound_on_postgresql(pg_url)  # X1 bound to A (AXN)
    tenants.add_tenant(engine, "beta", "+861058000001", callers=["+8613900000002"], caller_prefixes=["+8610555"])
    pool.add_numbers(engine, "acme", [X2, X3])
    axb = bindings.bind(engine, "acme", A, mode="AXB", other_party=B)
    extensions = [bindings.bind(engine, "acme", customer, mode="AXE")["extension"] for customer in (B, A)]
    with engine.begin() as conn:
        conn.execute(insert(Block), [
            {"tenant_id": 1, "scope": scope, "direction": direction, "reason": "test", "created_by": "pytest",
             "number_id": number, "binding_id": binding, "caller": caller,
             "starts_at": NOW + timedelta(seconds=starts), "ends_at": NOW + timedelta(seconds=ends) if ends else None}
            for scope, direction, number, binding, caller, starts, ends in [
                ("caller", "both", None, None, "+8613700000009", -60, None),
                ("binding", "to_customer", None, axb["id"], None, -60, 3600),
                ("number", "from_customer", 3, None, None, -60, None),
                ("tenant", "both", None, None, None, -60, -1),  # lifted: in no facts
                ("tenant", "both", None, None, None, 60, None),  # not yet in force: in no facts
            ]])
    yield engine, extensions
    engine.dispose()


def test_facts_and_decisions_match_the_threaded_path(rich, pg_url, tmp_path):
    rich, extensions = rich
    cases = [(x, caller, extension)
             for x in (X1, X2, X3, "+8617199999999")
             for caller in (AGENT, A, B, "+8613700000009", "+861055512345", None)
             for extension in (None, "", "99999999", *extensions)]
    threaded = CallService(rich, CdrSpool(tmp_path / "spool"))

    async def compare(store):
        on_loop_service = CallService(rich, CdrSpool(tmp_path / "spool"), store=store)
        for x, caller, extension in cases:
            expected = call_facts(rich, x, caller, NOW, extension)
            assert await store.facts(x, caller, NOW, extension) == expected, (x, caller, extension)
            assert (await on_loop_service.route_on_loop(x, caller or "anonymous", NOW, extension)
                    == threaded.route(x, caller or "anonymous", NOW, extension))
        return True

    assert asyncio.run(on_loop(compare)(pg_url))
    # The cases reach every kind of fact: bindings of each mode, blocks, agents.
    seen = [call_facts(rich, x, c, NOW, e) for x, c, e in cases]
    assert {b.mode.value for f in seen if f for b in f.bindings} == {"AXN", "AXB", "AXE"}
    assert {k.scope for f in seen if f for k in f.blocks} == {"caller", "binding", "number"}
    assert {f.tenant.caller_is_agent for f in seen if f} == {True, False}


def test_cdr_rows_written_once_and_read_back_alike(pg_url, tmp_path):
    engine = bound_on_postgresql(pg_url)
    service = CallService(engine, CdrSpool(tmp_path / "spool"))
    start = time.time() - 30
    call = agi_call("loop-1795887084.7", called=X1, caller=AGENT, destination=A, action="bridge",
                        binding="1", tenant="1", direction="to_customer", start=f"{start:.3f}",
                        end=f"{start + 20:.3f}", dial_status="ANSWER", dialed_ms="20000", answered_ms="15000",
                        hangup_cause="16", node="lab")
    row = service.cdr_row(call, datetime.now(timezone.utc))

    async def write_twice(store):
        on_loop_service = CallService(engine, service.spool, store=store)
        return [await on_loop_service.store_row_on_loop(row) for _ in range(2)]

    assert asyncio.run(on_loop(write_twice)(pg_url)) == [True, False]
    # The threaded path sees the very call as written already: same key, same values.
    assert service.store_row(row) is False
    with engine.connect() as conn:  # read back through the model: every value as given
        (stored,) = conn.execute(select(*(Cdr.__table__.c[key] for key in row))).mappings().all()
    assert dict(stored) == row
    assert row["talk_seconds"] == 15.0 and row["callee_masked"] == "+86138****0001"
    engine.dispose()


def test_one_prepared_statement_per_connection_and_stale_plans_replaced(pg_url):
    """asyncpg prepares the facts statement once per connection and then only runs it,
    with no session reset after it; a migration that changes a result column's type under the plan costs nothing but a
    new plan."""
    engine = bound_on_postgresql(pg_url)

    async def calls(store):
        for _ in range(5):
            assert (await store.facts(X1, AGENT, NOW)).bindings[0].party_a == A
        async with store.reads.acquire() as conn:
            pid = conn.get_server_pid()  # (sends nothing)
        with engine.connect() as conn:  # nothing ran after the call: no reset round trip
            last = conn.execute(text("SELECT query FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}).scalar()
        assert len(last) > 500 and FACTS_COMPILED.sql.startswith(last)  # (cut at track_activity_query_size)
        async with store.reads.acquire() as conn:
            prepared = await conn.fetch("SELECT statement FROM pg_prepared_statements")
        facts_plans = [r["statement"] for r in prepared if "FROM virtual_numbers" in r["statement"]]
        assert len(facts_plans) == 1
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE tenants ALTER COLUMN hotline TYPE varchar(24)")
        assert (await store.facts(X1, A, NOW)).tenant.hotline == HOTLINE
        return True

    assert asyncio.run(on_loop(calls)(pg_url))
    engine.dispose()


def test_connections_the_server_dropped_are_replaced(pg_url):
    engine = bound_on_postgresql(pg_url)

    async def calls(store):
        await asyncio.gather(*(store.facts(X1, AGENT, NOW) for _ in range(4)))  # both connections made
        with engine.begin() as conn:
            killed = conn.execute(text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND application_name <> 'psql'")).scalar()
        assert killed >= 2  # this engine's own connection is spared (pg_backend_pid)
        assert (await store.facts(X1, AGENT, NOW)).bindings[0].party_a == A
        return True

    engine.pool.dispose()
    assert asyncio.run(on_loop(calls)(pg_url))
    engine.dispose()


def test_no_database_fails_closed_in_time_without_numbers(tmp_path):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"postgresql://postgres@127.0.0.1:{sock.getsockname()[1]}/nothing"

    async def calls(store):
        service = CallService(None, CdrSpool(tmp_path / "spool"), store=store)
        started = time.monotonic()
        decision = await service.route_on_loop(X1, AGENT)
        with pytest.raises(PgUnavailable) as info:
            await store.write_cdr({"call_id": "x.1", "started_at": NOW, "decision": "bridged"})
        return decision, str(info.value), time.monotonic() - started

    decision, error, took = asyncio.run(on_loop(calls)(url))
    assert decision == (X1, Reject(Reason.UNAVAILABLE))
    assert error in ("ConnectionRefusedError", "OSError") and took < 4.0


def test_a_url_with_libpq_options_works_on_the_loop_too(pg_url):
    """Administrators write libpq URLs: client-side options (connect_timeout, keepalives)
    are db_timeout's business here, and `options` settings reach the server."""
    engine = bound_on_postgresql(pg_url)
    url = pg_url + "?connect_timeout=3&keepalives=1&application_name=callctl-test&options=-c%20work_mem%3D7MB"

    async def calls(store):
        assert (await store.facts(X1, AGENT, NOW)).bindings[0].party_a == A
        async with store.reads.acquire() as conn:
            return await conn.fetchval("SHOW work_mem"), await conn.fetchval("SHOW application_name")

    assert asyncio.run(on_loop(calls)(url)) == ("7MB", "callctl-test")
    engine.dispose()


def test_connections_are_lent_one_statement_at_a_time_and_never_leak(pg_url):
    """The call path's own connection lending: never more than `size` connections; a
    statement that failed or was cut off half-way (timeout, cancel) costs its connection,
    a waiter that gives up costs nothing."""
    engine = bound_on_postgresql(pg_url)

    async def calls(store):
        facts = await asyncio.gather(*(store.facts(X1, AGENT, NOW) for _ in range(20)))
        assert all(f.bindings[0].party_a == A for f in facts)
        assert client_backends(engine) == 2  # size=2 for reads; inserts made none yet
        with pytest.raises(Exception) as refused:
            async with store.reads.acquire() as conn:
                refusing = conn.get_server_pid()
                await conn.fetch("SELEC 1")
        assert type(refused.value).__name__ == "PostgresSyntaxError"
        async with store.reads.acquire() as first, store.reads.acquire() as second:
            assert refusing not in (first.get_server_pid(), second.get_server_pid())
            # every connection lent: a third caller waits, then gives up
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(store.facts(X1, AGENT, NOW), 0.2)
        with pytest.raises(TimeoutError):  # cut off half-way through a statement
            async with store.reads.acquire() as conn:
                cut = conn.get_server_pid()
                await asyncio.wait_for(conn.fetch("SELECT pg_sleep(1)"), 0.2)
        await asyncio.sleep(1.3)  # its backend ends once the sleep is over
        assert client_backends(engine) == 1  # the cut-off one is gone; the other is kept
        assert (await store.facts(X1, AGENT, NOW)).bindings[0].party_a == A
        await asyncio.gather(*(store.facts(X1, AGENT, NOW) for _ in range(20)))
        assert client_backends(engine) == 2  # the waiter that gave up took no slot with it
        async with store.reads.acquire() as first, store.reads.acquire() as second:
            assert cut not in (first.get_server_pid(), second.get_server_pid())
        return True

    assert asyncio.run(on_loop(calls)(pg_url))
    engine.dispose()


def test_warm_connections_are_open_before_the_first_call(pg_url):
    """A started daemon opens its first call-path connections before any call needs one;
    the first calls then open none."""
    engine = bound_on_postgresql(pg_url)

    async def calls(store):
        assert client_backends(engine) == 0
        await store.warm(2)
        assert client_backends(engine) == 4  # two for routing, two for CDRs
        await asyncio.gather(*(store.facts(X1, AGENT, NOW) for _ in range(2)))
        return client_backends(engine)

    assert asyncio.run(on_loop(calls)(pg_url)) == 4
    engine.dispose()


def test_warming_with_no_database_is_one_clear_error(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"postgresql://postgres@127.0.0.1:{sock.getsockname()[1]}/nothing"

    async def calls(store):
        with pytest.raises(PgUnavailable) as info:
            await store.warm(2)
        return str(info.value)

    assert asyncio.run(on_loop(calls)(url)) in ("ConnectionRefusedError", "OSError")


def _finished_rows(service, count: int, prefix: str) -> list[dict]:
    start = time.time() - 30
    return [service.cdr_row(agi_call(
        f"{prefix}-{n}", called=X1, caller=AGENT, destination=A, action="bridge", binding="1", tenant="1",
        direction="to_customer", start=f"{start + n:.3f}", end=f"{start + n + 20:.3f}", dial_status="ANSWER",
        dialed_ms="20000", answered_ms="15000", hangup_cause="16", node="lab"), datetime.now(timezone.utc))
        for n in range(count)]


def _batches() -> tuple[float, float]:
    """(batches, rows) the group commit has written so far in this process."""
    from prometheus_client import REGISTRY
    return (REGISTRY.get_sample_value("callctl_cdr_batch_rows_count") or 0.0,
            REGISTRY.get_sample_value("callctl_cdr_batch_rows_sum") or 0.0)


def test_group_commit_writes_many_cdrs_in_one_statement_each_once_with_its_event(pg_url, tmp_path):
    from callctl.webhooks import add_webhook
    engine = bound_on_postgresql(pg_url)
    add_webhook(engine, "acme", "http://127.0.0.1:9/hook")
    service = CallService(engine, CdrSpool(tmp_path / "spool"))
    rows = _finished_rows(service, 30, "group")
    before = _batches()

    async def write_all(store):
        return await asyncio.gather(*(store.write_cdr(row) for row in rows))

    async def main():
        store = await PgCallStore.open(pg_url, size=2, timeout=2.0, cdr_linger=0.2)
        try:
            first = await write_all(store)
            return first, await write_all(store)  # the same calls again: all duplicates
        finally:
            await store.close()

    first, again = asyncio.run(main())
    assert first == [True] * 30 and again == [False] * 30
    batches, written = (after - was for after, was in zip(_batches(), before))
    assert written == 60 and batches <= 4  # 30 rows waited together, twice: not 60 statements
    with engine.connect() as conn:  # every value as given, as from the one-row statement
        stored = conn.execute(select(*(Cdr.__table__.c[key] for key in rows[0])).order_by(Cdr.call_id)).mappings().all()
        events = conn.execute(text("SELECT body FROM events WHERE kind = 'call.ended'")).scalars().all()
    assert [dict(r) for r in stored] == sorted(rows, key=lambda r: r["call_id"])
    assert sorted(json.loads(body)["call_id"] for body in events) == sorted(r["call_id"] for r in rows)
    engine.dispose()


def test_group_commit_one_call_reported_twice_in_a_batch_is_written_once(pg_url, tmp_path):
    engine = bound_on_postgresql(pg_url)
    service = CallService(engine, CdrSpool(tmp_path / "spool"))
    row = _finished_rows(service, 1, "twice")[0]
    later = {**row, "started_at": row["started_at"] + timedelta(seconds=2)}  # another start, same call

    async def main():
        store = await PgCallStore.open(pg_url, size=2, timeout=2.0, cdr_linger=0.2)
        try:
            return await asyncio.gather(store.write_cdr(row), store.write_cdr(later))
        finally:
            await store.close()

    assert asyncio.run(main()) == [True, False]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM cdrs WHERE call_id = 'twice-0'")).scalar() == 1
    engine.dispose()


@pytest.mark.parametrize("refused", ["server", "client"])
def test_group_commit_a_row_the_database_refuses_fails_alone(pg_url, tmp_path, refused):
    """A batch refused for one row's sake is written again row by row: the neighbours
    are written, the bad row alone fails (the daemon then spools it)."""
    engine = bound_on_postgresql(pg_url)
    service = CallService(engine, CdrSpool(tmp_path / "spool"))
    rows = _finished_rows(service, 5, f"refused-{refused}")
    if refused == "server":
        rows[2]["call_id"] = "x" * 200  # longer than the column: PostgreSQL refuses it
    else:
        rows[2]["hangup_cause"] = 2 ** 40  # no 32-bit integer: asyncpg refuses to send it

    async def main():
        store = await PgCallStore.open(pg_url, size=2, timeout=2.0, cdr_linger=0.2)
        try:
            return await asyncio.gather(*(store.write_cdr(row) for row in rows), return_exceptions=True)
        finally:
            await store.close()

    results = asyncio.run(main())
    assert results[:2] + results[3:] == [True] * 4
    assert isinstance(results[2], PgUnavailable)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM cdrs")).scalar() == 4
    engine.dispose()


def test_group_commit_with_no_database_fails_every_writer_in_time(tmp_path):
    async def main():
        store = await PgCallStore.open("postgresql://postgres@127.0.0.1:1/none", size=2, timeout=1.0, cdr_linger=0.05)
        service = CallService(None, CdrSpool(tmp_path / "spool"))
        rows = [{**row, "call_id": f"down-{n}"} for n, row in enumerate(_finished_rows(service, 3, "down"))]
        began = time.monotonic()
        results = await asyncio.gather(*(store.write_cdr(row) for row in rows), return_exceptions=True)
        await store.close()
        return results, time.monotonic() - began

    results, seconds = asyncio.run(main())
    assert all(isinstance(r, PgUnavailable) for r in results), results
    assert seconds < 5


def test_the_synchronous_path_prepares_once_per_connection_and_replaces_stale_plans(pg_url):
    """psycopg2 (the FreeSWITCH backend, the CLI) runs the facts statement and the CDR
    insert as prepared statements too: PREPARE once per connection, then EXECUTE; a
    migration that changes a result column's type under the plan costs a new plan."""
    from callctl.store.calls import write_cdr
    from callctl.store.db import make_engine
    engine = bound_on_postgresql(pg_url)
    one = make_engine(pg_url, pool_size=1)  # one connection: every call on it
    for _ in range(5):
        assert call_facts(one, X1, AGENT, NOW).bindings[0].party_a == A
    service = CallService(one, CdrSpool("/nonexistent"))
    row = _finished_rows(service, 1, "sync")[0]
    assert [write_cdr(one, row), write_cdr(one, row)] == [True, False]
    with one.connect() as conn:
        statements = conn.exec_driver_sql("SELECT statement FROM pg_prepared_statements").scalars().all()
    assert sum("FROM virtual_numbers" in s and "INSERT" not in s for s in statements) == 1
    assert sum(s.startswith("PREPARE") and "INSERT INTO cdrs" in s for s in statements) == 1
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE tenants ALTER COLUMN hotline TYPE varchar(24)")
    assert call_facts(one, X1, A, NOW).tenant.hotline == HOTLINE
    one.dispose()
    engine.dispose()
