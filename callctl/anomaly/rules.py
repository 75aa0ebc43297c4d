"""The anomaly rules as set-based SQL: one INSERT ... SELECT per rule (and per group of
tenants sharing the rule's settings), run in the database.

Every statement is a chain of CTEs over the CDRs in a scan range of started_at (a range
filter, so a table partitioned by day reads only the days it needs):

    scoped    the rule's CDRs with their subject (caller hash, binding or tenant) and
              t = started_at in epoch milliseconds (integers: the same arithmetic on
              PostgreSQL and SQLite, exact at the window edges)
    hits      (tenant, subject, period) that break the threshold, with the measure
    evidence  the CDRs behind each hit
    then      one finding per hit, ON CONFLICT DO NOTHING on (rule, tenant, subject, period)

Windows: the frequency rules slide (LAG over the subject's calls: the call `calls - 1`
before this one started less than `window` earlier); the others count in fixed periods
of `window` seconds from the epoch (the tenant's local day for off_hours). A finding's
period is the fixed period its hit falls in, so the same CDRs always give the same keys.

The window functions partition by subject and order by (started_at, id), the order of
the indexes of migration 0050, so PostgreSQL streams the rows in index order instead of
sorting the whole range. The thresholds are integers written into the statement (from
the validated config); everything else is a bound parameter.
"""
from __future__ import annotations

from dataclasses import dataclass

from callctl.anomaly.config import Rule, clock_minute

SUBJECT = {"caller": "c.caller_hash", "binding": "c.binding_id", "tenant": "c.tenant_id"}
# A binding belongs to one tenant; a caller's number may call several tenants.
PARTITION = {"caller": "s.tenant_id, s.subject", "binding": "s.subject", "tenant": "s.subject"}


@dataclass(frozen=True)
class Sql:
    """The few expressions PostgreSQL and SQLite spell differently."""
    dialect: str

    def ms(self, column: str) -> str:
        if self.dialect == "postgresql":
            return f"CAST(date_part('epoch', {column}) * 1000 AS BIGINT)"  # double: fast, exact to the ms
        return f"CAST(ROUND((julianday({column}) - 2440587.5) * 86400000.0) AS INTEGER)"

    def id_list(self, column: str) -> str:
        if self.dialect == "postgresql":
            return f"string_agg(CAST({column} AS TEXT), ',' ORDER BY {column})"
        return f"group_concat({column}, ',')"


@dataclass(frozen=True)
class RuleSql:
    where: str  # which CDRs the rule reads
    columns: str  # more columns of scoped
    body: str  # CTEs defining hits(tenant_id, subject, period_ms, measure) and evidence
    sliding: bool = False  # a sliding window: the measure is the calls in the window


_SLIDING = """
marked AS (
    SELECT s.*, LAG(s.started_at, {lag}) OVER (PARTITION BY {partition} ORDER BY s.started_at, s.id) AS first_at
    FROM scoped s
),
hits AS (
    SELECT tenant_id, subject, (t / {w}) * {w} AS period_ms, MIN(first_at) AS from_at,
           MAX(started_at) AS to_at, COUNT(*) AS measure
    FROM (SELECT m.*, {first_ms} AS first_t FROM marked m WHERE m.first_at IS NOT NULL) x
    WHERE t - first_t < {w}
    GROUP BY tenant_id, subject, (t / {w}) * {w}
),
evidence AS (
    SELECT h.tenant_id, h.subject, h.period_ms, s.id, s.started_at
    FROM hits h JOIN scoped s
      ON s.tenant_id = h.tenant_id AND s.subject = h.subject AND s.started_at BETWEEN h.from_at AND h.to_at
)"""


