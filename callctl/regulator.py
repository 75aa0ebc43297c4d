"""The regulator's export: contact behaviour per tenant over a period, and the findings.

`report()` gathers it with set-based SQL (GROUP BY over the CDRs, the anomaly findings
and the audit log); `as_json`, `as_csv` and `as_html` render it. Nothing in it can
carry a real number: CDR numbers are not read at all, tenants appear by name, finding
subjects are binding ids, tenants or keyed caller hashes.

Findings come from the anomaly job's table `anomaly_findings`. Reveals are the audit
log's `reveal_used` entries (callctl.store.reveal: one per real number shown), counted
for the tenant of the grant's binding and by the grant's scenario, at the time of the
entry. (Until #17 this read a table `reveal_audit` that no migration creates, so reveals
were never counted.)
"""
from __future__ import annotations

import csv
import html
import io
import json
from collections import defaultdict
from datetime import date, datetime, timedelta, timezone

from sqlalchemy import Date, and_, case, cast, func, inspect, select, text
from sqlalchemy.engine import Engine

from callctl.core.times import parse_time
from callctl.errors import ProvisionError
from callctl.store.models import (AuditEntry, BlacklistEntry, BlacklistEvidence, Binding, Block, Cdr, RevealGrant,
                                  Tenant)

FINDINGS_TABLE = "anomaly_findings"
REVEALS_TABLE = "audit_log"  # its reveal_used entries, with reveal_grants for tenant and scenario
MAX_DAYS = 366
EXPORT_TIMEOUT_S = 300

TENANT_COLUMNS = ("tenant", "calls", "answered", "bridged", "rejected", "blocked", "unavailable",
                  "rejected_other", "refused_by_reason", "findings", "findings_by_rule", "reveals",
                  "reveals_by_scenario", "blocks_placed", "blocks_placed_by", "blocks_lifted", "blocks_lifted_by")
DAILY_COLUMNS = ("day", "tenant", "calls", "answered", "rejected", "findings", "blocks_placed", "blocks_lifted",
                 "reveals")
FINDING_COLUMNS = ("id", "tenant", "rule", "subject_kind", "subject", "window_start", "window_end", "calls",
                   "measure", "threshold", "severity", "action", "evidence")


def _day(engine: Engine, column):
    """The UTC calendar day of a timestamp column, on either database."""
    if engine.dialect.name == "postgresql":
        return cast(func.timezone("UTC", column), Date)
    return func.date(column)  # SQLite stores UTC already


def _iso(value) -> str | None:
    return value.isoformat() if isinstance(value, (datetime, date)) else value


def period(start: str, end: str, now: datetime | None = None) -> tuple[datetime, datetime]:
    """--from / --to as typed: ISO dates (UTC midnight) or date-times with zone, or ages."""
    now = now or datetime.now(timezone.utc)
    return parse_time(start, "from", now, code="invalid_period"), parse_time(end, "to", now, code="invalid_period")


def report(engine: Engine, start: datetime, end: datetime, now: datetime | None = None) -> dict:
    if start.tzinfo is None or end.tzinfo is None:
        raise ProvisionError("invalid_period", "--from and --to need a time zone")
    if start >= end:
        raise ProvisionError("invalid_period", "--from must be before --to")
    if end - start > timedelta(days=MAX_DAYS):
        raise ProvisionError("invalid_period", f"the period is at most {MAX_DAYS} days; export longer ones in parts")
    tables = set(inspect(engine).get_table_names())
    has_findings, has_reveals = FINDINGS_TABLE in tables, REVEALS_TABLE in tables
    names, per_tenant, daily, findings, counted = _read(engine, start, end, has_findings, has_reveals)
    tenants, days = _fold(names, per_tenant, daily, findings, counted, has_reveals)
    return {
        "period": {"from": start.isoformat(), "to": end.isoformat()},
        "generated_at": (now or datetime.now(timezone.utc)).isoformat(),
        "sources": {"findings": FINDINGS_TABLE if has_findings else None,
                    "reveals": REVEALS_TABLE if has_reveals else None},
        "tenants": tenants,
        "daily": days,
        "findings": findings,
    }


