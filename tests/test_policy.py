"""Call policy without the PBX: calling hours in the tenant's zone, blocks (add, list,
lift; direction and scope; suspension) through the real store on SQLite and PostgreSQL,
and the `callctl block` / `callctl tenant update` commands as a real subprocess."""
from __future__ import annotations

import json
import tempfile
from datetime import datetime, time, timedelta, timezone

import pytest
from sqlalchemy import select

from callctl.core.decision import (
    BindingFacts, Bridge, Direction, Mode, NumberFacts, Reason, Reject, TenantFacts, decide, within_hours,
)
from callctl.service import CallService, decision_variables
from callctl.errors import ProvisionError
from callctl.store import bindings, blocks, pool, tenants
from callctl.store.models import Block
from callctl.store.spool import CdrSpool
from tests import realnumbers
from tests.test_cli import run as run_cli

CUSTOMER, CUSTOMER_2 = realnumbers.person("+8613800004001", "+8613800004002")
AGENT, HOTLINE = realnumbers.tenant_line("+8613900004001", "+861058004000")
POOL = ["+8617100004001", "+8617100004002", "+8617100004003"]
UTC = timezone.utc
# 10:00 UTC is 18:00 in Shanghai: inside the default hours 08:00-21:00.
DAY = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
NIGHT = datetime(2026, 11, 28, 14, 0, tzinfo=UTC)  # 22:00 in Shanghai


# -- calling hours, pure -------------------------------------------------------------

@pytest.mark.parametrize("local, start, end, inside", [
    ("07:59", "08:00", "21:00", False),
    ("08:00", "08:00", "21:00", True),
    ("20:59", "08:00", "21:00", True),
    ("21:00", "08:00", "21:00", False),  # the end is exclusive
    ("23:30", "22:00", "06:00", True),   # crossing midnight
    ("05:59", "22:00", "06:00", True),
    ("06:00", "22:00", "06:00", False),
    ("12:00", "22:00", "06:00", False),
    ("03:00", "00:00", "00:00", True),   # equal ends: all day
])
def test_hours_on_the_tenants_wall_clock(local, start, end, inside):
    hour, minute = map(int, local.split(":"))
    # Shanghai is UTC+8 all year: local 03:00 on the 28th is 19:00 UTC on the 27th.
    now = datetime(2026, 11, 28, hour, minute, tzinfo=timezone(timedelta(hours=8))).astimezone(UTC)
    assert within_hours(now, "Asia/Shanghai", time.fromisoformat(start), time.fromisoformat(end)) is inside


def test_hours_follow_daylight_saving_in_the_zone():
    # 08:30 in New York is 13:30 UTC in winter (EST) and 12:30 UTC in summer (EDT).
    start, end = time(9), time(17)
    assert within_hours(datetime(2026, 1, 15, 14, 0, tzinfo=UTC), "America/New_York", start, end)
    assert not within_hours(datetime(2026, 1, 15, 13, 30, tzinfo=UTC), "America/New_York", start, end)
    assert within_hours(datetime(2026, 7, 15, 13, 30, tzinfo=UTC), "America/New_York", start, end)
    assert within_hours(DAY, "No/Such_Zone", start, end) is None


def tenant_facts(**kw):
    values = dict(id=7, hotline=HOTLINE, caller_is_agent=True, strict=True, ring_timeout=25,
                  max_call_seconds=600)
    values.update(kw)
    return NumberFacts(POOL[0], TenantFacts(**values), (BindingFacts(11, Mode.AXN, CUSTOMER),), mode=Mode.AXN)


def test_outside_hours_rejects_calls_to_customers_only():
    assert isinstance(decide(AGENT, DAY, tenant_facts()), Bridge)
    night = decide(AGENT, NIGHT, tenant_facts())
    assert night == Reject(Reason.OUTSIDE_HOURS, 7, 11, Direction.TO_CUSTOMER, purpose="service")
    assert decision_variables(night)["reason"] == "outside_hours"
    # The customer may always call the tenant.
    from_customer = decide(CUSTOMER, NIGHT, tenant_facts(caller_is_agent=False))
    assert isinstance(from_customer, Bridge) and from_customer.destination == HOTLINE
    # A night shift tenant: 22:00-06:00 local.
    night_shift = tenant_facts(calls_from=time(22), calls_until=time(6))
    assert isinstance(decide(AGENT, NIGHT, night_shift), Bridge)
    assert decide(AGENT, DAY, night_shift).reason == Reason.OUTSIDE_HOURS
    # A zone nobody knows (edited by hand in the database): fail closed.
    assert decide(AGENT, DAY, tenant_facts(time_zone="Mars/Olympus")).reason == Reason.UNAVAILABLE


