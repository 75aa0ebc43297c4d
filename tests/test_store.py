"""Provisioning, call-time facts and CDR writes on SQLite and PostgreSQL."""
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import create_engine, insert, text

from callctl.core.decision import Bridge, Direction, Reason, Reject
from callctl.service import CallService, decision_variables
from tests.agicalls import agi_call
from callctl.store import bindings, cdrs, pool, tenants
from callctl.store.models import Block
from callctl.errors import ProvisionError
from callctl.store.crypto import number_hash
from callctl.store.spool import CdrSpool

A, AGENT, HOTLINE = "+8613800000001", "+8613900000001", "+861058000000"
X1, X2 = "+8617100000001", "+8617100000002"
ALL_DAY = "00:00-24:00"


@pytest.fixture
def acme(engine):
    # Calling hours (test_policy.py) must not make these tests depend on the time of day.
    tenants.add_tenant(engine, "acme", HOTLINE, callers=[AGENT], caller_prefixes=["+8610555"], hours=ALL_DAY)
    pool.add_numbers(engine, "acme", [X1, X2])
    return engine


@pytest.fixture
def service(acme, tmp_path):
    return CallService(acme, CdrSpool(tmp_path / "spool"), node="test")


def test_bind_routes_both_ways_and_prefix_agents(service, acme):
    binding = bindings.bind(acme, "acme", "138 0000 0001", reference="POL-1")
    assert binding["x"] == X1 and binding["customer"] == "+86138****0001"
    assert A not in str(binding)
    assert service.route(X1, AGENT)[1].destination == A
    assert service.route(X1, "+861055512345")[1].destination == A  # prefix agent
    assert service.route("017100000001", "13800000001")[1].destination == HOTLINE  # national forms
    assert service.route(X1, "+8613700000000")[1] == Reject(Reason.UNKNOWN_CALLER, tenant_id=1)
    assert service.route(X2, AGENT)[1].reason == Reason.UNKNOWN_NUMBER  # in the pool, unbound
    assert service.route("+8617199999999", AGENT)[1] == Reject(Reason.UNKNOWN_NUMBER)
    assert service.route("garbage", AGENT) == (None, Reject(Reason.UNKNOWN_NUMBER))


def test_expiry_and_unbind_with_quarantine(service, acme):
    now = datetime.now(timezone.utc)
    binding = bindings.bind(acme, "acme", A, ttl_seconds=60, now=now)
    assert isinstance(service.route(X1, AGENT, now=now + timedelta(seconds=59))[1], Bridge)
    assert service.route(X1, AGENT, now=now + timedelta(seconds=61))[1].reason == Reason.EXPIRED
    bindings.unbind(acme, binding["id"], timedelta(days=1), now=now)
    assert service.route(X1, AGENT)[1].reason == Reason.UNKNOWN_NUMBER
    assert pool.pool_status(acme, "acme") == {"free": 1, "bound": 0, "quarantined": 1, "disabled": 0}
    assert bindings.bind(acme, "acme", A, now=now)["x"] == X2  # X1 rests
    with pytest.raises(ProvisionError) as info:
        bindings.bind(acme, "acme", A, now=now)
    assert info.value.code == "pool_exhausted"
    assert bindings.bind(acme, "acme", A, now=now + timedelta(days=1, seconds=1))["x"] == X1


def test_block_is_seen_on_the_next_call(service, acme):
    binding = bindings.bind(acme, "acme", A)
    with acme.begin() as conn:
        conn.execute(text(
            "INSERT INTO blocks (tenant_id, scope, direction, binding_id, reason, created_by, starts_at)"
            " VALUES (1, 'binding', 'to_customer', :b, 'test', 'pytest', :t)"
        ), {"b": binding["id"], "t": datetime(2020, 1, 1)})
    assert service.route(X1, AGENT)[1].reason == Reason.BLOCKED
    assert service.route(X1, A)[1].destination == HOTLINE  # the other direction still flows


