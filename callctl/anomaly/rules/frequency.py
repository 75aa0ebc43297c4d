"""Too many calls from one subject within a sliding window: caller, tenant, customer."""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from callctl.anomaly.base import Rule, RuleSql, register
from callctl.core.enums import SubjectKind

# The call `calls - 1` before this one (LAG) started less than `window` earlier.
SLIDING = """
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


class Frequency(Rule):
    calls: int

    def constants(self) -> dict[str, int]:
        return {"lag": self.calls - 1, "threshold": self.calls}


@register("caller_frequency")
class CallerFrequency(Frequency):
    """One caller number places `calls` calls or more within `window` seconds."""
    subject_kind: ClassVar[SubjectKind] = SubjectKind.CALLER
    sql: ClassVar[RuleSql] = RuleSql("c.caller_hash IS NOT NULL", "", SLIDING, sliding=True)
    calls: int = Field(60, ge=2)


@register("tenant_frequency")
class TenantFrequency(Frequency):
    """One tenant places `calls` calls or more within `window` seconds (to customers)."""
    subject_kind: ClassVar[SubjectKind] = SubjectKind.TENANT
    sql: ClassVar[RuleSql] = RuleSql("c.direction = 'to_customer'", "", SLIDING, sliding=True)
    calls: int = Field(5000, ge=2)


@register("customer_frequency")
class CustomerFrequency(Frequency):
    """One customer (binding) is called `calls` times or more within `window` (a day)."""
    subject_kind: ClassVar[SubjectKind] = SubjectKind.BINDING
    sql: ClassVar[RuleSql] = RuleSql("c.direction = 'to_customer' AND c.binding_id IS NOT NULL", "", SLIDING,
                                     sliding=True)
    window: int = Field(86400, ge=1, le=31 * 86400)
    calls: int = Field(10, ge=2)
