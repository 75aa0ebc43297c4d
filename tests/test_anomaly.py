"""The anomaly job on generated CDR histories, on SQLite and PostgreSQL: each rule fires
at its threshold and not one below it, nor across its window's edge; re-runs add
nothing; the watermark picks up CDRs committed late; blocks stop the next call."""
from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, insert, select, text

from callctl.anomaly.config import RULES, AnomalyConfig, load
from callctl.anomaly.job import list_findings, run_pass
from callctl.config import ConfigError
from callctl.core.decision import Reason, Reject
from callctl.service import CallService
from callctl.store.models import AnomalyFinding, AnomalyState, Block, Cdr
from callctl.store.pool import add_numbers
from callctl.store.tenants import add_tenant
from callctl.store.bindings import bind
from callctl.store.spool import CdrSpool

T0 = datetime(2026, 11, 2, 2, 0, tzinfo=timezone.utc)  # 10:00 in Asia/Shanghai
LATER = T0 + timedelta(days=40)  # "now" for passes: long after the calls
AGENT, HOTLINE = "+8613900000001", "+861058000000"
_calls = itertools.count(1)


def rules(name: str | None = None, tenants: dict | None = None, **fields) -> AnomalyConfig:
    """Only rule `name` enabled, with `fields` on top of its defaults."""
    chosen = {r: {"enabled": False} for r in RULES}
    if name:
        chosen[name] = fields
    return AnomalyConfig.model_validate({"rules": chosen, "tenants": tenants or {}})


def cdr(tenant: int, start: datetime, **fields) -> dict:
    row = {
        "call_id": f"call-{next(_calls)}", "tenant_id": tenant, "binding_id": 1, "direction": "to_customer",
        "decision": "bridged", "started_at": start, "ended_at": start + timedelta(seconds=30),
        "answered_at": start + timedelta(seconds=5), "talk_seconds": 25.0, "dial_status": "ANSWER",
        "caller_hash": "agent-1", "caller_masked": "+86139****0001",
    }
    row.update(fields)
    return row


def add(engine, *rows: dict) -> list[int]:
    with engine.begin() as conn:
        return [conn.execute(insert(Cdr).values(**row).returning(Cdr.id)).scalar_one() for row in rows]


def findings(engine, rule: str | None = None) -> list[dict]:
    return list_findings(engine, rule=rule)


def forget_watermark(engine) -> None:
    """The next pass reads every CDR again (as after new rules)."""
    with engine.begin() as conn:
        conn.execute(AnomalyState.__table__.delete())


@pytest.fixture
def world(engine):
    """Two tenants (acme, beta) with one bound number each; returns their ids and bindings."""
    out = {}
    for i, name in enumerate(("acme", "beta")):
        tenant = add_tenant(engine, name, HOTLINE, callers=[AGENT])
        add_numbers(engine, name, [f"+861710000000{i}"])
        binding = bind(engine, name, f"+861380000000{i}")
        out[name] = (tenant["id"], binding["id"], binding["x"])
    return out


def span(tenant, count, seconds, start=T0, **fields):
    """`count` calls, the first at `start`, the last `seconds` later, evenly spread."""
    step = seconds / (count - 1)
    return [cdr(tenant, start + timedelta(seconds=i * step), **fields) for i in range(count)]


# --- high frequency: per caller and per tenant (sliding windows) -------------------------

@pytest.mark.parametrize("count, seconds, fires", [
    (5, 59, True),     # threshold within the window
    (4, 10, False),    # threshold - 1
    (5, 60, False),    # the fifth call lands exactly one window after the first
])
def test_caller_frequency_edges(engine, world, count, seconds, fires):
    acme = world["acme"][0]
    ids = add(engine, *span(acme, count, seconds, binding_id=None))
    add(engine, *span(acme, 9, 5, caller_hash=None))  # anonymous callers are nobody's key
    run_pass(engine, rules("caller_frequency", calls=5, window=60), now=LATER)
    found = findings(engine)
    assert [f["rule"] for f in found] == (["caller_frequency"] if fires else [])
    if fires:
        f = found[0]
        assert (f["subject_kind"], f["subject"], f["tenant"]) == ("caller", "agent-1", "acme")
        assert f["evidence"] == ids and f["calls"] == count and f["threshold"] == 5
        assert f["window_start"] == T0.isoformat()
        assert f["window_end"] == (T0 + timedelta(seconds=seconds)).isoformat()
        assert f["severity"] == "medium" and f["action"] == "alert" and f["block_id"] is None


