"""The regulator's export (`callctl export regulator`): per-tenant contact statistics,
per-day figures, findings and reveals over a period, as JSON, CSV and a self-contained
HTML report; never a real number. Real CDR writes, the real command, both databases."""
from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import inspect, select, text

from callctl import regulator
from callctl.service import CallService
from tests.agicalls import agi_call
from callctl.store import bindings, pool, tenants
from callctl.store.spool import CdrSpool
from tests.test_cli import run

CALLCTL = Path(sys.executable).with_name("callctl")
AGENT, HOTLINE, HOTLINE_2 = "+8613900000001", "+861058000000", "+861058000001"
CUSTOMERS = ["+8613800000001", "+8613800000002"]
X1, X2 = "+8617100000001", "+8617100000002"
T0 = datetime(2026, 11, 20, 8, 0, tzinfo=timezone.utc)
REAL = [AGENT, HOTLINE, HOTLINE_2, *CUSTOMERS]


@pytest.fixture
def world(engine, tmp_path):
    tenants.add_tenant(engine, "acme", HOTLINE, callers=[AGENT])
    tenants.add_tenant(engine, "bolt", HOTLINE_2, callers=[AGENT])
    pool.add_numbers(engine, "acme", [X1])
    pool.add_numbers(engine, "bolt", [X2])
    b1 = bindings.bind(engine, "acme", CUSTOMERS[0])["id"]
    b2 = bindings.bind(engine, "bolt", CUSTOMERS[1])["id"]
    service = CallService(engine, CdrSpool(tmp_path / "spool"))
    # (day, x, tenant, binding, action, reason, dial status)
    calls = [
        (0, X1, 1, b1, "bridge", "", "ANSWER"), (0, X1, 1, b1, "bridge", "", "NOANSWER"),
        (0, X1, 1, b1, "reject", "blocked", ""), (1, X1, 1, b1, "reject", "unavailable", ""),
        (1, X1, 1, b1, "bridge", "", "ANSWER"), (1, X2, 2, b2, "bridge", "", "ANSWER"),
        (2, X2, 2, b2, "reject", "expired", ""),
        (9, X1, 1, b1, "bridge", "", "ANSWER"),  # outside the period exported below
    ]
    for n, (day, x, tenant, binding, action, reason, dial) in enumerate(calls):
        start = (T0 + timedelta(days=day, minutes=n)).timestamp()
        service.record(agi_call(
            f"lab-{start:.0f}.{n}", called=x, caller=AGENT, action=action, reason=reason, binding=str(binding),
            destination=CUSTOMERS[0] if action == "bridge" else "", tenant=str(tenant), direction="to_customer",
            start=f"{start:.3f}", end=f"{start + 20:.3f}", dial_status=dial,
            answered_ms="10000" if dial == "ANSWER" else "", dialed_ms="20000" if dial == "ANSWER" else ""))
    return {"b1": b1, "b2": b2}


def export(engine, tmp_path, *args) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "CALLCTL_DATABASE_URL": engine.url.render_as_string(hide_password=False)}
    return run("export", "regulator", *args, env=env, cwd=tmp_path)  # outputs go to the leak check


PERIOD = ["--from", "2026-11-20", "--to", "2026-11-23"]


def assert_no_real_number(output: str) -> None:
    for number in REAL:
        assert number.removeprefix("+86") not in output, f"a real number leaked: {number[:6]}..."


