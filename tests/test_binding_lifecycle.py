"""Binding lifecycle in the store and through the CLI, on SQLite and PostgreSQL:
long-term and temporary bindings, extend, change the customer's number, unbind with a
quarantine cooldown, get and paged/filtered list, tenant scoping."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from callctl.core.decision import Bridge, Reason
from callctl.service import CallService
from callctl.store import bindings, pool, tenants
from callctl.errors import ProvisionError
from callctl.store.spool import CdrSpool

from tests.test_cli import cli  # noqa: F401  (the real `callctl` command, both databases)

A, A2, AGENT, HOTLINE = "+8613800000001", "+8613800000002", "+8613900000001", "+861058000000"
X1, X2, X3 = "+8617100000001", "+8617100000002", "+8617100000003"
NOW = datetime(2026, 11, 29, 8, 0, tzinfo=timezone.utc)


@pytest.fixture
def acme(engine):
    tenants.add_tenant(engine, "acme", HOTLINE, callers=[AGENT])
    pool.add_numbers(engine, "acme", [X1, X2, X3])
    tenants.add_tenant(engine, "other", "+861058000001", callers=["+8613900000009"])
    pool.add_numbers(engine, "other", ["+8617200000001"])
    return engine


def route(engine, tmp_path, x, caller, now):
    return CallService(engine, CdrSpool(tmp_path / "spool")).route(x, caller, now=now)[1]


def test_long_term_and_temporary_bindings_expire_at_call_time(acme, tmp_path):
    long_term = bindings.bind(acme, "acme", A, expires_at=NOW + timedelta(days=365), now=NOW)
    temporary = bindings.bind(acme, "acme", A2, ttl_seconds=600, now=NOW)
    assert long_term["expires_at"] == "2027-11-29T08:00:00+00:00"
    assert temporary["expires_at"] == "2026-11-29T08:10:00+00:00"
    after_ttl = NOW + timedelta(seconds=601)
    assert isinstance(route(acme, tmp_path, long_term["x"], AGENT, after_ttl), Bridge)
    assert route(acme, tmp_path, temporary["x"], AGENT, after_ttl).reason == Reason.EXPIRED


def test_extend_renews_even_after_expiry_and_can_drop_the_expiry(acme, tmp_path):
    binding = bindings.bind(acme, "acme", A, ttl_seconds=60, now=NOW)
    late = NOW + timedelta(seconds=61)
    assert route(acme, tmp_path, X1, AGENT, late).reason == Reason.EXPIRED
    renewed = bindings.extend_binding(acme, binding["id"], NOW + timedelta(days=30), now=late)
    assert renewed["expires_at"] == "2026-12-29T08:00:00+00:00" and renewed["status"] == "active"
    assert isinstance(route(acme, tmp_path, X1, AGENT, late), Bridge)
    by_ttl = bindings.extend_binding(acme, binding["id"], ttl_seconds=120, now=late)
    assert by_ttl["expires_at"] == (late + timedelta(seconds=120)).isoformat()
    forever = bindings.extend_binding(acme, binding["id"], None, now=late)
    assert forever["expires_at"] is None
    assert isinstance(route(acme, tmp_path, X1, AGENT, late + timedelta(days=3650)), Bridge)


@pytest.mark.parametrize("expires_at, ttl, code", [
    (NOW - timedelta(seconds=1), None, "invalid_expiry"),          # in the past
    (datetime(2027, 1, 1), None, "invalid_expiry"),                # no zone
    (None, 0, "invalid_expiry"),
    (NOW + timedelta(days=1), 60, "invalid_expiry"),               # both
])
def test_bad_extension_changes_nothing(acme, expires_at, ttl, code):
    binding = bindings.bind(acme, "acme", A, ttl_seconds=60, now=NOW)
    with pytest.raises(ProvisionError) as info:
        bindings.extend_binding(acme, binding["id"], expires_at, ttl_seconds=ttl, now=NOW)
    assert info.value.code == code
    assert bindings.get_binding(acme, binding["id"])["expires_at"] == binding["expires_at"]


def test_change_the_customers_number(acme, tmp_path):
    binding = bindings.bind(acme, "acme", A, reference="POL-1", now=NOW)
    changed = bindings.update_binding(acme, binding["id"], customer="138 0000 0002", reference="POL-1b")
    assert changed["customer"] == "+86138****0002" and changed["reference"] == "POL-1b"
    assert A2 not in json.dumps(changed)
    assert route(acme, tmp_path, X1, AGENT, NOW).destination == A2
    assert route(acme, tmp_path, X1, A2, NOW).destination == HOTLINE  # the new number is the customer
    with pytest.raises(ProvisionError) as info:
        bindings.update_binding(acme, binding["id"], customer="12345")
    assert info.value.code == "invalid_number"
    assert route(acme, tmp_path, X1, AGENT, NOW).destination == A2


def test_unbind_quarantines_for_the_cooldown_then_reallocates(acme, tmp_path):
    cooldown = timedelta(hours=6)
    first = bindings.bind(acme, "acme", A, now=NOW)
    bindings.bind(acme, "acme", A2, now=NOW)
    bindings.bind(acme, "acme", A2, now=NOW)
    ended = bindings.unbind(acme, first["id"], cooldown, now=NOW)
    assert ended["status"] == "ended" and ended["ended_at"] == NOW.isoformat()
    assert pool.pool_status(acme, "acme") == {"free": 0, "bound": 2, "quarantined": 1, "disabled": 0}
    assert route(acme, tmp_path, X1, AGENT, NOW).reason == Reason.UNKNOWN_NUMBER
    for moment in (NOW, NOW + cooldown - timedelta(seconds=1)):
        with pytest.raises(ProvisionError) as info:
            bindings.bind(acme, "acme", A, now=moment)
        assert info.value.code == "pool_exhausted"
    again = bindings.bind(acme, "acme", A, now=NOW + cooldown)
    assert again["x"] == X1 and again["id"] != first["id"]
    with pytest.raises(ProvisionError) as info:
        bindings.unbind(acme, first["id"], cooldown)
    assert info.value.code == "binding_ended"
    for change in (lambda b: bindings.extend_binding(acme, b, ttl_seconds=60),
                   lambda b: bindings.update_binding(acme, b, customer=A2)):
        with pytest.raises(ProvisionError) as info:
            change(first["id"])
        assert info.value.code == "binding_ended"


def test_get_and_list_paged_and_filtered(acme):
    ids = [bindings.bind(acme, "acme", A, reference=ref, ttl_seconds=ttl, now=NOW)["id"]
           for ref, ttl in (("POL-1", None), ("POL-2", 60), ("POL-1", None))]
    bindings.unbind(acme, ids[2], timedelta(days=1), now=NOW)
    later = NOW + timedelta(seconds=61)
    assert bindings.get_binding(acme, ids[0])["reference"] == "POL-1"
    everything = bindings.list_bindings(acme, now=later)
    assert [b["id"] for b in everything["items"]] == ids and everything["next"] is None
    first = bindings.list_bindings(acme, limit=2, now=later)
    assert [b["id"] for b in first["items"]] == ids[:2] and first["next"] == ids[1]
    rest = bindings.list_bindings(acme, limit=2, after=first["next"], now=later)
    assert [b["id"] for b in rest["items"]] == ids[2:] and rest["next"] is None
    by = lambda **kw: [b["id"] for b in bindings.list_bindings(acme, now=later, **kw)["items"]]
    assert by(reference="POL-1") == [ids[0], ids[2]]
    assert by(status="active") == [ids[0]]
    assert by(status="expired") == [ids[1]]
    assert by(status="ended") == [ids[2]]
    assert by(reference="POL-1", status="ended") == [ids[2]]
    assert by(reference="nothing") == []
    for bad in ({"status": "gone"}, {"limit": 0}, {"limit": 5000}, {"after": -1}):
        with pytest.raises(ProvisionError) as info:
            bindings.list_bindings(acme, **bad)
        assert info.value.code in ("invalid_status", "invalid_page")
    assert A not in json.dumps(everything)


def test_another_tenants_binding_is_not_found(acme):
    mine = bindings.bind(acme, "acme", A, now=NOW)
    theirs = tenants.tenant_id_of(acme, "other")
    acme_id = tenants.tenant_id_of(acme, "acme")
    assert bindings.get_binding(acme, mine["id"], tenant_id=acme_id)["id"] == mine["id"]
    attempts = [
        lambda: bindings.get_binding(acme, mine["id"], tenant_id=theirs),
        lambda: bindings.extend_binding(acme, mine["id"], ttl_seconds=60, tenant_id=theirs),
        lambda: bindings.update_binding(acme, mine["id"], customer=A2, tenant_id=theirs),
        lambda: bindings.unbind(acme, mine["id"], timedelta(days=1), tenant_id=theirs),
    ]
    for attempt in attempts:
        with pytest.raises(ProvisionError) as info:
            attempt()
        assert info.value.code == "binding_not_found"
    assert bindings.list_bindings(acme, tenant_id=theirs)["items"] == []
    assert bindings.get_binding(acme, mine["id"])["status"] == "active"
    assert bindings.get_binding(acme, mine["id"])["customer"] == "+86138****0001"


def test_binding_commands(cli):  # noqa: F811
    cli("db", "upgrade")
    cli("tenant", "add", "acme", "--hotline", HOTLINE, "--caller", AGENT)
    cli("pool", "add", "--tenant", "acme", X1, X2)
    made = json.loads(cli("bind", "--tenant", "acme", "--customer", A, "--reference", "POL-9", "--ttl", "60").stdout)
    bid = str(made["id"])
    extended = cli("binding", "extend", bid, "--expires", "2030-01-01T00:00:00+08:00")
    assert extended.returncode == 0, extended.stderr
    assert json.loads(extended.stdout)["expires_at"] == "2029-12-31T16:00:00+00:00"
    assert json.loads(cli("binding", "extend", bid, "--no-expiry").stdout)["expires_at"] is None
    updated = cli("binding", "update", bid, "--customer", A2)
    assert json.loads(updated.stdout)["customer"] == "+86138****0002"
    assert json.loads(cli("binding", "get", bid).stdout)["reference"] == "POL-9"
    listed = cli("binding", "list", "--tenant", "acme", "--reference", "POL-9")
    assert "POL-9" in listed.stdout and "(1 binding(s))" in listed.stdout
    page = json.loads(cli("binding", "list", "--status", "active", "--json").stdout)
    assert [b["id"] for b in page["items"]] == [made["id"]]
    for args, code in ((["binding", "get", "999"], "binding_not_found"),
                       (["binding", "extend", bid, "--ttl", "0"], "invalid_expiry"),
                       (["binding", "update", bid, "--customer", "nope"], "invalid_number")):
        done = cli(*args)
        assert done.returncode == 1 and code in done.stderr and "Traceback" not in done.stderr
    # a limit out of range is refused by the parser (README, exit codes: 2)
    done = cli("binding", "list", "--limit", "0")
    assert done.returncode == 2 and "--limit" in done.stderr and "Traceback" not in done.stderr
    assert cli("binding", "extend", bid).returncode != 0  # says what to give
    outputs = "".join(p.stdout + p.stderr for p in (extended, updated, listed))
    assert "13800000002" not in outputs and "13800000001" not in outputs