def test_sliding_window_across_periods_gives_one_finding_per_period(engine, world):
    # Calls at 0, 12, ..., 60 s: five within 60 s end at 48 s (period [0, 60)) and again at
    # 60 s (period [60, 120)); each period keeps its own finding and evidence.
    acme = world["acme"][0]
    ids = add(engine, *span(acme, 6, 60))
    run_pass(engine, rules("caller_frequency", calls=5, window=60), now=LATER)
    assert sorted(f["evidence"] for f in findings(engine)) == [ids[:5], ids[1:]]


@pytest.mark.parametrize("inbound, fires", [(0, True), (1, False)])
def test_tenant_frequency_counts_calls_to_customers(engine, world, inbound, fires):
    acme = world["acme"][0]
    rows = span(acme, 3, 30, caller_hash=None)
    for row in rows[:inbound]:
        row["direction"] = "from_customer"
    add(engine, *rows)
    run_pass(engine, rules("tenant_frequency", calls=3, window=60), now=LATER)
    assert [(f["subject_kind"], f["subject"]) for f in findings(engine)] == \
        ([("tenant", str(acme))] if fires else [])


# --- one customer called too often (per binding, a day) ------------------------------------

@pytest.mark.parametrize("count, seconds, fires", [(3, 86399, True), (2, 100, False), (3, 86400, False)])
def test_customer_frequency_edges_and_block(engine, world, count, seconds, fires):
    acme, binding, _ = world["acme"]
    add(engine, *span(acme, count, seconds, binding_id=binding))
    now = T0 + timedelta(days=1, hours=1)
    result = run_pass(engine, rules("customer_frequency", calls=3, action="block",
                                    block={"direction": "both", "seconds": 7200}), now=now)
    found = findings(engine)
    assert len(found) == (1 if fires else 0) and result.blocks == len(found)
    if fires:
        assert found[0]["subject"] == str(binding) and found[0]["block_id"]
        with engine.connect() as conn:
            block = conn.execute(select(Block)).one()
        assert (block.scope, block.binding_id, block.direction) == ("binding", binding, "both")
        assert block.created_by == "anomaly:customer_frequency" and block.finding_id == found[0]["id"]
        assert (block.starts_at, block.ends_at) == (now, now + timedelta(seconds=7200))


# --- ultra-short calls (fixed periods) ------------------------------------------------------

def _answered(tenant, binding, talks, start=T0):
    return [cdr(tenant, start + timedelta(minutes=i), binding_id=binding, talk_seconds=talk)
            for i, talk in enumerate(talks)]


@pytest.mark.parametrize("talks, fires", [
    ([2.9, 2.9, 2.9, 2.9, 30], True),       # 4 short of 5: share 0.8, min_calls 4
    ([2.9, 2.9, 2.9, 2.9, 30, 30], False),  # share 0.67
    ([2.9, 2.9, 2.9], False),               # min_calls - 1
    ([2.9, 2.9, 2.9, 3.0], False),          # 3.0 s is not under 3 s
])
def test_ultra_short_edges(engine, world, talks, fires):
    acme, binding, _ = world["acme"]
    add(engine, *_answered(acme, binding, talks))
    add(engine, cdr(acme, T0, binding_id=binding, answered_at=None, talk_seconds=0.0, dial_status="NOANSWER"))
    run_pass(engine, rules("ultra_short", talk_seconds=3, share=0.8, min_calls=4, window=3600), now=LATER)
    found = findings(engine)
    assert len(found) == (1 if fires else 0)
    if fires:
        assert found[0]["measure"] == pytest.approx(0.8) and found[0]["calls"] == 4


def test_ultra_short_period_boundary(engine, world):
    acme, binding, _ = world["acme"]
    # Four short calls, but two in each hour: no period holds four.
    add(engine, *_answered(acme, binding, [1, 1], start=T0 - timedelta(minutes=2)))
    add(engine, *_answered(acme, binding, [1, 1], start=T0))
    run_pass(engine, rules("ultra_short", talk_seconds=3, share=0.8, min_calls=4, window=3600), now=LATER)
    assert findings(engine) == []