def _read(engine: Engine, start: datetime, end: datetime, has_findings: bool, has_reveals: bool):
    """The period's counts, in one connection: tenant names, calls per tenant and per
    day, findings, and (day, tenant id, what, count) rows of refusals, reveals, blocks."""
    in_period = and_(Cdr.started_at >= start, Cdr.started_at < end)
    answered = and_(Cdr.decision == "bridged", Cdr.dial_status == "ANSWER")
    count_if = lambda condition: func.sum(case((condition, 1), else_=0))
    day = _day(engine, Cdr.started_at)
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            # An engine made for the call path or the API (db_timeout) would cut a long
            # period's GROUP BY short; an export may take its time, within reason.
            conn.exec_driver_sql(f"SET LOCAL statement_timeout = '{EXPORT_TIMEOUT_S}s'")
        names = dict(conn.execute(select(Tenant.id, Tenant.name)).all())
        per_tenant = conn.execute(
            select(Cdr.tenant_id, func.count(), count_if(answered), count_if(Cdr.decision == "bridged"),
                   count_if(Cdr.decision == "rejected"), count_if(Cdr.reject_reason == "blocked"),
                   count_if(Cdr.reject_reason == "unavailable"))
            .where(in_period).group_by(Cdr.tenant_id)
        ).all()
        daily = conn.execute(
            select(day, Cdr.tenant_id, func.count(), count_if(answered), count_if(Cdr.decision == "rejected"))
            .where(in_period).group_by(day, Cdr.tenant_id)
        ).all()
        findings = _findings(conn, engine, start, end) if has_findings else []
        day_of = lambda column: _day(engine, column)
        # (day, tenant id, what, count) rows, folded into the tenant and daily tables by _fold.
        counted = {
            "refused": conn.execute(
                select(day, Cdr.tenant_id, func.coalesce(Cdr.reject_reason, "other"), func.count())
                .where(in_period, Cdr.decision == "rejected").group_by(day, Cdr.tenant_id, Cdr.reject_reason)
            ).all(),
            "reveals": conn.execute(
                select(day_of(AuditEntry.at), Binding.tenant_id, RevealGrant.scenario, func.count())
                .select_from(AuditEntry)
                .join(RevealGrant, RevealGrant.id == AuditEntry.grant_id)
                .join(Binding, Binding.id == RevealGrant.binding_id)
                .where(AuditEntry.action == "reveal_used", AuditEntry.at >= start, AuditEntry.at < end)
                .group_by(day_of(AuditEntry.at), Binding.tenant_id, RevealGrant.scenario)
            ).all() if has_reveals else [],
            "blocks_placed": _blocks(conn, day_of, Block.created_at, start, end),
            "blocks_lifted": _blocks(conn, day_of, Block.ends_at, start, end, Block.lifted_by.is_not(None)),
        }
        # The shared blacklist counts for each tenant whose evidence it carries (scope caller).
        for what, column, status in (("blocks_placed", BlacklistEntry.starts_at, None),
                                     ("blocks_lifted", BlacklistEntry.closed_at, "lifted")):
            counted[what] += [(when, tenant_id, "caller/blacklist", n) for when, tenant_id, n in conn.execute(
                select(day_of(column), BlacklistEvidence.tenant_id, func.count(func.distinct(BlacklistEntry.id)))
                .join(BlacklistEvidence, BlacklistEvidence.entry_id == BlacklistEntry.id)
                .where(column >= start, column < end, *([BlacklistEntry.status == status] if status else []))
                .group_by(day_of(column), BlacklistEvidence.tenant_id))]
    return names, per_tenant, daily, findings, counted