# -- blocks through the store --------------------------------------------------------

@pytest.fixture
def acme(engine):
    tenants.add_tenant(engine, "acme", HOTLINE, callers=[AGENT])
    pool.add_numbers(engine, "acme", POOL)
    tenants.add_tenant(engine, "other", "+861058004999")
    tenants.update_tenant(engine, "acme", hours="00:00-24:00")  # blocks only, whatever the clock says
    return engine


def route(engine, caller, x, now=None):
    """What a fresh daemon decides for this call: it reads the database (nothing cached)."""
    service = CallService(engine, CdrSpool(tempfile.mkdtemp(prefix="callctl-policy-spool-")))
    return service.route(x, caller, now)[1]


def test_one_way_binding_block_lets_the_other_direction_through(acme):
    binding = bindings.bind(acme, "acme", CUSTOMER)
    block = blocks.add_block(acme, scope="binding", binding_id=binding["id"], direction="to_customer",
                             reason="customer complained of harassment", created_by="ops:li")
    assert block["status"] == "active" and block["tenant"] == "acme" and block["x"] == binding["x"]
    assert route(acme, AGENT, binding["x"]).reason == Reason.BLOCKED
    assert isinstance(route(acme, CUSTOMER, binding["x"]), Bridge)
    lifted = blocks.lift_block(acme, block["id"], "ops:wang")
    assert lifted["status"] == "ended" and lifted["lifted_by"] == "ops:wang"
    assert isinstance(route(acme, AGENT, binding["x"]), Bridge)
    # Lifted, never deleted: the row stays as evidence with its start, end and authors.
    with acme.connect() as conn:
        row = conn.execute(select(Block.created_by, Block.lifted_by, Block.ends_at)).one()
    assert row.created_by == "ops:li" and row.lifted_by == "ops:wang" and row.ends_at is not None
    with pytest.raises(ProvisionError) as again:
        blocks.lift_block(acme, block["id"], "ops:wang")
    assert again.value.code == "block_ended"


def test_suspension_rejects_all_calls_to_customers_but_not_the_hotline(acme):
    first = bindings.bind(acme, "acme", CUSTOMER)
    second = bindings.bind(acme, "acme", CUSTOMER_2)
    blocks.add_block(acme, scope="tenant", tenant="acme", direction="to_customer",
                     reason="licence suspended by regulator", created_by="platform")
    for binding in (first, second):
        assert route(acme, AGENT, binding["x"]).reason == Reason.BLOCKED
    assert isinstance(route(acme, CUSTOMER, first["x"]), Bridge)
    blocks.add_block(acme, scope="tenant", tenant="acme", direction="both", reason="contract ended",
                     created_by="platform")
    assert route(acme, CUSTOMER, first["x"]).reason == Reason.BLOCKED


def test_caller_and_number_blocks_and_their_windows(acme):
    binding = bindings.bind(acme, "acme", CUSTOMER)
    x = binding["x"]
    blocks.add_block(acme, scope="caller", tenant="acme", caller=CUSTOMER, direction="from_customer",
                     reason="abusive calls to the hotline", created_by="ops")
    assert route(acme, CUSTOMER, x).reason == Reason.BLOCKED
    assert isinstance(route(acme, AGENT, x), Bridge)
    later = datetime.now(UTC) + timedelta(hours=1)
    scheduled = blocks.add_block(acme, scope="number", number=x, direction="both", reason="maintenance",
                                 created_by="ops", starts_at=later, duration_seconds=600)
    assert scheduled["status"] == "scheduled"
    assert isinstance(route(acme, AGENT, x, now=later - timedelta(minutes=1)), Bridge)
    assert route(acme, AGENT, x, now=later + timedelta(minutes=5)).reason == Reason.BLOCKED
    assert isinstance(route(acme, AGENT, x, now=later + timedelta(minutes=11)), Bridge)