# --- calling again after the customer declined ---------------------------------------------

@pytest.mark.parametrize("first, gap, fires", [
    ({"dial_status": "BUSY"}, 599, True),
    ({"dial_status": "BUSY"}, 600, False),   # the window's edge, counted from the decline
    ({"dial_status": "CONGESTION", "hangup_cause": 21}, 10, True),  # 603 Decline
    ({"dial_status": "NOANSWER"}, 10, False),
])
def test_declined_repeat_edges(engine, world, first, gap, fires):
    acme, binding, _ = world["acme"]
    declined = cdr(acme, T0, binding_id=binding, answered_at=None, talk_seconds=0.0,
                   ended_at=T0 + timedelta(seconds=8), **first)
    again = cdr(acme, T0 + timedelta(seconds=8 + gap), binding_id=binding)
    ids = add(engine, declined, again)
    run_pass(engine, rules("declined_repeat", window=600, repeats=1), now=LATER)
    found = findings(engine)
    assert len(found) == (1 if fires else 0)
    if fires:
        assert found[0]["evidence"] == ids and found[0]["measure"] == 1


def test_declined_repeat_needs_repeats(engine, world):
    acme, binding, _ = world["acme"]
    busy = dict(answered_at=None, talk_seconds=0.0, dial_status="BUSY", binding_id=binding)
    add(engine, cdr(acme, T0, **busy), cdr(acme, T0 + timedelta(seconds=60), **busy),
        cdr(acme, T0 + timedelta(seconds=120), binding_id=binding))
    run_pass(engine, rules("declined_repeat", window=600, repeats=3), now=LATER)
    assert findings(engine) == []
    forget_watermark(engine)
    run_pass(engine, rules("declined_repeat", window=600, repeats=2), now=LATER + timedelta(days=1))
    assert [f["measure"] for f in findings(engine)] == [2]


# --- off-hours attempts (tenant's time zone, Asia/Shanghai = UTC+8) ---------------------------

def _local(hh: int, mm: int, day: int = 2) -> datetime:
    return datetime(2026, 11, day, hh, mm, tzinfo=timezone(timedelta(hours=8))).astimezone(timezone.utc)


@pytest.mark.parametrize("times, fires", [
    ([(21, 0), (7, 59)], True),              # 21:00 and 07:59 are outside 08:00-21:00
    ([(20, 59), (8, 0), (21, 0)], False),    # one outside: attempts is 2
    ([(23, 30), (0, 30, 3)], False),         # two local days, one each
])
def test_off_hours_edges(engine, world, times, fires):
    acme = world["acme"][0]
    add(engine, *[cdr(acme, _local(*t)) for t in times])
    run_pass(engine, rules("off_hours", start="08:00", end="21:00", attempts=2), now=LATER)
    found = findings(engine)
    assert len(found) == (1 if fires else 0)
    if fires:
        assert found[0]["subject_kind"] == "tenant" and found[0]["calls"] == 2


# --- blast: one agent, many customers -------------------------------------------------------

@pytest.mark.parametrize("bindings, fires", [([1, 2, 3], True), ([1, 2, 2], False)])
def test_blast_edges(engine, world, bindings, fires):
    acme = world["acme"][0]
    add(engine, *[cdr(acme, T0 + timedelta(seconds=i), binding_id=b) for i, b in enumerate(bindings)])
    run_pass(engine, rules("blast", customers=3, window=600), now=LATER)
    found = findings(engine)
    assert len(found) == (1 if fires else 0)
    if fires:
        assert found[0]["measure"] == 3 and found[0]["subject"] == "agent-1"


def test_blast_period_boundary(engine, world):
    acme = world["acme"][0]
    add(engine, cdr(acme, T0 - timedelta(seconds=1), binding_id=1),
        cdr(acme, T0, binding_id=2), cdr(acme, T0 + timedelta(seconds=1), binding_id=3))
    run_pass(engine, rules("blast", customers=3, window=600), now=LATER)
    assert findings(engine) == []


# --- per-tenant overrides -------------------------------------------------------------------

