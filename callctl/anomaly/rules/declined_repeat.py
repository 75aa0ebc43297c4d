"""The tenant calls again right after the customer declined."""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from callctl.anomaly.base import Rule, RuleSql, register
from callctl.core.enums import SubjectKind


@register("declined_repeat")
class DeclinedRepeat(Rule):
    """The tenant calls a customer again within `window` seconds after the customer
    declined (dial status in `statuses` or hangup cause in `causes`), `repeats` times
    or more in a period of `window` seconds."""
    subject_kind: ClassVar[SubjectKind] = SubjectKind.BINDING
    tenant_wide: ClassVar[tuple[str, ...]] = ("statuses", "causes")
    window: int = Field(600, ge=1, le=31 * 86400)
    repeats: int = Field(1, ge=1)
    statuses: list[str] = ["BUSY"]
    causes: list[int] = [17, 21]  # user busy, call rejected

    sql: ClassVar[RuleSql] = RuleSql(
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
    )

    def constants(self) -> dict[str, int]:
        return {"repeats": self.repeats, "threshold": self.repeats}
