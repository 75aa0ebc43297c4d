"""One agent reaches many customers in a short time."""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from callctl.anomaly.base import Rule, RuleSql, register
from callctl.core.enums import SubjectKind


@register("blast")
class Blast(Rule):
    """One agent (caller) reaches `customers` distinct bindings or more in a period of
    `window` seconds."""
    subject_kind: ClassVar[SubjectKind] = SubjectKind.CALLER
    window: int = Field(600, ge=1, le=31 * 86400)
    customers: int = Field(30, ge=2)

    sql: ClassVar[RuleSql] = RuleSql(
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
    )

    def constants(self) -> dict[str, int]:
        return {"customers": self.customers, "threshold": self.customers}