def test_per_tenant_overrides(engine, world):
    acme, beta = world["acme"][0], world["beta"][0]
    add(engine, *span(acme, 3, 60), *span(beta, 3, 60, caller_hash="agent-2"))
    config = rules("caller_frequency", calls=3, window=3600,
                   tenants={"beta": {"caller_frequency": {"calls": 4}}})
    run_pass(engine, config, now=LATER)
    assert [f["tenant"] for f in findings(engine)] == ["acme"]
    off = rules("caller_frequency", calls=3, window=3600,
                tenants={"acme": {"caller_frequency": {"enabled": False}}, "beta": {"caller_frequency": {"calls": 3}}})
    forget_watermark(engine)
    run_pass(engine, off, now=LATER + timedelta(days=1))
    assert sorted(f["tenant"] for f in findings(engine)) == ["acme", "beta"]


# --- idempotence and the watermark ----------------------------------------------------------

def _counts(engine):
    with engine.connect() as conn:
        return (conn.scalar(select(func.count()).select_from(AnomalyFinding)),
                conn.scalar(select(func.count()).select_from(Block)))


def test_rerun_over_the_same_cdrs_adds_nothing(engine, world):
    acme, binding, _ = world["acme"]
    add(engine, *span(acme, 4, 600, binding_id=binding))
    config = rules("customer_frequency", calls=3, action="block")
    first = run_pass(engine, config, now=T0 + timedelta(hours=1))
    assert (first.new_findings, first.blocks) == (1, 1)
    before = _counts(engine)
    forget_watermark(engine)
    again = run_pass(engine, config, now=T0 + timedelta(hours=2))
    assert again.cdrs == 4 and (again.new_findings, again.blocks) == (0, 0)
    assert _counts(engine) == before == (1, 1)


def test_watermark_reads_only_new_cdrs_and_joins_them_to_old_windows(engine, world):
    acme, binding, _ = world["acme"]
    config = rules("customer_frequency", calls=3)
    add(engine, *span(acme, 2, 60, binding_id=binding))
    first = run_pass(engine, config, now=LATER)
    assert first.cdrs == 2 and findings(engine) == []
    assert run_pass(engine, config, now=LATER + timedelta(seconds=1)).cdrs == 0
    add(engine, cdr(acme, T0 + timedelta(hours=5), binding_id=binding))  # completes the day
    third = run_pass(engine, config, now=LATER + timedelta(seconds=2))
    assert third.cdrs == 1 and third.new_findings == 1
    assert findings(engine)[0]["calls"] == 3


def test_cdr_committed_late_below_the_watermark_is_not_skipped(engine, world):
    """A CDR whose id is below ids already read (another daemon's insert still in flight,
    e.g.) and a CDR replayed from a spool with an old start both reach their windows."""
    acme, binding, _ = world["acme"]
    config = rules("customer_frequency", calls=3)
    add(engine, cdr(acme, T0, binding_id=binding, id=1), cdr(acme, T0 + timedelta(minutes=1), binding_id=binding, id=5))
    run_pass(engine, config, now=LATER)
    assert run_pass(engine, config, now=LATER + timedelta(seconds=5)).from_id == 5  # nothing late: read above 5
    add(engine, cdr(acme, T0 + timedelta(minutes=2), binding_id=binding, id=3))  # commits late, lower id
    late = run_pass(engine, config, now=LATER + timedelta(seconds=10))  # within the overlap
    assert (late.from_id, late.cdrs, late.new_findings) == (0, 3, 1)
    # After the overlap the watermark moves past everything seen.
    run_pass(engine, config, now=LATER + timedelta(seconds=200))
    with engine.connect() as conn:
        assert conn.scalar(select(AnomalyState.safe_id)) == 5
    quiet = run_pass(engine, config, now=LATER + timedelta(seconds=210))
    assert (quiet.from_id, quiet.cdrs) == (5, 0)
    # A spool replay after an outage: new ids, starts two hours back, another binding.
    # (ids given explicitly: PostgreSQL's identity has not moved past the ones above)
    add(engine, *[dict(row, id=6 + i) for i, row in
                  enumerate(span(acme, 2, 60, binding_id=binding + 1, start=T0 - timedelta(hours=2)))])
    first = run_pass(engine, config, now=LATER + timedelta(seconds=220))
    assert (first.cdrs, first.new_findings) == (2, 0)
    add(engine, cdr(acme, T0 - timedelta(hours=1), binding_id=binding + 1, id=8))
    replay = run_pass(engine, config, now=LATER + timedelta(seconds=230))
    assert (replay.from_id, replay.cdrs, replay.new_findings) == (7, 1, 1)


