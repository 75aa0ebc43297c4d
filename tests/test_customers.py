"""Customers in control, in the store and the decision, on SQLite and PostgreSQL
(issue #16): expiry that frees X, late renewal, preferences (opted_out), purposes
(purpose_not_allowed), the outbox events written with what they report, and a daemon's
housekeeping releasing an expired binding with nobody acting."""
from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select

from callctl.core.decision import Bridge, Reason, Reject, decide
from callctl.store import bindings, calls, customers, pool as store_pool, reveal, tenants
from callctl.store.models import AuditEntry, Event, VirtualNumber
from callctl.errors import ProvisionError

AGENT, MARKETER, HOTLINE = "+8613900000171", "+8613900000172", "+861058000171"
OTHER_AGENT, OTHER_HOTLINE = "+8613900000173", "+861058000173"
CUSTOMER, CUSTOMER_2, CUSTOMER_3 = "+8613800000171", "+8613800000172", "+8613800000173"
X, X2 = "+8617100017101", "+8617100017102"
OTHER_X = "+8617100017201"
ALL_DAY = "00:00-24:00"
# Views read expiry against the clock: the tests' "now" is half a minute ago.
T0 = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=30)
SHANGHAI = ZoneInfo("Asia/Shanghai")


def _tenants(engine, pool=(X,)):
    tenants.add_tenant(engine, "acme", HOTLINE, callers=[AGENT], hours=ALL_DAY)
    tenants.add_callers(engine, "acme", callers=[MARKETER], purpose="marketing")
    store_pool.add_numbers(engine, "acme", list(pool))
    tenants.add_tenant(engine, "other", OTHER_HOTLINE, callers=[OTHER_AGENT], hours=ALL_DAY)
    store_pool.add_numbers(engine, "other", [OTHER_X])


def _call(engine, caller, x, now=T0):
    return decide(caller, now, calls.call_facts(engine, x, caller, now))


def _events(engine, kind=None):
    with engine.connect() as conn:
        query = select(Event.kind, Event.body, Event.tenant_id).order_by(Event.id)
        rows = conn.execute(query if kind is None else query.where(Event.kind == kind)).all()
    return [(k, json.loads(b), t) for k, b, t in rows]


# --- expiry -----------------------------------------------------------------------------

def test_expired_binding_frees_its_only_x_and_reads_expired_everywhere(engine):
    _tenants(engine)
    old = bindings.bind(engine, "acme", CUSTOMER, ttl_seconds=2, now=T0)
    later = T0 + timedelta(seconds=3)
    with pytest.raises(ProvisionError) as exc:  # without housekeeping (no quarantine given)
        bindings.bind(engine, "acme", CUSTOMER_2, now=later)
    assert exc.value.code == "pool_exhausted"
    assert bindings.get_binding(engine, old["id"])["status"] == "expired"  # before housekeeping too
    assert bindings.expire_due(engine, timedelta(0), now=later) == 1
    assert bindings.expire_due(engine, timedelta(0), now=later) == 0
    assert store_pool.pool_status(engine, "acme")["quarantined"] == 1
    new = bindings.bind(engine, "acme", CUSTOMER_2, now=later)
    assert new["x"] == X
    view = bindings.get_binding(engine, old["id"])
    assert view["status"] == "expired" and view["ended_at"] == old["expires_at"]
    assert [b["id"] for b in bindings.list_bindings(engine, status="expired", now=later)["items"]] == [old["id"]]
    assert bindings.list_bindings(engine, status="ended", now=later)["items"] == []
    (kind, body, tenant), = _events(engine, "binding.expired")
    assert body["id"] == old["id"] and body["customer"] == "+86138****0171" and body["x"] == X
    # The old customer no longer reaches anyone through X; the new one does.
    assert _call(engine, AGENT, X, later) == Bridge(CUSTOMER_2, X, 30, 3600, new["id"], 1, "to_customer",
                                                     purpose="service")


