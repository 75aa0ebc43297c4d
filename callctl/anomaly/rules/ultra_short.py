"""Most of a customer's answered calls are cut within seconds."""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from callctl.anomaly.base import Rule, RuleSql, register
from callctl.core.enums import SubjectKind


@register("ultra_short")
class UltraShort(Rule):
    """Of one binding's answered calls in a period of `window` seconds, a share of at
    least `share` lasted under `talk_seconds`, and at least `min_calls` of them."""
    subject_kind: ClassVar[SubjectKind] = SubjectKind.BINDING
    talk_seconds: float = Field(3.0, gt=0)
    share: float = Field(0.8, gt=0, le=1)
    min_calls: int = Field(5, ge=1)

    sql: ClassVar[RuleSql] = RuleSql(
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
    )

    def constants(self) -> dict[str, int]:
        return {"talk_ms": round(self.talk_seconds * 1000), "share_ppm": round(self.share * 1_000_000),
                "min_calls": self.min_calls}

    @property
    def threshold(self) -> float:
        return self.share