# --- blocks: the daemon enforces them on the next call -----------------------------------------

def test_block_stops_the_next_call(engine, world, tmp_path):
    acme, binding, x = world["acme"]
    service = CallService(engine, CdrSpool(tmp_path / "spool"))
    # 10:00 in Shanghai: the calls an hour later are within the tenant's calling hours too.
    now = datetime.now(timezone.utc).replace(hour=2, minute=0)
    assert service.route(x, AGENT, now=now)[1].action == "bridge"
    add(engine, *span(acme, 3, 60, binding_id=binding, start=now - timedelta(minutes=5)))
    run_pass(engine, rules("customer_frequency", calls=3, action="block",
                           block={"direction": "to_customer", "seconds": 3600}), now=now)
    decision = service.route(x, AGENT, now=now + timedelta(seconds=1))[1]
    assert isinstance(decision, Reject) and decision.reason == Reason.BLOCKED
    # direction to_customer: the customer can still call the tenant's hotline
    assert service.route(x, "+8613800000000", now=now + timedelta(seconds=1))[1].action == "bridge"
    assert service.route(x, AGENT, now=now + timedelta(seconds=3601))[1].action == "bridge"


def test_no_block_for_a_finding_whose_block_would_have_ended(engine, world):
    acme, binding, _ = world["acme"]
    add(engine, *span(acme, 3, 60, binding_id=binding))
    result = run_pass(engine, rules("customer_frequency", calls=3, action="block",
                                    block={"seconds": 3600}), now=T0 + timedelta(hours=2))
    assert (result.new_findings, result.blocks) == (1, 0)


# --- the rules file ----------------------------------------------------------------------------

def test_shipped_rules_file_is_valid():
    config = load("conf/anomaly.yaml")
    assert set(config.rules) == set(RULES)
    assert config.rule("customer_frequency").action == "block"


@pytest.mark.parametrize("body, message", [
    ("rules: {nonsense: {}}", "unknown rule(s) nonsense"),
    ("rules: {blast: {action: block}}", "can only alert"),
    ("rules: {off_hours: {start: '25:00'}}", "must be HH:MM"),
    ("rules: {ultra_short: {share: 1.5}}", "share"),
    ("tenants: {acme: {declined_repeat: {statuses: [BUSY]}}}", "set for all tenants only"),
    ("tenants: {acme: {caller_frequency: {calls: 1}}}", "tenant acme, rule caller_frequency"),
    ("rules: [", "not valid YAML"),
])
def test_bad_rules_file_is_one_clear_error(tmp_path, body, message):
    path = tmp_path / "anomaly.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=None) as err:
        load(path)
    assert message in str(err.value)


def test_off_hours_uses_the_tenants_calling_hours(engine, world):
    acme, beta = world["acme"][0], world["beta"][0]
    with engine.begin() as conn:  # acme calls 09:00-20:00; beta keeps the default 08:00-21:00
        conn.execute(text("UPDATE tenants SET calls_from = '09:00', calls_until = '20:00' WHERE id = :id"), {"id": acme})
    add(engine, cdr(acme, _local(8, 30)), cdr(beta, _local(8, 30), caller_hash="agent-2"))
    run_pass(engine, rules("off_hours", attempts=1), now=LATER)
    assert [f["tenant"] for f in findings(engine)] == ["acme"]