def test_list_filters_and_masks_the_caller(acme):
    binding = bindings.bind(acme, "acme", CUSTOMER)
    blocks.add_block(acme, scope="caller", tenant="acme", caller=CUSTOMER, direction="both",
                     reason="r1", created_by="ops")
    blocks.add_block(acme, scope="binding", binding_id=binding["id"], direction="to_customer",
                     reason="r2", created_by="ops")
    ended = blocks.add_block(acme, scope="tenant", tenant="acme", direction="to_customer",
                             reason="r3", created_by="ops")
    blocks.lift_block(acme, ended["id"], "ops")
    everything = blocks.list_blocks(acme)
    assert [b["reason"] for b in everything] == ["r3", "r2", "r1"]
    assert [b["reason"] for b in blocks.list_blocks(acme, active=True)] == ["r2", "r1"]
    assert [b["reason"] for b in blocks.list_blocks(acme, caller="138 0000 4001")] == ["r1"]
    assert [b["reason"] for b in blocks.list_blocks(acme, binding_id=binding["id"])] == ["r2"]
    assert [b["reason"] for b in blocks.list_blocks(acme, number=binding["x"])] == ["r2"]
    assert [b["reason"] for b in blocks.list_blocks(acme, scope="tenant")] == ["r3"]
    assert blocks.list_blocks(acme, tenant="other") == []
    assert everything[2]["caller"] == "+86138****4001"
    assert "13800004001" not in json.dumps(everything)


@pytest.mark.parametrize("kwargs, code", [
    (dict(scope="galaxy", tenant="acme", direction="both"), "invalid_scope"),
    (dict(scope="tenant", tenant="acme", direction="sideways"), "invalid_direction"),
    (dict(scope="tenant", direction="both"), "invalid_target"),
    (dict(scope="caller", tenant="acme", direction="both"), "invalid_target"),
    (dict(scope="tenant", tenant="acme", caller=CUSTOMER, direction="both"), "invalid_target"),
    (dict(scope="binding", binding_id=999999, direction="both"), "binding_not_found"),
    (dict(scope="number", number="+8617199990000", direction="both"), "number_not_found"),
    (dict(scope="number", number="not a number", direction="both"), "invalid_number"),
    (dict(scope="number", number=POOL[1], tenant="other", direction="both"), "wrong_tenant"),
    (dict(scope="caller", tenant="acme", caller="12", direction="both"), "invalid_number"),
    (dict(scope="tenant", tenant="nobody", direction="both"), "tenant_not_found"),
    (dict(scope="tenant", tenant="acme", direction="both", reason=" "), "invalid_reason"),
    (dict(scope="tenant", tenant="acme", direction="both", reason="calls from 138 0000 4001"), "invalid_reason"),
    (dict(scope="tenant", tenant="acme", direction="both", created_by=""), "invalid_created_by"),
    (dict(scope="tenant", tenant="acme", direction="both", duration_seconds=0), "invalid_time"),
    (dict(scope="tenant", tenant="acme", direction="both", ends_at=datetime(2020, 1, 1, tzinfo=UTC)), "invalid_time"),
    (dict(scope="tenant", tenant="acme", direction="both", starts_at=datetime(2030, 1, 1)), "invalid_time"),
])
def test_bad_blocks_are_refused_and_change_nothing(acme, kwargs, code):
    kwargs = {"reason": "test", "created_by": "ops", **kwargs}
    with pytest.raises(ProvisionError) as refused:
        blocks.add_block(acme, **kwargs)
    assert refused.value.code == code
    assert "13800004001" not in str(refused.value)
    assert blocks.list_blocks(acme) == []


def test_tenant_policy_settings_validated_and_updated(acme):
    view = tenants.update_tenant(acme, "acme", hours="22:00-06:00", time_zone="Europe/Berlin",
                                   ring_timeout=20, max_call_seconds=120)
    assert (view["hours"], view["time_zone"], view["ring_timeout"], view["max_call_seconds"]) == (
        "22:00-06:00", "Europe/Berlin", 20, 120)
    assert tenants.update_tenant(acme, "acme", hours="00:00-24:00")["hours"] == "00:00-00:00"
    for kwargs, code in [
        (dict(hours="8-21"), "invalid_hours"), (dict(hours="08:00-25:00"), "invalid_hours"),
        (dict(time_zone="Asia/Nowhere"), "invalid_time_zone"), (dict(ring_timeout=0), "invalid_limit"),
        (dict(max_call_seconds=86401), "invalid_limit"),
    ]:
        with pytest.raises(ProvisionError) as refused:
            tenants.update_tenant(acme, "acme", **kwargs)
        assert refused.value.code == code
    assert tenants.list_tenants(acme)[0]["time_zone"] == "Europe/Berlin"


# -- the commands --------------------------------------------------------------------