@pytest.mark.parametrize("scope, target, starts, ends, agent_blocked, customer_blocked", [
    ("caller", AGENT, -60, None, True, False),         # that agent only
    ("number", "X", -60, None, True, True),            # direction both: X is dead both ways
    ("tenant", None, -60, None, True, True),           # suspension
    ("tenant", None, -60, -1, False, False),           # lifted a second ago
    ("tenant", None, 60, None, False, False),          # not yet in force
])
def test_block_scopes_and_time_window(service, acme, scope, target, starts, ends, agent_blocked, customer_blocked):
    bindings.bind(acme, "acme", A)
    now = datetime.now(timezone.utc)
    with acme.begin() as conn:
        # Through the model: the caller is stored encrypted, with its lookup hash.
        conn.execute(insert(Block), {
            "tenant_id": 1, "scope": scope, "direction": "both", "reason": "test", "created_by": "pytest",
            "number_id": 1 if target == "X" else None, "caller": AGENT if scope == "caller" else None,
            "starts_at": now + timedelta(seconds=starts), "ends_at": now + timedelta(seconds=ends) if ends else None})
    assert (service.route(X1, AGENT)[1].action == "reject") == agent_blocked
    assert (service.route(X1, A)[1].action == "reject") == customer_blocked
    assert service.route(X1, "+861055500000")[1].action == ("reject" if scope in ("number", "tenant") and agent_blocked else "bridge")


@pytest.mark.parametrize("kwargs, code", [
    ({"customer": "12345"}, "invalid_number"),
    ({"customer": A, "ttl_seconds": 0}, "invalid_expiry"),
    ({"customer": A, "expires_at": datetime(2020, 1, 1, tzinfo=timezone.utc)}, "invalid_expiry"),
    ({"customer": A, "mode": "AXB"}, "missing_other_party"),
])
def test_bad_bind_input_changes_nothing(acme, kwargs, code):
    with pytest.raises(ProvisionError) as info:
        bindings.bind(acme, "acme", **kwargs)
    assert info.value.code == code and A not in str(info.value)
    assert pool.pool_status(acme, "acme")["free"] == 2


def test_duplicate_tenant_and_number(acme):
    with pytest.raises(ProvisionError, match="exists"):
        tenants.add_tenant(acme, "acme", HOTLINE)
    with pytest.raises(ProvisionError) as info:
        pool.add_numbers(acme, "acme", [X1, "+8617100000009"])
    assert info.value.code == "number_exists"
    assert sum(pool.pool_status(acme, "acme").values()) == 2


def finished(call_id="lab-1.1", **extra):
    fields = dict(
        called=X1, caller=AGENT, destination=A, action="bridge", binding="1", tenant="1",
        direction="to_customer", start="1764320000.250", end="1764320012.250",
        dial_status="ANSWER", dialed_ms="12000", answered_ms="9500", hangup_cause="16", node="",
    )
    fields.update(extra)
    return agi_call(call_id, **fields)


def test_cdr_written_once_masked(service, acme):
    assert service.record(finished()) == "written"
    assert service.record(finished()) == "duplicate"
    [row] = cdrs.list_cdrs(acme)
    assert row["caller_masked"] == "+86139****0001" and row["callee_masked"] == "+86138****0001"
    assert row["decision"] == "bridged" and row["ring_seconds"] == 2.5 and row["talk_seconds"] == 9.5
    assert row["started_at"].startswith("2025-11-28T08:53:20.25")
    assert row["answered_at"].startswith("2025-11-28T08:53:22.75")
    assert row["node"] == "test" and row["hangup_cause"] == 16
    assert A not in str(row) and AGENT not in str(row)
    with acme.connect() as conn:  # the anomaly job's per-caller key: keyed hash, never the number
        assert conn.execute(text("SELECT caller_hash FROM cdrs")).scalar() == number_hash(AGENT)


def test_unanswered_bridge_rings_from_start_to_end(service, acme):
    # Asterisk leaves DIALEDTIME_MS/ANSWEREDTIME_MS empty when nobody answered.
    service.record(finished(dial_status="NOANSWER", dialed_ms="", answered_ms="", hangup_cause="19"))
    [row] = cdrs.list_cdrs(acme)
    assert row["ring_seconds"] == 12.0 and row["talk_seconds"] == 0.0 and row["answered_at"] is None