def test_off_hours_follows_daylight_saving_changes(engine, world):
    """Europe/Berlin leaves summer time on 2026-10-25 at 01:00 UTC: 05:30 UTC is 07:30
    local before it and 06:30 local after it, and 06:30 UTC is 07:30 local after it."""
    acme = world["acme"][0]
    with engine.begin() as conn:
        conn.execute(text("UPDATE tenants SET time_zone = 'Europe/Berlin' WHERE id = :id"), {"id": acme})
    utc = lambda day, hh, mm: datetime(2026, 10, day, hh, mm, tzinfo=timezone.utc)
    add(engine, cdr(acme, utc(24, 5, 30)), cdr(acme, utc(24, 6, 30)),  # 07:30, 08:30 CEST
        cdr(acme, utc(26, 6, 30)), cdr(acme, utc(26, 7, 30)))          # 07:30, 08:30 CET
    run_pass(engine, rules("off_hours", start="08:00", end="21:00", attempts=1), now=LATER)
    assert sorted(f["window_start"] for f in findings(engine)) == [
        utc(24, 5, 30).isoformat(), utc(26, 6, 30).isoformat()]


def test_offset_segments_cut_at_the_change():
    from callctl.anomaly.job import offset_segments

    start, end = datetime(2026, 10, 24, tzinfo=timezone.utc), datetime(2026, 10, 27, tzinfo=timezone.utc)
    change = datetime(2026, 10, 25, 1, 0, tzinfo=timezone.utc)
    assert offset_segments("Europe/Berlin", start, end) == [(start, change, 7_200_000), (change, end, 3_600_000)]
    assert offset_segments("Asia/Shanghai", start, end) == [(start, end, 28_800_000)]


# --- rules side by side (PostgreSQL: one connection per worker, one shared snapshot) ----

SOON = T0 + timedelta(hours=13)  # after the calls, while a day-long block is still in force


def _history_for_three_rules(engine, world) -> AnomalyConfig:
    acme, binding, _ = world["acme"]
    add(engine, *span(acme, 4, 600, binding_id=binding),
        cdr(acme, T0 + timedelta(hours=12), binding_id=binding))  # 22:00 in Shanghai: off hours
    return {"rules": {
        "caller_frequency": {"calls": 3}, "customer_frequency": {"calls": 3, "action": "block"},
        "off_hours": {"attempts": 1},
        **{r: {"enabled": False} for r in ("tenant_frequency", "ultra_short", "declined_repeat", "blast")}}}


def _found(engine) -> list[tuple]:
    return sorted((f["rule"], f["tenant"], f["subject"], f["window_start"], f["calls"], f["block_id"] is not None)
                  for f in findings(engine))


def _forget_everything(engine) -> None:
    with engine.begin() as conn:
        conn.execute(Block.__table__.delete().where(Block.finding_id.is_not(None)))
        conn.execute(AnomalyFinding.__table__.delete())
        conn.execute(AnomalyState.__table__.delete())


def test_rules_side_by_side_find_what_one_by_one_finds(engine, world):
    spec = _history_for_three_rules(engine, world)
    one = run_pass(engine, AnomalyConfig.model_validate({**spec, "workers": 1}), now=SOON)
    expected = _found(engine)
    assert {r for r, n in one.findings.items() if n} == {"caller_frequency", "customer_frequency", "off_hours"}
    assert one.blocks == 1 and one.cdrs == 5
    _forget_everything(engine)
    many = run_pass(engine, AnomalyConfig.model_validate({**spec, "workers": 3}), now=SOON)
    assert (many.findings, many.blocks, many.cdrs) == (one.findings, one.blocks, one.cdrs)
    assert _found(engine) == expected


def test_a_failing_rule_leaves_the_watermark_and_a_rerun_makes_each_finding_once(engine, world, monkeypatch):
    from callctl.anomaly import job

    config = AnomalyConfig.model_validate({**_history_for_three_rules(engine, world), "workers": 2})
    real = job._run_rule

    def off_hours_fails(conn, sql, config, name, *rest):
        if name == "off_hours":
            raise RuntimeError("disk full")
        return real(conn, sql, config, name, *rest)

    monkeypatch.setattr(job, "_run_rule", off_hours_fails)
    with pytest.raises(RuntimeError, match="disk full"):
        run_pass(engine, config, now=SOON)
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(AnomalyState)) == 0  # the watermark did not move
    monkeypatch.undo()
    again = run_pass(engine, config, now=SOON + timedelta(seconds=1))
    assert again.cdrs == 5  # every CDR read again
    assert [(rule, block) for rule, *_, block in _found(engine)] == [
        ("caller_frequency", False), ("customer_frequency", True), ("off_hours", False)]
    assert _counts(engine) == (3, 1)