@pytest.fixture
def cli(request, tmp_path):
    url = f"sqlite:///{tmp_path}/callctl.db"
    env = {"PATH": "/usr/bin:/bin", "CALLCTL_DATABASE_URL": url, "CALLCTL_SPOOL_DIR": str(tmp_path / "spool")}
    command = lambda *args: run_cli(*args, env=env, cwd=tmp_path)  # noqa: E731
    assert command("db", "upgrade").returncode == 0
    assert command("tenant", "add", "acme", "--hotline", HOTLINE, "--caller", AGENT,
                   "--hours", "09:00-18:00", "--tz", "Asia/Shanghai", "--max-call-seconds", "600").returncode == 0
    assert command("pool", "add", "--tenant", "acme", *POOL).returncode == 0
    return command


def test_block_commands_add_list_lift(cli):
    binding = json.loads(cli("bind", "--tenant", "acme", "--customer", CUSTOMER).stdout)
    added = cli("block", "add", "--scope", "binding", "--binding", str(binding["id"]), "--direction", "to_customer",
                "--reason", "complaint C-17", "--by", "ops:li", "--duration", "3600")
    assert added.returncode == 0, added.stderr
    block = json.loads(added.stdout)
    assert block["status"] == "active" and block["created_by"] == "ops:li" and block["ends_at"]
    caller = json.loads(cli("block", "add", "--scope", "caller", "--tenant", "acme", "--caller", CUSTOMER_2,
                            "--direction", "both", "--reason", "abuse").stdout)
    assert caller["caller"] == "+86138****4002" and caller["created_by"]  # the login by default
    table = cli("block", "list", "--tenant", "acme")
    assert table.returncode == 0 and "(2 block(s))" in table.stdout and "complaint C-17" in table.stdout
    lifted = cli("block", "lift", str(block["id"]), "--by", "ops:wang")
    assert lifted.returncode == 0 and json.loads(lifted.stdout)["lifted_by"] == "ops:wang"
    active = json.loads(cli("block", "list", "--active", "--json").stdout)
    assert [b["id"] for b in active] == [caller["id"]]
    for output in (added, table, lifted):
        assert "13800004001" not in output.stdout + output.stderr
        assert "13800004002" not in output.stdout + output.stderr


@pytest.mark.parametrize("args, code, message", [
    (["block", "add", "--scope", "tenant", "--direction", "both", "--reason", "x"], 1, "a tenant block needs tenant"),
    (["block", "add", "--scope", "tenant", "--tenant", "acme", "--direction", "up", "--reason", "x"], 2, "invalid choice"),
    (["block", "add", "--scope", "tenant", "--tenant", "acme", "--direction", "both"], 2, "--reason"),
    (["block", "add", "--scope", "tenant", "--tenant", "acme", "--direction", "both", "--reason", "x",
      "--ends", "tomorrow"], 1, "--ends must be an ISO date-time"),
    (["block", "add", "--scope", "number", "--number", "+8617199990000", "--direction", "both", "--reason", "x"],
     1, "[number_not_found]"),
    (["block", "lift", "4711"], 1, "no block 4711 [block_not_found]"),
    (["block", "lift", "first"], 2, "argument block_id: an id, 1 to"),
    (["block", "list", "--caller", "+86 138"], 1, "[invalid_number]"),
    (["tenant", "update", "acme", "--hours", "21:00"], 1, "HH:MM-HH:MM"),
    (["tenant", "update", "acme", "--tz", "Shanghai"], 1, "unknown time zone"),
    (["tenant", "update", "ghost", "--ring-timeout", "20"], 1, "no tenant named 'ghost'"),
])
def test_bad_commands_get_a_clear_error_and_change_nothing(cli, args, code, message):
    done = cli(*args)
    assert done.returncode == code and message in done.stderr, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    assert json.loads(cli("block", "list", "--json").stdout) == []
    tenant = json.loads(cli("tenant", "list").stdout)[0]
    assert (tenant["hours"], tenant["time_zone"], tenant["ring_timeout"]) == ("09:00-18:00", "Asia/Shanghai", 30)


def test_tenant_update_command(cli):
    done = cli("tenant", "update", "acme", "--hours", "22:00-06:00", "--tz", "Europe/Berlin",
               "--ring-timeout", "15", "--max-call-seconds", "90")
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    assert (view["hours"], view["time_zone"], view["ring_timeout"], view["max_call_seconds"]) == (
        "22:00-06:00", "Europe/Berlin", 15, 90)
