"""The regulator's live feed (callctl/feed.py) on SQLite and PostgreSQL: every kind of
contact-behaviour event, in order, paged; read exactly once across pages while writers
commit concurrently (and out of id order on PostgreSQL); a reader that stops and resumes
from any cursor misses nothing; bad cursors are clear errors; never a real number."""
from __future__ import annotations

import itertools
import json
import tempfile
import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import insert, select

from callctl import feed
from callctl.core.numbers import mask
from callctl.service import CallService
from callctl.store import bindings, blacklist, blocks, customers, pool, reveal, tenants
from callctl.store.crypto import number_hash
from callctl.store.models import AuditEntry, Block, Cdr
from callctl.errors import ProvisionError
from callctl.store.spool import CdrSpool
from tests import leaks, realnumbers
from tests.agicalls import agi_call

AGENT = realnumbers.tenant_line("+8613900018001")
HOTLINE = realnumbers.tenant_line("+861058018001")
CUSTOMERS = realnumbers.person("+8613800018001", "+8613800018002")
X = ["+8617100018001", "+8617100018002"]
_ids = itertools.count(1)


@pytest.fixture
def acme(engine):
    tenants.add_tenant(engine, "acme", HOTLINE, callers=[AGENT], hours="00:00-24:00")
    pool.add_numbers(engine, "acme", X)
    return [bindings.bind(engine, "acme", c) for c in CUSTOMERS]


def call(engine, x: str, caller: str = AGENT, reason: str = "", purpose: str = "claims") -> None:
    start = datetime.now(timezone.utc).timestamp()
    CallService(engine, CdrSpool(tempfile.mkdtemp(prefix="callctl-feed-spool-"))).record(agi_call(
        f"feed-{next(_ids)}", called=x, caller=caller, action="reject" if reason else "bridge", reason=reason,
        tenant="1", direction="to_customer", purpose=purpose, start=f"{start:.3f}", end=f"{start + 5:.3f}",
        destination="" if reason else CUSTOMERS[0], dial_status="" if reason else "ANSWER"))


def settled(engine) -> None:
    """PostgreSQL: wait until every transaction begun before now has ended, anywhere on
    the cluster (other sessions' open transactions hold the feed back: its documented
    lag). A wait for a condition, not a timed assertion."""
    if engine.dialect.name != "postgresql":
        return
    import time

    with engine.begin() as conn:
        mine = conn.exec_driver_sql("SELECT pg_current_xact_id()::text::bigint").scalar()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if conn.exec_driver_sql("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint").scalar() > mine:
                return
        time.sleep(0.05)
    raise AssertionError("a transaction on the server stayed open for 5 minutes")


def read_all(engine, after=None, limit=3) -> tuple[list[dict], str]:
    settled(engine)
    events = []
    while True:
        got = feed.page(engine, after, limit)
        events += got["events"]
        leaks.record("feed", "page", json.dumps(got))
        if got["next"] == after or not got["events"]:
            return events, got["next"]
        after = got["next"]