def _fold(names: dict, per_tenant, daily, findings: list, counted: dict, has_reveals: bool) -> tuple[list, list]:
    """The counts folded into the tenant table and the daily table, both sorted."""
    tenant_name = lambda tenant_id: names.get(tenant_id, "(no tenant: unknown X)") if tenant_id else "(no tenant: unknown X)"
    rows: dict[str, dict] = {}

    def tenant_row(name: str) -> dict:
        return rows.setdefault(name, {
            "tenant": name, "calls": 0, "answered": 0, "bridged": 0, "rejected": 0, "blocked": 0,
            "unavailable": 0, "rejected_other": 0, "findings": 0, "findings_by_rule": {},
            "reveals": 0 if has_reveals else None, "reveals_by_scenario": {}, "refused_by_reason": {},
            "blocks_placed": 0, "blocks_placed_by": {}, "blocks_lifted": 0, "blocks_lifted_by": {},
        })

    days: dict[tuple[str, str], dict] = {}

    def day_row(when, tenant: str) -> dict:
        key = (_iso(when) if not isinstance(when, str) else when, tenant)
        return days.setdefault(key, {"day": key[0], "tenant": tenant, **{c: 0 for c in DAILY_COLUMNS[2:]}})

    for tenant_id, calls, ans, bridged, rejected, blocked, unavailable in per_tenant:
        row = tenant_row(tenant_name(tenant_id))
        row.update(calls=row["calls"] + calls, answered=row["answered"] + ans, bridged=row["bridged"] + bridged,
                   rejected=row["rejected"] + rejected, blocked=row["blocked"] + blocked,
                   unavailable=row["unavailable"] + unavailable)
        row["rejected_other"] = row["rejected"] - row["blocked"] - row["unavailable"]
    for finding in findings:
        row = tenant_row(finding["tenant"])
        row["findings"] += 1
        row["findings_by_rule"][finding["rule"]] = row["findings_by_rule"].get(finding["rule"], 0) + 1
        day_row(finding["window_start"][:10], finding["tenant"])["findings"] += 1
    by_key = {"refused": "refused_by_reason", "reveals": "reveals_by_scenario", "blocks_placed": "blocks_placed_by",
              "blocks_lifted": "blocks_lifted_by"}
    for what, counts in counted.items():
        for when, tenant_id, key, count in counts:
            name = tenant_name(tenant_id)
            row = tenant_row(name)
            row[by_key[what]][key] = row[by_key[what]].get(key, 0) + count
            if what != "refused":
                row[what] += count
                day_row(when, name)[what] += count

    for when, tenant_id, calls, ans, rejected in daily:
        entry = day_row(when, tenant_name(tenant_id))
        entry.update(calls=entry["calls"] + calls, answered=entry["answered"] + ans,
                     rejected=entry["rejected"] + rejected)
    return (sorted(rows.values(), key=lambda r: r["tenant"]),
            sorted(days.values(), key=lambda r: (r["day"], r["tenant"])))


def _blocks(conn, day_of, column, start: datetime, end: datetime, *where) -> list[tuple]:
    """Blocks by day of `column`, tenant and "scope/origin" (origin: automatic when the
    anomaly job placed it for a finding, else manual; scope tenant is a suspension)."""
    automatic = Block.finding_id.is_not(None)
    rows = conn.execute(
        select(day_of(column), Block.tenant_id, Block.scope, automatic, func.count())
        .where(column >= start, column < end, *where)
        .group_by(day_of(column), Block.tenant_id, Block.scope, automatic)
    ).all()
    return [(when, tenant_id, f"{scope}/{'automatic' if auto else 'manual'}", n) for when, tenant_id, scope, auto, n in rows]