RULE_SQL: dict[str, RuleSql] = {
    "caller_frequency": RuleSql("c.caller_hash IS NOT NULL", "", _SLIDING, sliding=True),
    "tenant_frequency": RuleSql("c.direction = 'to_customer'", "", _SLIDING, sliding=True),
    "customer_frequency": RuleSql("c.direction = 'to_customer' AND c.binding_id IS NOT NULL", "", _SLIDING,
                                  sliding=True),
    "ultra_short": RuleSql(
        where="c.direction = 'to_customer' AND c.binding_id IS NOT NULL AND c.answered_at IS NOT NULL",
        columns=", CASE WHEN c.talk_seconds * 1000 < {talk_ms} THEN 1 ELSE 0 END AS short",
        body="""
shorts AS (  -- short calls are few: count them first, then all answered calls of their periods
    SELECT tenant_id, subject, (t / {w}) * {w} AS period_ms, COUNT(*) AS shorts
    FROM scoped WHERE short = 1
    GROUP BY tenant_id, subject, (t / {w}) * {w} HAVING COUNT(*) >= {min_calls}
),
periods AS (
    SELECT p.tenant_id, p.subject, p.period_ms, MAX(p.shorts) AS shorts, COUNT(*) AS answered
    FROM shorts p JOIN scoped s
      ON s.tenant_id = p.tenant_id AND s.subject = p.subject AND (s.t / {w}) * {w} = p.period_ms
    GROUP BY p.tenant_id, p.subject, p.period_ms
),
hits AS (
    SELECT tenant_id, subject, period_ms, shorts * 1.0 / answered AS measure
    FROM periods WHERE shorts * 1000000 >= {share_ppm} * answered
),
evidence AS (
    SELECT h.tenant_id, h.subject, h.period_ms, s.id, s.started_at
    FROM hits h JOIN scoped s
      ON s.tenant_id = h.tenant_id AND s.subject = h.subject AND (s.t / {w}) * {w} = h.period_ms
    WHERE s.short = 1
)""",
    ),
    "declined_repeat": RuleSql(
        where="c.direction = 'to_customer' AND c.binding_id IS NOT NULL",
        columns=", CASE WHEN c.dial_status IN :statuses OR c.hangup_cause IN :causes THEN 1 ELSE 0 END"
                " AS declined, {end_ms} AS end_t",
        body="""
marked AS (
    SELECT s.*, LAG(s.declined) OVER win AS prev_declined, LAG(s.end_t) OVER win AS prev_end,
           LAG(s.id) OVER win AS prev_id, LAG(s.started_at) OVER win AS prev_started
    FROM scoped s
    WINDOW win AS (PARTITION BY {partition} ORDER BY s.started_at, s.id)
),
repeats AS (
    SELECT tenant_id, subject, (t / {w}) * {w} AS period_ms, id, started_at, prev_id, prev_started
    FROM marked WHERE prev_declined = 1 AND t - prev_end < {w}
),
hits AS (
    SELECT tenant_id, subject, period_ms, COUNT(*) AS measure
    FROM repeats GROUP BY tenant_id, subject, period_ms HAVING COUNT(*) >= {repeats}
),
evidence AS (
    SELECT r.tenant_id, r.subject, r.period_ms, r.id, r.started_at
    FROM repeats r JOIN hits h USING (tenant_id, subject, period_ms)
    UNION
    SELECT r.tenant_id, r.subject, r.period_ms, r.prev_id, r.prev_started
    FROM repeats r JOIN hits h USING (tenant_id, subject, period_ms)
)""",
    ),
    "off_hours": RuleSql(
        where="c.direction = 'to_customer'",
        # Local wall clock: the scan has one UTC offset (the job splits scans at DST changes).
        columns=", {start_ms} + :utc_offset_ms AS local_t",
        body="""
outside AS (
    SELECT s.*, (local_t / 86400000) * 86400000 AS period_ms
    FROM (SELECT s.*, (local_t / 60000) % 1440 AS minute FROM scoped s) s
    WHERE {outside}
),
hits AS (
    SELECT tenant_id, subject, period_ms, COUNT(*) AS measure
    FROM outside GROUP BY tenant_id, subject, period_ms HAVING COUNT(*) >= {attempts}
),
evidence AS (
    SELECT o.tenant_id, o.subject, o.period_ms, o.id, o.started_at
    FROM outside o JOIN hits h USING (tenant_id, subject, period_ms)
)""",
    ),
    "blast": RuleSql(
        where="c.direction = 'to_customer' AND c.caller_hash IS NOT NULL AND c.binding_id IS NOT NULL",
        columns=", c.binding_id AS customer",
        body="""
counted AS (
    SELECT tenant_id, subject, (t / {w}) * {w} AS period_ms, COUNT(DISTINCT customer) AS measure
    FROM scoped GROUP BY tenant_id, subject, (t / {w}) * {w}
),
hits AS (
    SELECT * FROM counted WHERE measure >= {customers}
),
evidence AS (
    SELECT h.tenant_id, h.subject, h.period_ms, s.id, s.started_at
    FROM hits h JOIN scoped s
      ON s.tenant_id = h.tenant_id AND s.subject = h.subject AND (s.t / {w}) * {w} = h.period_ms
)""",
    ),
}