def test_every_kind_of_event_once_in_order_and_no_number(engine, acme):
    call(engine, X[0])
    call(engine, X[0], reason="blocked")
    block = blocks.add_block(engine, scope="binding", binding_id=acme[0]["id"], direction="to_customer",
                             reason="complaint", created_by="ops")
    suspension = blocks.add_block(engine, scope="tenant", tenant="acme", direction="to_customer",
                                  reason="suspended", created_by="regulator")
    blocks.lift_block(engine, block["id"], "ops")
    blocks.lift_block(engine, suspension["id"], "regulator")
    grant = reveal.request(engine, acme[0]["id"], "a", "claim", "CLM-1", "alice")
    reveal.approve(engine, grant["id"], "bob")
    reveal.use(engine, grant["id"], "alice")
    with engine.begin() as conn:
        cdr_ids = list(conn.scalars(select(Cdr.id)))
        conn.exec_driver_sql(
            "INSERT INTO anomaly_findings (rule, tenant_id, subject_kind, subject, period, window_start, window_end,"
            " calls, measure, threshold, severity, action, evidence) VALUES ('caller_frequency', 1, 'caller',"
            f" '{number_hash(AGENT)}', 1, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 2, 2, 2, 'low', 'alert', '[1, 2]')")
    entry = blacklist.propose(engine, caller=AGENT, reason="harassment", proposed_by="a", cdrs=cdr_ids)
    blacklist.approve(engine, entry["id"], "b")
    blacklist.approve(engine, entry["id"], "c")
    blacklist.lift(engine, entry["id"], "d")
    customers.set_preference(engine, "acme", CUSTOMERS[1], actor="support:li", calls="none")
    events, cursor = read_all(engine, limit=3)
    kinds = [(e["type"], e.get("action") or e.get("decision")) for e in events]
    assert sorted(kinds, key=str) == sorted([
        ("call", "bridged"), ("call", "rejected"), ("block", None), ("suspension", None),
        ("block_lifted", "block_lifted"), ("suspension_lifted", "block_lifted"), ("finding", "alert"),
        ("reveal", "reveal_requested"), ("reveal", "reveal_approved"), ("reveal", "reveal_used"),
        ("blacklist", "blacklist_proposed"), ("blacklist", "blacklist_approved"),
        ("blacklist", "blacklist_in_force"), ("blacklist", "blacklist_lifted"), ("opt_out", "preference_set")],
        key=str)
    # Each source in its own order; the audit's events in the order they happened.
    audit = [e["action"] for e in events if "audit_id" in e]
    assert audit == ["block_lifted", "block_lifted", "reveal_requested", "reveal_approved", "reveal_used",
                     "blacklist_proposed", "blacklist_approved", "blacklist_in_force", "blacklist_lifted",
                     "preference_set"]
    opt_out = next(e for e in events if e["type"] == "opt_out")
    assert (opt_out["tenant"], opt_out["customer"], opt_out["calls"]) == ("acme", mask(CUSTOMERS[1]), "none")
    rejected = next(e for e in events if e["type"] == "call" and e["decision"] == "rejected")
    assert (rejected["tenant"], rejected["reason"], rejected["caller"], rejected["x"]) == ("acme", "blocked",
                                                                                         mask(AGENT), X[0])
    assert rejected["purpose"] == "claims"  # why the agent called, as the PBX reported the decision
    used = next(e for e in events if e.get("action") == "reveal_used")
    assert (used["scenario"], used["case_reference"], used["by"], used["tenant"]) == ("claim", "CLM-1", "alice", "acme")
    text = json.dumps(events)
    for number in (AGENT, HOTLINE, *CUSTOMERS):
        assert number[3:] not in text
    # Nothing new: the same cursor comes back, with nothing.
    assert feed.page(engine, cursor) == {"events": [], "next": cursor, "more": False}
    # Resuming from any event's cursor gives exactly the events after it.
    for n in (0, 4, len(events) - 1):
        rest, _ = read_all(engine, events[n]["cursor"], limit=5)
        assert rest == events[n + 1:]


def test_bad_cursor_and_limit_are_clear_errors(engine):
    for cursor in ("garbage", "1-c1.2-b3", "1-c1.2-b3.4-f5.6-a7; DROP TABLE cdrs"):
        with pytest.raises(ProvisionError) as bad:
            feed.page(engine, cursor)
        assert bad.value.code == "invalid_cursor"
    with pytest.raises(ProvisionError) as bad:
        feed.page(engine, None, limit=0)
    assert bad.value.code == "invalid_limit"