def _findings(conn, engine: Engine, start: datetime, end: datetime) -> list[dict]:
    """Findings whose window overlaps the period, as the anomaly job stored them."""
    rows = conn.execute(text(
        f"SELECT f.id, t.name AS tenant, f.rule, f.subject_kind, f.subject, f.window_start, f.window_end,"
        f" f.calls, f.measure, f.threshold, f.severity, f.action, f.evidence"
        f" FROM {FINDINGS_TABLE} f JOIN tenants t ON t.id = f.tenant_id"
        f" WHERE f.window_start < :end AND f.window_end > :start ORDER BY f.window_start, f.id"
    ), {"start": start, "end": end}).mappings().all()
    out = []
    for row in rows:
        item = {key: row[key] for key in FINDING_COLUMNS}
        for key in ("window_start", "window_end"):
            value = item[key]
            if isinstance(value, str):  # SQLite hands back text
                value = datetime.fromisoformat(value)
            if value.tzinfo is None:
                value = value.replace(tzinfo=timezone.utc)
            item[key] = value.astimezone(timezone.utc).isoformat()
        try:
            item["evidence"] = json.loads(item["evidence"])
        except (TypeError, ValueError):
            pass
        out.append(item)
    return out


# --- rendering ------------------------------------------------------------------------

def as_json(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False)