def constants(name: str, rule: Rule) -> dict[str, int]:
    """The integers a rule's statement is built with, and its threshold as recorded."""
    values = {"w": rule.window * 1000}
    if name in ("caller_frequency", "tenant_frequency", "customer_frequency"):
        values.update(lag=rule.calls - 1, threshold=rule.calls)
    elif name == "ultra_short":
        values.update(talk_ms=round(rule.talk_seconds * 1000), share_ppm=round(rule.share * 1_000_000),
                      min_calls=rule.min_calls)
    elif name == "declined_repeat":
        values.update(repeats=rule.repeats, threshold=rule.repeats)
    elif name == "off_hours":  # start/end filled in from the tenant's hours by the job
        values.update(start=clock_minute(rule.start), end=clock_minute(rule.end), attempts=rule.attempts,
                      threshold=rule.attempts)
    elif name == "blast":
        values.update(customers=rule.customers, threshold=rule.customers)
    return {k: int(v) for k, v in values.items()}


def finding_insert(name: str, kind: str, rule: Rule, tenant_ids: list[int], sql: Sql, incremental: bool,
                   profile: str | None = None) -> str:
    """The INSERT ... SELECT of one rule for tenants sharing the same settings; with
    `profile` (per-customer rules), only for bindings carrying that protection profile."""
    spec = RULE_SQL[name]
    values = constants(name, rule)
    start, end = values.get("start", 0), values.get("end", 0)
    # Calling hours [start, end) may run past midnight (start > end); start = end is all day.
    outside = (f"minute < {start} OR minute >= {end}" if start < end
               else f"minute < {start} AND minute >= {end}" if start > end else "1 = 0")
    fill = dict(values, partition=PARTITION[kind], first_ms=sql.ms("m.first_at"), outside=outside,
                end_ms=sql.ms("COALESCE(c.ended_at, c.started_at)"), start_ms=sql.ms("c.started_at"))
    subject = SUBJECT[kind]
    # After the first pass only subjects with new CDRs can have new findings.
    touched = (f"AND {subject} IN (SELECT {subject} FROM cdrs c WHERE c.id > :lo AND c.id <= :hi)"
               if incremental else "")
    if profile is not None:  # one of config.PROFILES, never user text
        touched += f" AND c.binding_id IN (SELECT b.id FROM bindings b WHERE b.profile = '{profile}')"
    tenants = ", ".join(str(int(t)) for t in tenant_ids)
    # INSERT first, then WITH: SQLite reports the rows inserted only for statements so begun.
    return f"""
INSERT INTO anomaly_findings (rule, tenant_id, subject_kind, subject, binding_id, period, window_start,
                              window_end, calls, measure, threshold, severity, action, evidence)
WITH scoped AS NOT MATERIALIZED (
    SELECT c.id, c.tenant_id, {subject} AS subject, c.started_at, {sql.ms('c.started_at')} AS t
           {spec.columns.format(**fill)}
    FROM cdrs c
    WHERE c.tenant_id IN ({tenants}) AND c.started_at >= :scan_from AND c.started_at < :scan_to
      AND {spec.where} {touched}
),{spec.body.format(**fill)},
ranked AS (
    SELECT e.*, ROW_NUMBER() OVER (PARTITION BY e.tenant_id, e.subject, e.period_ms ORDER BY e.id) AS rn
    FROM evidence e
),
summary AS (
    SELECT tenant_id, subject, period_ms, MIN(started_at) AS window_start, MAX(started_at) AS window_end,
           COUNT(*) AS calls, '[' || {sql.id_list('CASE WHEN rn <= :evidence_limit THEN id END')} || ']' AS evidence
    FROM ranked GROUP BY tenant_id, subject, period_ms
)
SELECT :rule, h.tenant_id, :kind, CAST(h.subject AS VARCHAR(64)), {"h.subject" if kind == "binding" else "NULL"},
       h.period_ms / 1000, m.window_start, m.window_end, m.calls, {"m.calls" if spec.sliding else "h.measure"},
       :threshold, :severity, :action, m.evidence
FROM hits h
JOIN summary m ON m.tenant_id = h.tenant_id AND m.subject = h.subject AND m.period_ms = h.period_ms
WHERE true
ON CONFLICT (rule, tenant_id, subject, period) DO NOTHING
"""
