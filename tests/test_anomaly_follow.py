"""The anomaly job while CDRs keep arriving: a pass after new CDRs reads only what they
touch (on PostgreSQL, only the day partitions of its scan range, not every day's), and
--follow blocks a customer in the pass after the crossing call's CDR committed."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import event, select

from callctl.anomaly.config import AnomalyConfig, load
from callctl.anomaly.job import follow, run_pass
from callctl.store.models import Block
from callctl.store.partitions import ensure_cdr_partitions, partition_name
from tests.test_anomaly import add, cdr, rules, span, world  # noqa: F401 (world: a fixture)

OLD = datetime(2026, 9, 1, 10, 0, tzinfo=timezone.utc)
NEW = OLD + timedelta(days=40)


def relations(plan) -> set[str]:
    """Every table a plan (EXPLAIN FORMAT JSON) reads."""
    found = set()
    if isinstance(plan, dict):
        if "Relation Name" in plan:
            found.add(plan["Relation Name"])
        for value in plan.values():
            found |= relations(value)
    elif isinstance(plan, list):
        for value in plan:
            found |= relations(value)
    return found


def test_a_pass_after_new_cdrs_reads_only_the_partitions_of_their_scan_range(engine, world):
    """Before, the new CDRs' subjects were found by id alone, in every day partition, once
    per CDR of the scan range (1.5 s a rule beside 41 days of history at 1,000 CDRs/s)."""
    if engine.dialect.name != "postgresql":
        pytest.skip("day partitions are PostgreSQL's")
    for day in (OLD, NEW):
        ensure_cdr_partitions(engine, days_ahead=2, today=day.date())
    acme, binding, _ = world["acme"]
    config = rules("customer_frequency", calls=3, action="block")
    add(engine, *span(acme, 2, 60, start=OLD, binding_id=binding))
    add(engine, *span(acme, 2, 60, start=NEW, binding_id=binding))
    assert run_pass(engine, config, now=NEW + timedelta(hours=1)).new_findings == 0
    add(engine, cdr(acme, NEW + timedelta(minutes=5), binding_id=binding))  # the third call of the day

    plans: list[set[str]] = []

    def explain(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().startswith("INSERT INTO anomaly_findings"):
            cursor.execute("EXPLAIN (FORMAT JSON) " + statement, parameters)
            plans.append(relations(cursor.fetchone()[0]))

    event.listen(engine, "before_cursor_execute", explain)
    try:
        second = run_pass(engine, config, now=NEW + timedelta(hours=2))
    finally:
        event.remove(engine, "before_cursor_execute", explain)
    assert (second.cdrs, second.new_findings, second.blocks) == (1, 1, 1)
    read = set().union(*plans)
    assert partition_name(NEW.date()) in read
    assert not {partition_name(OLD.date() + timedelta(days=d)) for d in range(3)} & read


def test_follow_blocks_the_customer_in_the_pass_after_the_crossing_cdr(engine, world):
    acme, binding, _ = world["acme"]
    config = rules("customer_frequency", calls=3, action="block")
    start = datetime.now(timezone.utc) - timedelta(minutes=10)
    add(engine, *span(acme, 2, 60, start=start, binding_id=binding))
    stop = threading.Event()
    seen = []

    def on_pass(result):
        seen.append(result)
        if len(seen) == 1:  # the crossing call's CDR commits between two passes
            add(engine, cdr(acme, start + timedelta(minutes=5), binding_id=binding))
        elif len(seen) == 2:
            stop.set()

    assert follow(engine, config, stop, interval=0.01, on_pass=on_pass) == 2
    assert (seen[0].new_findings, seen[0].blocks) == (0, 0)
    assert (seen[1].cdrs, seen[1].new_findings, seen[1].blocks) == (1, 1, 1)
    with engine.connect() as conn:
        assert conn.execute(select(Block.binding_id, Block.created_by)).all() == [(binding, "anomaly:customer_frequency")]


def test_the_follow_interval_is_short_enough_to_block_within_seconds():
    """At 1,000 CDRs/s a pass takes well under a second; the pause between passes is then
    most of the time from a crossing call to its block (bench/detection_bench.py)."""
    assert AnomalyConfig().interval_seconds <= 2
    assert load("conf/anomaly.yaml").interval_seconds <= 2