def test_the_allocator_releases_lapsed_bindings_when_the_pool_has_nothing_else(engine):
    _tenants(engine)
    bindings.bind(engine, "acme", CUSTOMER, ttl_seconds=2, now=T0)
    made = bindings.bind(engine, "acme", CUSTOMER_2, now=T0 + timedelta(seconds=3), quarantine=timedelta(0))
    assert made["x"] == X
    # With a real cooldown, the released X rests: the pool is exhausted still.
    store_pool.add_numbers(engine, "acme", [X2])
    bindings.bind(engine, "acme", CUSTOMER_3, ttl_seconds=2, now=T0)
    with pytest.raises(ProvisionError) as exc:
        bindings.bind(engine, "acme", CUSTOMER, now=T0 + timedelta(seconds=3), quarantine=timedelta(days=30))
    assert exc.value.code == "pool_exhausted"


def test_an_expired_x_rests_as_long_as_its_binding_lived_at_most_the_cooldown(engine):
    _tenants(engine, pool=(X, X2))
    cooldown = timedelta(days=30)
    # A temporary binding: 2 seconds bound, 2 seconds at rest, counted from its expiry.
    short = bindings.bind(engine, "acme", CUSTOMER, ttl_seconds=2, now=T0)
    # A policy: a year bound, the full cooldown at rest.
    policy = bindings.bind(engine, "acme", CUSTOMER_2, expires_at=T0 + timedelta(days=365),
                           now=T0 - timedelta(days=1))
    assert bindings.expire_due(engine, cooldown, now=T0 + timedelta(days=365)) == 2
    with engine.connect() as conn:
        rests = dict(conn.execute(select(VirtualNumber.e164, VirtualNumber.quarantined_until)).all())
    assert rests[short["x"]] == T0 + timedelta(seconds=4)
    assert rests[policy["x"]] == T0 + timedelta(days=365 + 30)
    # The cooldown is the most: a cap of 0 gives X back at once.
    again = bindings.bind(engine, "acme", CUSTOMER_3, ttl_seconds=3600, now=T0 + timedelta(days=365))
    assert again["x"] == short["x"]
    assert bindings.expire_due(engine, timedelta(0), now=T0 + timedelta(days=366)) == 1
    assert bindings.bind(engine, "acme", CUSTOMER, now=T0 + timedelta(days=366))["x"] == short["x"]


def test_a_bind_that_finds_the_pool_exhausted_keeps_its_release_of_lapsed_bindings(engine):
    _tenants(engine)
    old = bindings.bind(engine, "acme", CUSTOMER, ttl_seconds=2, now=T0)
    cooldown = timedelta(days=30)
    # At T0+3 X rests (until T0+4): the bind fails, but the lapsed binding stays released.
    with pytest.raises(ProvisionError) as exc:
        bindings.bind(engine, "acme", CUSTOMER_2, now=T0 + timedelta(seconds=3), quarantine=cooldown)
    assert exc.value.code == "pool_exhausted"
    assert store_pool.pool_status(engine, "acme") == {"free": 0, "bound": 0, "quarantined": 1, "disabled": 0}
    assert [body["id"] for _, body, _ in _events(engine, "binding.expired")] == [old["id"]]
    assert bindings.expire_due(engine, cooldown, now=T0 + timedelta(seconds=3)) == 0
    made = bindings.bind(engine, "acme", CUSTOMER_2, now=T0 + timedelta(seconds=4), quarantine=cooldown)
    assert made["x"] == X