def as_csv(data: dict) -> str:
    """Three tables, one after the other, separated by an empty line. The first column of
    every row names its table (tenants, daily, findings), so each can be split out."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    sections = (("tenants", TENANT_COLUMNS, data["tenants"]), ("daily", DAILY_COLUMNS, data["daily"]),
                ("findings", FINDING_COLUMNS, data["findings"]))
    for n, (name, columns, rows) in enumerate(sections):
        if n:
            out.write("\n")
        writer.writerow(["section", *columns])
        for row in rows:
            writer.writerow([name, *(_cell(row[column]) for column in columns)])
    return out.getvalue()


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        return ";".join(f"{k}={v}" for k, v in sorted(value.items()))
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@"):
        return "'" + value  # a spreadsheet must not run a tenant's name as a formula
    return str(value)


COLOURS = {"calls": "#4878a8", "rejected": "#d0743c", "findings": "#8c3b8c", "blocks_placed": "#b8403a",
           "blocks_lifted": "#5a9a5a", "reveals": "#c9a227"}
# Two charts per tenant: call volumes, and the (much rarer) actions on contact behaviour.
VOLUMES, ACTIONS = ("calls", "rejected"), ("findings", "blocks_placed", "blocks_lifted", "reveals")
# Per tenant, as horizontal bars: what each total is made of.
BREAKDOWNS = (("refused_by_reason", "Refusals by reason"), ("blocks_placed_by", "Blocks placed by scope/origin"),
              ("blocks_lifted_by", "Blocks lifted by scope/origin"), ("reveals_by_scenario", "Reveals by scenario"),
              ("findings_by_rule", "Findings by rule"))


def as_html(data: dict) -> str:
    """One self-contained page: per tenant, charts of calls and rejections per day, of
    findings, blocks placed and lifted and reveals per day, and bars of what each is made
    of (refusals by reason, blocks by scope and origin, reveals by scenario, findings by
    rule), all inline SVG; then the tables. No script, no stylesheet or font from elsewhere."""
    period = data["period"]
    start, end = (datetime.fromisoformat(period[k]).date() for k in ("from", "to"))
    day_list = [start + timedelta(days=n) for n in range(max((end - start).days, 1))]
    per_tenant: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in data["daily"]:
        per_tenant[row["tenant"]][row["day"]] = row
    esc = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>callctl regulator report {esc(period['from'])} to {esc(period['to'])}</title>",
        "<style>body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #bbb;padding:2px 8px;text-align:right}th{background:#eee}"
        "td:first-child,th:first-child{text-align:left}.legend span{margin-right:1.5em}</style></head><body>",
        "<h1>Contact behaviour report</h1>",
        f"<p>Period: {esc(period['from'])} to {esc(period['to'])} (end exclusive, days in UTC). "
        f"Generated {esc(data['generated_at'])}. No real phone number appears in this report.</p>",
    ]
    for what, source in data["sources"].items():
        if source is None:
            parts.append(f"<p><em>{esc(what.capitalize())}: not available on this installation "
                         f"(its table does not exist); not counted.</em></p>")
    parts.append('<p class="legend">' + "".join(
        f'<span><svg width="12" height="12"><rect width="12" height="12" fill="{colour}"/></svg> {esc(name)}</span>'
        for name, colour in COLOURS.items()) + " per day</p>")
    totals = {row["tenant"]: row for row in data["tenants"]}
    for tenant in sorted(set(per_tenant) | set(totals)):
        parts.append(f"<h2>{esc(tenant)}</h2>")
        parts.append(_chart(day_list, per_tenant[tenant], VOLUMES))
        parts.append(_chart(day_list, per_tenant[tenant], ACTIONS))
        for key, title in BREAKDOWNS:
            if (totals.get(tenant) or {}).get(key):
                parts.append(f"<h3>{esc(title)}</h3>" + _bars(totals[tenant][key]))
    parts.append("<h2>Per tenant</h2>")
    parts.append(_html_table(TENANT_COLUMNS, data["tenants"]))
    parts.append("<h2>Findings</h2>")
    parts.append(_html_table(FINDING_COLUMNS, data["findings"]) if data["findings"] else "<p>None.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _bars(counts: dict[str, int], width: int = 420) -> str:
    """Horizontal bars, one per key, longest first, each with its count."""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    top = max(v for _, v in items) or 1
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 260}" height="{18 * len(items) + 4}" role="img">']
    for n, (key, value) in enumerate(items):
        y, w = 2 + 18 * n, max(1.0, value / top * width)
        out.append(f'<text x="170" y="{y + 12}" font-size="11" text-anchor="end">{html.escape(str(key))}</text>'
                   f'<rect x="176" y="{y}" width="{w:.1f}" height="14" fill="#4878a8">'
                   f'<title>{html.escape(str(key))}: {value}</title></rect>'
                   f'<text x="{180 + w:.1f}" y="{y + 12}" font-size="11">{value}</text>')
    out.append("</svg>")
    return "".join(out)


def _chart(days: list[date], by_day: dict[str, dict], series=VOLUMES, height: int = 160) -> str:
    """Grouped bars, one group per day, one bar per series."""
    series = list(series)
    top = max([max(row.get(s, 0) for s in series) for row in by_day.values()] + [1])
    k_bars = len(series)
    group = max(k_bars * 6 + 4, min(k_bars * 14 + 6, 900 // max(len(days), 1)))
    bar = (group - 4) / k_bars
    left, bottom = 40, height - 30
    width = left + group * len(days) + 10
    scale = (bottom - 10) / top
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
           f'<line x1="{left}" y1="{bottom}" x2="{width - 5}" y2="{bottom}" stroke="#888"/>',
           f'<text x="{left - 4}" y="{bottom - (bottom - 10) + 4}" font-size="10" text-anchor="end">{top}</text>',
           f'<text x="{left - 4}" y="{bottom + 4}" font-size="10" text-anchor="end">0</text>']
    for n, day in enumerate(days):
        row = by_day.get(day.isoformat(), {})
        x0 = left + n * group + 2
        for k, name in enumerate(series):
            value = row.get(name, 0)
            h = value * scale
            out.append(f'<rect x="{x0 + k * bar:.1f}" y="{bottom - h:.1f}" width="{bar - 1:.1f}" height="{h:.1f}"'
                       f' fill="{COLOURS[name]}"><title>{day} {name}: {value}</title></rect>')
        if len(days) <= 31 or n % 7 == 0:
            out.append(f'<text x="{x0 + group / 2 - 2:.1f}" y="{bottom + 14}" font-size="9"'
                       f' text-anchor="middle">{day:%m-%d}</text>')
    out.append("</svg>")
    return "".join(out)


def _html_table(columns, rows) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(_cell(row[c]))}</td>" for c in columns) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


RENDER = {"json": as_json, "csv": as_csv, "html": as_html}
MEDIA_TYPES = {"json": "application/json", "csv": "text/csv; charset=utf-8", "html": "text/html; charset=utf-8"}
