"""What an anomaly rule is: its settings (thresholds, read from conf/anomaly.yaml), its
SQL and the integers the SQL is built with, together in one class. A rule is one module
under callctl/anomaly/rules/ whose class is decorated with @register("name")
(docs/architecture.md: where to add an anomaly rule)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from callctl.core.enums import BlockDirection, FindingAction, Severity, SubjectKind

RULES: dict[str, type["Rule"]] = {}  # name -> rule class, in the order the rules run


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BlockAction(Strict):
    direction: BlockDirection = BlockDirection.TO_CUSTOMER
    seconds: int = Field(86400, ge=60)  # how long the automatic block lasts


@dataclass(frozen=True)
class RuleSql:
    where: str  # which CDRs the rule reads
    columns: str  # more columns of scoped
    body: str  # CTEs defining hits(tenant_id, subject, period_ms, measure) and evidence
    sliding: bool = False  # a sliding window: the measure is the calls in the window


class Rule(Strict):
    enabled: bool = True
    severity: Severity = Severity.MEDIUM
    action: FindingAction = FindingAction.ALERT
    block: BlockAction = BlockAction()
    window: int = Field(3600, ge=1, le=31 * 86400)  # seconds

    subject_kind: ClassVar[SubjectKind] = SubjectKind.TENANT  # what the rule counts per
    sql: ClassVar[RuleSql]
    tenant_wide: ClassVar[tuple[str, ...]] = ()  # settings read once for all tenants (bound as lists)
    local_time: ClassVar[bool] = False  # reads the tenant's local clock: scans split by zone and offset

    @model_validator(mode="after")
    def _blockable(self):
        if self.action == FindingAction.BLOCK and self.subject_kind == SubjectKind.CALLER:
            raise ValueError(
                "action 'block' needs a binding or tenant subject; this rule counts per caller "
                "(a hash, never the number), so it can only alert"
            )
        return self

    def constants(self) -> dict[str, int]:
        """The integers the statement is built with besides `w` (the window in ms), and
        `threshold`, the number recorded in a finding."""
        return {}

    def fragments(self) -> dict[str, str]:
        """SQL fragments the statement is built with, made from validated settings only."""
        return {}

    @property
    def threshold(self) -> float:
        return float(self.constants()["threshold"])

    def for_tenant(self, calls_from: str, calls_until: str) -> "Rule":
        """The settings for one tenant whose calling hours are these (most rules ignore them)."""
        return self


def register(name: str):
    """Class decorator: the rule runs in every pass under this name (conf key, finding's rule)."""

    def add(cls: type[Rule]) -> type[Rule]:
        if name in RULES and RULES[name] is not cls:
            raise ValueError(f"anomaly rule {name} is registered already")
        RULES[name] = cls
        return cls

    return add
