"""A new anomaly rule is one unit (callctl/anomaly/rules/): its settings, its SQL and its
constants in one class registered by name. Registered here from the test alone, the job
runs it beside the built-in rules, records its findings and places its blocks, and the
next call is refused (SQLite and PostgreSQL)."""
from __future__ import annotations

from datetime import timedelta
from typing import ClassVar

import pytest
from pydantic import Field

from callctl.anomaly.base import RULES, Rule, RuleSql, register
from callctl.anomaly.config import AnomalyConfig
from callctl.anomaly.job import list_findings, run_pass
from callctl.core.decision import Reason, Reject
from callctl.service import CallService
from callctl.store.blocks import list_blocks
from callctl.store.spool import CdrSpool
from tests.test_anomaly import AGENT, LATER, T0, add, span, world  # noqa: F401  (world: a fixture)


@pytest.fixture
def long_ring():
    """A rule that is in no file of callctl/: a customer whose calls ring `seconds` or
    longer `calls` times in a period of `window` seconds (nobody picks up: stop calling)."""

    @register("long_ring")
    class LongRing(Rule):
        subject_kind: ClassVar[str] = "binding"
        calls: int = Field(3, ge=1)
        seconds: int = Field(40, ge=1)
        sql: ClassVar[RuleSql] = RuleSql(
            where="c.direction = 'to_customer' AND c.binding_id IS NOT NULL",
            columns=", CASE WHEN c.ring_seconds >= {seconds} THEN 1 ELSE 0 END AS long_ring",
            body="""
hits AS (
    SELECT tenant_id, subject, (t / {w}) * {w} AS period_ms, SUM(long_ring) AS measure
    FROM scoped GROUP BY tenant_id, subject, (t / {w}) * {w} HAVING SUM(long_ring) >= {calls}
),
evidence AS (
    SELECT h.tenant_id, h.subject, h.period_ms, s.id, s.started_at
    FROM hits h JOIN scoped s
      ON s.tenant_id = h.tenant_id AND s.subject = h.subject AND (s.t / {w}) * {w} = h.period_ms
    WHERE s.long_ring = 1
)""")

        def constants(self) -> dict[str, int]:
            return {"calls": self.calls, "seconds": self.seconds, "threshold": self.calls}

    yield LongRing
    del RULES["long_ring"]


def test_a_rule_registered_by_its_unit_alone_finds_and_blocks(engine, world, long_ring, tmp_path):
    acme, binding, x = world["acme"]
    others = {name: {"enabled": False} for name in RULES if name != "long_ring"}
    config = AnomalyConfig.model_validate({"rules": {**others, "long_ring": {
        "calls": 3, "seconds": 40, "window": 3600, "action": "block",
        "block": {"direction": "to_customer", "seconds": 86400 * 365}}}})
    rang = add(engine, *span(acme, 3, 600, binding_id=binding, ring_seconds=45))
    add(engine, *span(acme, 5, 600, start=T0 + timedelta(minutes=20), binding_id=binding, ring_seconds=10))

    result = run_pass(engine, config, now=LATER)

    assert result.findings["long_ring"] == 1 and result.blocks == 1
    found = list_findings(engine, rule="long_ring")
    assert [(f["subject_kind"], f["subject"], f["calls"], f["threshold"], f["action"]) for f in found] == [
        ("binding", str(binding), 3, 3, "block")]
    assert found[0]["evidence"] == rang and found[0]["block_id"]
    block = list_blocks(engine, binding_id=binding)
    assert [(b["scope"], b["direction"], b["created_by"]) for b in block] == [
        ("binding", "to_customer", "anomaly:long_ring")]
    # The block is a block like any other: the agent's next call to the customer is refused.
    service = CallService(engine, CdrSpool(tmp_path / "spool"))
    decision = service.route(x, AGENT, now=LATER + timedelta(seconds=1))[1]  # 10:00 in Shanghai
    assert isinstance(decision, Reject) and decision.reason == Reason.BLOCKED