def test_decision_variables_set_action_last():
    bridge = Bridge(destination=A, present=X1, ring_timeout=30, max_seconds=0, binding_id=1,
                    tenant_id=1, direction=Direction.TO_CUSTOMER)
    for decision in (bridge, Reject(Reason.EXPIRED, binding_id=1, tenant_id=1)):
        names = list(decision_variables(decision))
        assert names[-1] == "action" and names.count("action") == 1


def test_cdr_from_garbage_fields_still_written(service, acme):
    call = agi_call("lab-2.2", called="x;DROP", caller="\x00", action="", start="nan",
                        end="-1", dialed_ms="abc", answered_ms="99999999999999", hangup_cause="1e9",
                        purpose="x" * 40)
    assert service.record(call) == "written"
    [row] = cdrs.list_cdrs(acme)
    assert row["decision"] == "rejected" and row["reject_reason"] == "unavailable"
    assert row["virtual_number"] is None and row["hangup_cause"] is None and row["purpose"] is None


def test_database_down_fails_closed_and_spools_then_replays_once(acme, tmp_path):
    dead = create_engine("postgresql+psycopg2://postgres@127.0.0.1:1/none",
                         connect_args={"connect_timeout": 1})
    spool = CdrSpool(tmp_path / "spool")
    down = CallService(dead, spool)
    assert down.route(X1, AGENT)[1] == Reject(Reason.UNAVAILABLE)
    assert down.record(finished("lab-3.1")) == "spooled"
    assert down.record(finished("lab-3.2")) == "spooled"
    assert down.replay_spool() == 0 and spool.pending()
    up = CallService(acme, spool)
    up.record(finished("lab-3.1"))  # one of them also arrived directly: still one row
    assert up.replay_spool() == 2
    assert not spool.pending() and up.replay_spool() == 0
    assert sorted(r["call_id"] for r in cdrs.list_cdrs(acme)) == ["lab-3.1", "lab-3.2"]


def bound_on_postgresql(pg_url: str, **engine_options):
    """A fresh schema on the shared PostgreSQL with acme, X1 and X1 bound to A."""
    from callctl.store.db import make_engine, upgrade

    engine = make_engine(pg_url, **engine_options)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    upgrade(engine)
    tenants.add_tenant(engine, "acme", HOTLINE, callers=[AGENT], hours=ALL_DAY)
    pool.add_numbers(engine, "acme", [X1])
    bindings.bind(engine, "acme", A)
    return engine


def test_call_path_survives_database_connections_killed(pg_url, tmp_path):
    """The daemon's engine skips the pre-checkout ping: a pooled connection killed by a
    database restart or failover is retried once, so the next call is still decided
    and its CDR written (not rejected as unavailable, not spooled)."""
    engine = bound_on_postgresql(pg_url, pool_size=2, pre_ping=False)
    service = CallService(engine, CdrSpool(tmp_path / "spool"))
    assert isinstance(service.route(X1, AGENT)[1], Bridge)  # the pool now holds a connection
    admin = create_engine(pg_url)
    with admin.begin() as conn:
        killed = conn.execute(text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar()
    admin.dispose()
    assert killed >= 1
    assert service.route(X1, AGENT)[1].destination == A
    with admin.begin() as conn:
        conn.execute(text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"))
    admin.dispose()
    call = agi_call("reconnect.1", called=X1, caller=AGENT, action="bridge", destination=A)
    assert service.record(call) == "written"
    assert not service.spool.pending()
    engine.dispose()


def test_a_bare_postgresql_url_uses_the_shipped_driver(pg_url):
    """SQLAlchemy 2.1 reads postgresql:// as psycopg 3, which callctl does not ship: an
    administrator's plain URL must still work, on psycopg2."""
    from callctl.store.db import make_engine

    bare = make_engine(pg_url.replace("postgresql+psycopg2://", "postgresql://"))
    assert bare.dialect.driver == "psycopg2"
    with bare.connect() as conn:
        assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    bare.dispose()