def test_concurrent_writers_each_event_read_exactly_once(engine, acme):
    """Writers commit CDRs, blocks and audited reveals from several threads while a
    reader pages; then the reader drains. Every committed event is read once."""
    writers, per_writer = 4, 15
    done = threading.Event()

    def write(n: int) -> None:
        for i in range(per_writer):
            if i % 5 == 4:
                grant = reveal.request(engine, acme[n % 2]["id"], "a", "complaint", f"C-{n}-{i}", f"w{n}")
                reveal.approve(engine, grant["id"], f"v{n}")
            elif i % 5 == 3:
                blocks.add_block(engine, scope="number", number=X[n % 2], direction="from_customer",
                                 reason=f"writer {n}", created_by=f"w{n}", duration_seconds=60)
            else:
                call(engine, X[n % 2])

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    seen, cursor = [], None
    while not done.is_set():
        got = feed.page(engine, cursor, limit=4)
        seen += got["events"]
        cursor = got["next"]
        if not any(t.is_alive() for t in threads):
            done.set()
    for thread in threads:
        thread.join()
    rest, _ = read_all(engine, cursor, limit=4)
    seen += rest
    keys = [(e["type"], e.get("cdr_id") or e.get("block_id") or e.get("audit_id")) for e in seen]
    assert len(keys) == len(set(keys))  # none repeated
    with engine.connect() as conn:
        cdrs = set(conn.scalars(select(Cdr.id)))
        placed = set(conn.scalars(select(Block.id)))
        audited = set(conn.scalars(select(AuditEntry.id)))
    assert {k for t, k in keys if t == "call"} == cdrs and len(cdrs) == writers * per_writer * 3 // 5
    assert {k for t, k in keys if t == "block"} == placed and len(placed) == writers * per_writer // 5
    assert {k for t, k in keys if t == "reveal"} == audited and len(audited) == 2 * writers * per_writer // 5


def test_a_row_committed_late_below_the_cursor_is_not_skipped(engine, acme):
    """PostgreSQL: transaction A takes a CDR id and stays open; B takes a higher id and
    commits. The feed holds B back until A ends, then hands out both, each once. (SQLite
    lets one writer at a time commit: B waits for A, ids follow commits.)"""
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite commits one writer at a time: ids are in commit order")
    row = lambda: {"call_id": f"late-{next(_ids)}", "tenant_id": 1, "decision": "bridged",
                   "started_at": datetime.now(timezone.utc), "direction": "to_customer"}
    _, cursor = read_all(engine)
    slow = engine.connect()
    slow_tx = slow.begin()
    slow_id = slow.execute(insert(Cdr).values(**row()).returning(Cdr.id)).scalar_one()
    with engine.begin() as conn:
        fast_id = conn.execute(insert(Cdr).values(**row()).returning(Cdr.id)).scalar_one()
    assert fast_id > slow_id
    held = feed.page(engine, cursor)
    assert held["events"] == [] and held["next"] == cursor  # B waits behind A
    slow_tx.commit()
    slow.close()
    events, _ = read_all(engine, cursor)
    assert [e["cdr_id"] for e in events] == [slow_id, fast_id]


def test_cli_feed_writes_json_lines_resumes_and_follows(engine, acme, tmp_path):
    """`callctl regulator feed`: JSON lines; --cursor-file resumes where the last run
    stopped; --follow prints new events as they come and stops on SIGTERM."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from tests.test_cli import run

    env = {"PATH": "/usr/bin:/bin", "CALLCTL_DATABASE_URL": engine.url.render_as_string(hide_password=False)}
    state = tmp_path / "feed.cursor"
    call(engine, X[0])
    call(engine, X[1], reason="blocked")
    settled(engine)
    first = run("regulator", "feed", "--cursor-file", str(state), env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    lines = [json.loads(line) for line in first.stdout.splitlines()]
    assert [e["type"] for e in lines] == ["call", "call"] and state.read_text().strip() == lines[-1]["cursor"]
    assert run("regulator", "feed", "--cursor-file", str(state), env=env, cwd=tmp_path).stdout == ""
    bad = run("regulator", "feed", "--after", "nonsense", env=env, cwd=tmp_path)
    assert bad.returncode == 1 and "invalid_cursor" in bad.stderr and "Traceback" not in bad.stderr
    follow = subprocess.Popen(
        [str(Path(sys.executable).with_name("callctl")), "regulator", "feed", "--follow", "--interval", "0.2",
         "--cursor-file", str(state)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**env, "CALLCTL_KEYS": os.environ["CALLCTL_KEYS"]}, cwd=tmp_path)
    try:
        blocks.add_block(engine, scope="tenant", tenant="acme", direction="both", reason="suspended",
                         created_by="regulator")
        settled(engine)
        line = json.loads(follow.stdout.readline())  # blocks until the event arrives
        assert (line["type"], line["tenant"], line["by"]) == ("suspension", "acme", "regulator")
    finally:
        follow.send_signal(signal.SIGTERM)
        out, err = follow.communicate(timeout=60)
    leaks.record("feed", "follow", out + err)
    assert follow.returncode == 0 and out == "", err