def test_late_renewal_revives_on_the_same_x_unless_x_was_reused(engine):
    _tenants(engine, pool=(X, X2))
    first = bindings.bind(engine, "acme", CUSTOMER, ttl_seconds=2, now=T0)
    second = bindings.bind(engine, "acme", CUSTOMER_2, ttl_seconds=2, now=T0)
    later = T0 + timedelta(seconds=3)
    bindings.expire_due(engine, timedelta(0), now=later)
    revived = bindings.extend_binding(engine, first["id"], ttl_seconds=3600, now=later)
    assert revived["status"] == "active" and revived["x"] == first["x"] and revived["ended_at"] is None
    assert _call(engine, AGENT, first["x"], later + timedelta(seconds=1)).destination == CUSTOMER
    # second's X goes to someone else: no revival, the new customer keeps it.
    taken = bindings.bind(engine, "acme", CUSTOMER_3, now=later)
    assert taken["x"] == second["x"]
    with pytest.raises(ProvisionError) as exc:
        bindings.extend_binding(engine, second["id"], ttl_seconds=3600, now=later)
    assert exc.value.code == "binding_expired" and "bind again" in str(exc.value)
    assert bindings.get_binding(engine, second["id"])["status"] == "expired"
    ended = bindings.unbind(engine, taken["id"], timedelta(0), now=later)
    with pytest.raises(ProvisionError) as exc:  # an unbound binding is never revived
        bindings.extend_binding(engine, ended["id"], ttl_seconds=3600, now=later)
    assert exc.value.code == "binding_ended"