def test_json_statistics_per_tenant_and_day(engine, world, tmp_path):
    done = export(engine, tmp_path, *PERIOD, "--format", "json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["period"] == {"from": "2026-11-20T00:00:00+00:00", "to": "2026-11-23T00:00:00+00:00"}
    acme, bolt = data["tenants"]
    assert {k: acme[k] for k in regulator.TENANT_COLUMNS if k not in ("findings", "findings_by_rule")} == {
        "tenant": "acme", "calls": 5, "answered": 2, "bridged": 3, "rejected": 2, "blocked": 1, "unavailable": 1,
        "rejected_other": 0, "refused_by_reason": {"blocked": 1, "unavailable": 1}, "reveals": 0,
        "reveals_by_scenario": {}, "blocks_placed": 0, "blocks_placed_by": {}, "blocks_lifted": 0,
        "blocks_lifted_by": {}}
    assert (bolt["calls"], bolt["answered"], bolt["rejected"], bolt["rejected_other"]) == (2, 1, 1, 1)
    assert bolt["refused_by_reason"] == {"expired": 1}
    assert [(d["day"], d["tenant"], d["calls"], d["rejected"]) for d in data["daily"]] == [
        ("2026-11-20", "acme", 3, 1), ("2026-11-21", "acme", 2, 1), ("2026-11-21", "bolt", 1, 0),
        ("2026-11-22", "bolt", 1, 1)]
    assert_no_real_number(done.stdout)


def test_findings_and_reveals_are_read_when_their_tables_exist(engine, world, tmp_path):
    tables = set(inspect(engine).get_table_names())
    data = json.loads(export(engine, tmp_path, *PERIOD, "--format", "json").stdout)
    if regulator.FINDINGS_TABLE not in tables:
        assert data["sources"]["findings"] is None and data["findings"] == []
    else:
        with engine.begin() as conn:
            for n, (rule, tenant, start) in enumerate([("short_calls", 1, T0), ("short_calls", 1, T0 + timedelta(days=1)),
                                                       ("blast", 2, T0 + timedelta(days=2)),
                                                       ("blast", 2, T0 + timedelta(days=30))]):
                conn.execute(text(
                    f"INSERT INTO {regulator.FINDINGS_TABLE} (rule, tenant_id, subject_kind, subject, binding_id,"
                    " period, window_start, window_end, calls, measure, threshold, severity, action, evidence)"
                    " VALUES (:rule, :tenant, 'binding', :subject, :binding, :period, :start, :end, 5, 0.8, 0.5,"
                    " 'high', 'block', '[1, 2, 3]')"),
                    {"rule": rule, "tenant": tenant, "subject": str(world["b1"]), "binding": world["b1"],
                     "period": n, "start": start, "end": start + timedelta(hours=1)})
        data = json.loads(export(engine, tmp_path, *PERIOD, "--format", "json").stdout)
        assert data["sources"]["findings"] == regulator.FINDINGS_TABLE
        assert [(f["tenant"], f["rule"], f["evidence"]) for f in data["findings"]] == [
            ("acme", "short_calls", [1, 2, 3]), ("acme", "short_calls", [1, 2, 3]), ("bolt", "blast", [1, 2, 3])]
        acme, bolt = data["tenants"]
        assert acme["findings_by_rule"] == {"short_calls": 2} and bolt["findings_by_rule"] == {"blast": 1}
        assert [d["findings"] for d in data["daily"] if d["tenant"] == "bolt"] == [0, 1]
    if regulator.REVEALS_TABLE not in tables:
        assert data["sources"]["reveals"] is None and {t["reveals"] for t in data["tenants"]} == {None}


def test_csv_sections_split_cleanly(engine, world, tmp_path):
    done = export(engine, tmp_path, *PERIOD, "--format", "csv")
    assert done.returncode == 0, done.stderr
    sections = {}
    for chunk in done.stdout.strip("\n").split("\n\n"):
        rows = list(csv.DictReader(io.StringIO(chunk)))
        names = {row["section"] for row in rows}
        assert len(names) <= 1
        sections[chunk.split(",", 2)[1] if not rows else rows[0]["section"]] = rows
    assert [r["tenant"] for r in sections["tenants"]] == ["acme", "bolt"]
    assert sections["tenants"][0]["calls"] == "5" and sections["tenants"][0]["blocked"] == "1"
    assert len(sections["daily"]) == 4
    assert_no_real_number(done.stdout)


def test_html_report_is_self_contained_with_a_chart_per_tenant(engine, world, tmp_path):
    out = tmp_path / "report.html"
    done = export(engine, tmp_path, *PERIOD, "--format", "html", "--output", str(out))
    assert done.returncode == 0 and done.stdout == "", done.stderr
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count("<svg") >= 2 + 3  # one chart per tenant (plus the legend swatches)
    assert "<h2>acme</h2>" in page and "<h2>bolt</h2>" in page
    assert re.search(r"<title>2026-11-20 calls: 3</title>", page)  # a bar says what it is
    # Nothing fetched from elsewhere: no script, no external reference of any kind.
    assert "<script" not in page and not re.search(r"(src|href)=|https?://(?!www\.w3\.org/2000/svg)|@import|url\(", page)
    assert_no_real_number(page)


@pytest.mark.parametrize("args, message", [
    (["--from", "2026-11-23", "--to", "2026-11-20"], "--from must be before --to"),
    (["--from", "last week", "--to", "2026-11-20"], "--from must be an ISO date"),
    (["--from", "2025-01-01", "--to", "2026-11-20"], "at most 366 days"),
])
def test_bad_periods_are_clear_errors(engine, world, tmp_path, args, message):
    done = export(engine, tmp_path, *args)
    assert done.returncode == 1 and message in done.stderr and done.stdout == ""


def test_formula_like_tenant_names_are_not_formulas_in_csv(engine, tmp_path):
    tenants.add_tenant(engine, "=cmd", HOTLINE, callers=[AGENT])
    pool.add_numbers(engine, "=cmd", [X1])
    CallService(engine, CdrSpool(tmp_path / "spool")).record(agi_call(
        "lab-1.1", called=X1, caller=AGENT, action="reject", reason="blocked", tenant="1",
        start=f"{T0.timestamp():.3f}"))
    assert "tenants,'=cmd," in export(engine, tmp_path, *PERIOD, "--format", "csv").stdout


def test_export_after_a_reveal_counts_it(engine, world, tmp_path):
    """The reveal log is reveal_grants + audit_log (callctl.store.reveal): a reveal used
    in the period counts for the binding's tenant, by scenario, in every format; a
    request, a refusal or a denied attempt is not a reveal."""
    from callctl.store import reveal

    def reveal_at(binding, scenario, moment, use=True):
        grant = reveal.request(engine, binding, "a", scenario, f"CASE-{scenario}", "alice", max_uses=2, now=moment)
        reveal.approve(engine, grant["id"], "bob", now=moment)
        if use:
            reveal.use(engine, grant["id"], "alice", now=moment + timedelta(minutes=1))
        return grant["id"]

    reveal_at(world["b1"], "claim", T0)
    twice = reveal_at(world["b1"], "complaint", T0 + timedelta(days=1))
    reveal.use(engine, twice, "alice", now=T0 + timedelta(days=1, minutes=2))
    reveal_at(world["b2"], "aml", T0 + timedelta(days=2), use=False)  # approved, never used
    with pytest.raises(reveal.RevealError):
        reveal.use(engine, twice, "mallory", now=T0 + timedelta(days=1, minutes=3))  # denied: not counted
    reveal_at(world["b2"], "aml", T0 + timedelta(days=9))  # outside the period
    data = json.loads(export(engine, tmp_path, *PERIOD, "--format", "json").stdout)
    assert data["sources"]["reveals"] == "audit_log"
    acme, bolt = data["tenants"]
    assert (acme["reveals"], acme["reveals_by_scenario"]) == (3, {"claim": 1, "complaint": 2})
    assert (bolt["reveals"], bolt["reveals_by_scenario"]) == (0, {})
    csv_out = export(engine, tmp_path, *PERIOD, "--format", "csv").stdout
    assert "claim=1;complaint=2" in csv_out
    out = tmp_path / "r.html"
    export(engine, tmp_path, *PERIOD, "--format", "html", "--output", str(out))
    assert "claim=1;complaint=2" in out.read_text() and "not available" not in out.read_text()


def test_blocks_by_scope_and_origin_and_the_blacklist_are_counted(engine, world, tmp_path):
    """Blocks placed and lifted per tenant and day by scope and origin: manual, automatic
    (the anomaly job's, for a finding) and the shared blacklist (for each tenant whose
    evidence it carries); a suspension is scope tenant."""
    from callctl.store import blacklist, blocks
    from callctl.store.models import Cdr

    day1, day2 = T0 + timedelta(hours=2), T0 + timedelta(days=1, hours=2)
    manual = blocks.add_block(engine, scope="binding", binding_id=world["b1"], direction="to_customer",
                              reason="complaint", created_by="ops", now=day1)
    blocks.add_block(engine, scope="tenant", tenant="bolt", direction="to_customer", reason="suspended",
                     created_by="regulator", now=day1)
    blocks.lift_block(engine, manual["id"], "ops", now=day2)
    with engine.begin() as conn:
        finding = conn.execute(text(
            "INSERT INTO anomaly_findings (rule, tenant_id, subject_kind, subject, binding_id, period, window_start,"
            " window_end, calls, measure, threshold, severity, action, evidence) VALUES ('ultra_short', 1,"
            " 'binding', :b, :b, 1, :at, :at, 5, 1, 0.8, 'high', 'block', '[1]') RETURNING id"),
            {"b": world["b1"], "at": day1}).scalar_one()
        conn.execute(text(
            "INSERT INTO blocks (tenant_id, scope, direction, binding_id, reason, created_by, starts_at, created_at,"
            " finding_id) VALUES (1, 'binding', 'to_customer', :b, 'anomaly', 'anomaly:ultra_short', :at, :at, :f)"),
            {"b": world["b1"], "at": day2, "f": finding})
        cdrs = list(conn.scalars(select(Cdr.id).where(Cdr.tenant_id == 1)))
    entry = blacklist.propose(engine, caller=AGENT, reason="harassment", proposed_by="a", cdrs=cdrs[:2], now=day1)
    blacklist.approve(engine, entry["id"], "b", now=day1)
    blacklist.approve(engine, entry["id"], "c", now=day1)
    blacklist.lift(engine, entry["id"], "d", now=day2)
    data = json.loads(export(engine, tmp_path, *PERIOD, "--format", "json").stdout)
    acme, bolt = data["tenants"]
    assert acme["blocks_placed_by"] == {"binding/manual": 1, "binding/automatic": 1, "caller/blacklist": 1}
    assert acme["blocks_lifted_by"] == {"binding/manual": 1, "caller/blacklist": 1}
    assert (acme["blocks_placed"], acme["blocks_lifted"]) == (3, 2)
    assert bolt["blocks_placed_by"] == {"tenant/manual": 1} and bolt["blocks_lifted"] == 0
    acme_days = {d["day"]: d for d in data["daily"] if d["tenant"] == "acme"}
    assert (acme_days["2026-11-20"]["blocks_placed"], acme_days["2026-11-21"]["blocks_placed"]) == (2, 1)
    assert acme_days["2026-11-21"]["blocks_lifted"] == 2
    out = tmp_path / "r.html"
    export(engine, tmp_path, *PERIOD, "--format", "html", "--output", str(out))
    page = out.read_text()
    assert "<h3>Blocks placed by scope/origin</h3>" in page and "<title>caller/blacklist: 1</title>" in page
    assert "<title>2026-11-21 blocks_lifted: 2</title>" in page
    assert_no_real_number(page)
