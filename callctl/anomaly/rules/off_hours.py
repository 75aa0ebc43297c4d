"""A tenant calls customers outside its calling hours (the tenant's local time)."""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator, model_validator

from callctl.anomaly.base import Rule, RuleSql, register
from callctl.core.enums import SubjectKind


def clock_minute(value: str) -> int | None:
    """'HH:MM' as minutes after midnight (24:00 is 1440), or None if it is not one."""
    hours, sep, minutes = value.partition(":")
    if not (sep and len(hours) == 2 and len(minutes) == 2 and hours.isdigit() and minutes.isdigit()):
        return None
    minute = int(hours) * 60 + int(minutes)
    return minute if int(minutes) < 60 and minute <= 1440 else None


@register("off_hours")
class OffHours(Rule):
    """A tenant places `attempts` calls or more to customers outside its calling hours
    (local time in the tenant's time zone) within one local day. The hours are the
    tenant's own (tenants.calls_from / calls_until) unless `start`/`end` are set here."""
    subject_kind: ClassVar[SubjectKind] = SubjectKind.TENANT
    local_time: ClassVar[bool] = True
    window: int = Field(86400, ge=86400, le=86400)  # one local day, fixed
    start: str | None = None  # calling hours [start, end), local time; start > end crosses midnight
    end: str | None = None
    attempts: int = Field(1, ge=1)

    sql: ClassVar[RuleSql] = RuleSql(
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
    )

    @field_validator("start", "end")
    @classmethod
    def _clock(cls, value: str | None) -> str | None:
        if value is not None and clock_minute(value) is None:
            raise ValueError("must be HH:MM, e.g. 08:00")
        return value

    @model_validator(mode="after")
    def _both(self):
        if (self.start is None) != (self.end is None):
            raise ValueError("give both start and end, or neither (the tenant's calling hours)")
        return self

    def for_tenant(self, calls_from: str, calls_until: str) -> "OffHours":
        return self if self.start is not None else self.model_copy(update={"start": calls_from, "end": calls_until})

    def constants(self) -> dict[str, int]:
        return {"start": clock_minute(self.start), "end": clock_minute(self.end), "attempts": self.attempts,
                "threshold": self.attempts}

    def fragments(self) -> dict[str, str]:
        start, end = clock_minute(self.start), clock_minute(self.end)
        # Calling hours [start, end) may run past midnight (start > end); start = end is all day.
        return {"outside": (f"minute < {start} OR minute >= {end}" if start < end
                            else f"minute < {start} AND minute >= {end}" if start > end else "1 = 0")}