def test_expiry_by_two_housekeepers_at_once_releases_each_binding_once(engine, tmp_path):
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time")
    pool = [f"+86171000173{i:02d}" for i in range(40)]
    _tenants(engine, pool=pool)
    customers_ = [f"+861380001{i:04d}" for i in range(40)]
    for customer in customers_:
        bindings.bind(engine, "acme", customer, ttl_seconds=2, now=T0)
    later = T0 + timedelta(seconds=3)
    counts = []
    threads = [threading.Thread(target=lambda: counts.append(bindings.expire_due(engine, timedelta(0), now=later)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(counts) == 40
    assert len(_events(engine, "binding.expired")) == 40
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).where(VirtualNumber.state == "quarantined")) == 40


# --- preferences and purposes --------------------------------------------------------------

def test_customer_preferences_outrank_the_insurer_and_are_audited(engine):
    _tenants(engine)
    bindings.bind(engine, "acme", CUSTOMER, now=T0)
    bindings.bind(engine, "other", CUSTOMER, now=T0)
    view = customers.set_preference(engine, "acme", CUSTOMER, actor="support:li", calls="none", now=T0)
    assert view["calls"] == "none" and view["customer"] == "+86138****0171"
    refused = _call(engine, AGENT, X)
    assert isinstance(refused, Reject) and refused.reason == Reason.OPTED_OUT
    assert _call(engine, OTHER_AGENT, OTHER_X).destination == CUSTOMER  # another insurer: still allowed
    assert _call(engine, CUSTOMER, X).destination == HOTLINE  # the customer reaches the hotline
    # service only: a marketing agent is opted out, a service agent goes through.
    customers.set_preference(engine, "acme", CUSTOMER, actor="support:li", calls="service_only", now=T0)
    assert _call(engine, MARKETER, X).reason == Reason.OPTED_OUT
    assert isinstance(_call(engine, AGENT, X), Bridge)
    # the customer's quiet hours (the tenant's zone), from an hour before T0 to an hour after.
    quiet = "-".join((T0 + timedelta(hours=h)).astimezone(SHANGHAI).strftime("%H:%M") for h in (-1, 1))
    customers.set_preference(engine, "acme", CUSTOMER, actor="support:li", calls="allowed",
                             quiet_hours=quiet, now=T0)
    assert _call(engine, AGENT, X).reason == Reason.OPTED_OUT
    assert isinstance(_call(engine, AGENT, X, T0 + timedelta(hours=2)), Bridge)
    with engine.connect() as conn:
        audit = conn.execute(select(AuditEntry.actor, AuditEntry.action, AuditEntry.detail)
                             .where(AuditEntry.action == "preference_set")).all()
    assert len(audit) == 3 and all(a == "support:li" for a, _, _ in audit)
    assert CUSTOMER not in "".join(d for _, _, d in audit) and "+86138****0171" in audit[0][2]
    assert reveal.verify(engine)["ok"]
    assert [b["calls"] for _, b, _ in _events(engine, "preference.changed")] == ["none", "service_only", "allowed"]


@pytest.mark.parametrize("given, code", [
    (dict(calls="never"), "invalid_calls"), (dict(channel="fax"), "invalid_channel"),
    (dict(quiet_hours="25:00-06:00"), "invalid_hours"), (dict(quiet_hours="08:00-08:00"), "invalid_hours"),
    ({}, "nothing_to_change"), (dict(calls="none", require_consent=True), "missing_consent"),
])
def test_bad_preferences_change_nothing(engine, given, code):
    _tenants(engine)
    with pytest.raises(ProvisionError) as exc:
        customers.set_preference(engine, "acme", CUSTOMER, actor="app", **given)
    assert exc.value.code == code and CUSTOMER not in str(exc.value)
    assert customers.get_preference(engine, "acme", CUSTOMER)["updated_at"] is None
    assert _events(engine) == []


def test_purposes_of_caller_groups_and_bindings(engine):
    _tenants(engine, pool=(X, X2))
    default = bindings.bind(engine, "acme", CUSTOMER, now=T0)
    assert default["purposes"] == ["claims", "renewal", "service"]
    assert _call(engine, MARKETER, default["x"]).reason == Reason.PURPOSE_NOT_ALLOWED
    assert isinstance(_call(engine, AGENT, default["x"]), Bridge)
    assert _call(engine, CUSTOMER, default["x"]).destination == HOTLINE  # never limited towards the tenant
    marketing = bindings.bind(engine, "acme", CUSTOMER_2, purposes=["service", "marketing"], now=T0)
    assert isinstance(_call(engine, MARKETER, marketing["x"]), Bridge)
    bindings.set_binding_policy(engine, marketing["id"], purposes=["claims"])
    assert _call(engine, AGENT, marketing["x"]).reason == Reason.PURPOSE_NOT_ALLOWED
    with pytest.raises(ProvisionError) as exc:
        bindings.bind(engine, "acme", CUSTOMER_3, purposes=["spam"])
    assert exc.value.code == "invalid_purpose"
    groups = tenants.list_tenants(engine)[0]["caller_groups"]
    assert groups == {"marketing": [MARKETER], "service": [AGENT]}


def test_self_service_menu_and_keys(engine):
    _tenants(engine)
    bindings.bind(engine, "acme", CUSTOMER, now=T0)
    bindings.bind(engine, "other", CUSTOMER, now=T0)
    menu = customers.selfservice_menu(engine, CUSTOMER)
    assert [(m["key"], m["tenant"], m["calls"]) for m in menu] == [("1", "acme", "allowed"), ("2", "other", "allowed")]
    assert customers.selfservice_toggle(engine, CUSTOMER, "2")["calls"] == "none"
    assert customers.selfservice_toggle(engine, CUSTOMER, "3") is None
    assert customers.selfservice_menu(engine, CUSTOMER_2) == []
    assert _call(engine, OTHER_AGENT, OTHER_X).reason == Reason.OPTED_OUT
    assert customers.selfservice_toggle(engine, CUSTOMER, "2")["calls"] == "allowed"
    assert isinstance(_call(engine, OTHER_AGENT, OTHER_X), Bridge)


# --- the outbox -----------------------------------------------------------------------------

def _cdr(call_id, decision, reason=None, tenant=1):
    return {"call_id": call_id, "tenant_id": tenant, "binding_id": 1, "virtual_number": X,
            "direction": "to_customer", "caller_masked": "+86139****0171", "caller_hash": "h",
            "callee_masked": None, "decision": decision, "reject_reason": reason, "started_at": T0,
            "answered_at": None, "ended_at": T0 + timedelta(seconds=2), "ring_seconds": None,
            "talk_seconds": None, "dial_status": None, "hangup_cause": 21, "node": "t"}


def test_call_events_are_written_with_their_cdr_only_for_tenants_with_a_webhook(engine):
    from callctl import webhooks

    _tenants(engine)
    assert calls.write_cdr(engine, _cdr("c-1", "rejected", "opted_out")) is True
    assert _events(engine) == []  # no webhook: no event
    webhooks.add_webhook(engine, "acme", "http://127.0.0.1:9/hook")
    assert calls.write_cdr(engine, _cdr("c-2", "rejected", "opted_out")) is True
    assert calls.write_cdr(engine, _cdr("c-2", "rejected", "opted_out")) is False  # a replay: no second event
    assert calls.write_cdrs(engine, [_cdr("c-3", "bridged"), _cdr("c-4", "rejected", "blocked", tenant=2)]) == 2
    made = _events(engine)
    assert [(k, b["call_id"], t) for k, b, t in made] == [("call.refused", "c-2", 1), ("call.ended", "c-3", 1)]
    assert made[0][1]["reject_reason"] == "opted_out" and "caller_hash" not in made[0][1]


def test_call_events_on_the_daemons_postgresql_path_are_in_the_cdrs_statement(engine):
    """The daemon on PostgreSQL writes CDRs with asyncpg (callctl.store.pgcalls): the CDR
    and its event in one statement, once per call however often it is reported."""
    if engine.dialect.name != "postgresql":
        pytest.skip("the asyncpg path is PostgreSQL's")
    import asyncio

    from callctl import webhooks
    from callctl.store.pgcalls import PgCallStore

    _tenants(engine)
    webhooks.add_webhook(engine, "acme", "http://127.0.0.1:9/hook")

    async def write(rows):
        store = await PgCallStore.open(engine.url.render_as_string(hide_password=False), size=1, timeout=2.0)
        try:
            return [await store.write_cdr(row) for row in rows]
        finally:
            await store.close()

    rows = [_cdr("p-1", "rejected", "purpose_not_allowed"), _cdr("p-1", "rejected", "purpose_not_allowed"),
            _cdr("p-2", "bridged"), _cdr("p-3", "rejected", "blocked", tenant=2)]
    assert asyncio.run(write(rows)) == [True, False, True, True]
    made = _events(engine)
    assert [(k, b["call_id"]) for k, b, _ in made] == [("call.refused", "p-1"), ("call.ended", "p-2")]
    assert made[0][1]["reject_reason"] == "purpose_not_allowed" and made[0][1]["started_at"] == T0.isoformat()


# --- protection profiles ----------------------------------------------------------------------

def test_a_protected_customer_is_called_only_within_the_profiles_hours(engine):
    from datetime import time as clock

    _tenants(engine, pool=(X, X2))
    plain = bindings.bind(engine, "acme", CUSTOMER, now=T0)
    elderly = bindings.bind(engine, "acme", CUSTOMER_2, profile="elderly", now=T0)
    local = T0.astimezone(SHANGHAI)
    # The profile's hours end an hour before T0 (local): the elderly customer is not called now.
    hours = {"elderly": (clock(0, 0) if local.hour < 1 else clock(0, 0), (local - timedelta(hours=1)).time())}
    if local.hour < 1:  # 00:xx: a window that ended "an hour before" would cross midnight; use a later one
        hours = {"elderly": ((local + timedelta(hours=1)).time(), (local + timedelta(hours=2)).time())}
    facts = lambda x: calls.call_facts(engine, x, AGENT, T0)  # noqa: E731
    assert decide(AGENT, T0, facts(elderly["x"]), profile_hours=hours).reason == Reason.OUTSIDE_HOURS
    assert isinstance(decide(AGENT, T0, facts(plain["x"]), profile_hours=hours), Bridge)
    assert isinstance(decide(AGENT, T0, facts(elderly["x"])), Bridge)  # no profile hours configured
    assert decide(CUSTOMER_2, T0, calls.call_facts(engine, elderly["x"], CUSTOMER_2, T0),
                  profile_hours=hours).destination == HOTLINE  # the customer may always call


def test_profiles_tighten_per_customer_rules_and_lengthen_automatic_blocks(engine):
    from callctl.anomaly.config import RULES, AnomalyConfig
    from callctl.anomaly.job import list_findings, run_pass
    from callctl.store.models import Block

    _tenants(engine, pool=(X, X2))
    plain = bindings.bind(engine, "acme", CUSTOMER, now=T0)
    elderly = bindings.bind(engine, "acme", CUSTOMER_2, profile="elderly", now=T0)
    start = T0 - timedelta(hours=3)
    rows = [_cdr(f"pf-{b}-{n}", "bridged") | {"binding_id": b, "started_at": start + timedelta(minutes=n)}
            for b in (plain["id"], elderly["id"]) for n in range(3)]
    calls.write_cdrs(engine, rows)
    chosen = {r: {"enabled": False} for r in RULES}
    chosen["customer_frequency"] = {"calls": 10, "action": "block", "block": {"seconds": 3600}}
    config = AnomalyConfig.model_validate({"rules": chosen, "profiles": {
        "elderly": {"block_factor": 3, "rules": {"customer_frequency": {"calls": 3}}}}})
    now = T0
    result = run_pass(engine, config, now=now)
    found = list_findings(engine)
    assert [(f["subject"], f["threshold"]) for f in found] == [(str(elderly["id"]), 3.0)]  # 3 calls: only the elderly
    assert result.blocks == 1
    with engine.connect() as conn:
        block = conn.execute(select(Block)).one()
    assert block.binding_id == elderly["id"] and block.ends_at == now + timedelta(hours=3)  # 3 x 3600 s
    assert [b["subject_kind"] for _, b, _ in _events(engine, "finding.raised")] == ["binding"]
    assert [b["binding_id"] for _, b, _ in _events(engine, "block.placed")] == [elderly["id"]]


def test_two_deliverers_at_once_send_each_event_once(engine):
    """Deliverers claim due deliveries the others do not hold (SKIP LOCKED, then a lease)."""
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time")
    import httpx

    from callctl import webhooks
    from tests.test_customers_daemon import Receiver

    _tenants(engine)
    receiver = Receiver()
    receiver.start()
    try:
        webhooks.add_webhook(engine, "acme", receiver.url, secret="s" * 20)
        calls.write_cdrs(engine, [_cdr(f"two-{n}", "bridged") for n in range(40)])

        errors = []

        def deliverer():
            try:
                with httpx.Client(timeout=5) as client:
                    while webhooks.deliver_once(engine, client, batch=5)["sent"]:
                        pass
            except Exception as exc:  # noqa: BLE001 - a deliverer must never die of the other's work
                errors.append(exc)

        threads = [threading.Thread(target=deliverer) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        receiver.stop()
    assert errors == []  # e.g. both queueing one event: the unique (webhook, event) row
    ids = [json.loads(body)["id"] for _, body in receiver.got]
    assert len(ids) == len(set(ids)) == 40
    assert webhooks.list_webhooks(engine)[0]["delivered"] == 40


def test_a_deliverer_facing_a_dead_endpoint_waits_between_passes_while_calls_go_on(engine):
    """With the endpoint refusing and a call event arriving between passes (calls go on),
    `deliver --follow` waits its interval after every pass that sent nothing: it never
    spins retrying the dead endpoint on the CPU calls need."""
    from callctl import webhooks
    from lab.harness import free_port

    _tenants(engine)
    webhooks.add_webhook(engine, "acme", f"http://127.0.0.1:{free_port()}/down", secret="s" * 20)

    class CallsGoOn:  # deliver()'s stop: a call's event after each pass, stopped after five
        passes = waits = 0

        def is_set(self):
            self.passes += 1
            calls.write_cdrs(engine, [_cdr(f"down-{self.passes}", "bridged")])
            return self.passes == 5

        def wait(self, _seconds):
            self.waits += 1

    stop = CallsGoOn()
    totals = webhooks.deliver(engine, webhooks.Retry(first=0.01, most=0.01, timeout=2), follow=True, stop=stop)
    assert totals["sent"] == 0 and totals["failed"] >= 1 and totals["queued"] >= 4
    assert stop.waits == 4  # after each of the first four passes
