"""Fault test: PostgreSQL stopped under SIPp load through the real Asterisk.

SIPp carrier -> Asterisk 22 (product dialplan) -> `callctl serve asterisk` on a private
PostgreSQL cluster this test starts and stops -> SIPp phone. Mid-load the database is
stopped for a while, then started again. Afterwards:
- every call SIPp placed has exactly one CDR (none missing, none twice), spooled ones
  replayed once; counts match by outcome: answered calls = bridged CDRs (ANSWER),
  503s = rejected CDRs with reason 'unavailable', nothing else on either side;
- calls placed while the database was down were rejected 503, and the phone (which fails
  any call that is not for the bound customer, presenting X) saw only the answered ones;
- calls placed after the database came back are bridged again, with no restart.
"""
from __future__ import annotations

import re
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import text

from lab import sipp
from callctl.store import bindings, pool, tenants
from callctl.store.db import make_engine, upgrade
from lab import harness
from tests.pg import PgCluster

pytestmark = pytest.mark.lab

AGENT, CUSTOMER, HOTLINE = "+8613900000021", "+8613800000021", "+861058000021"
POOL = ["+8617100000031"]
RATE, CALLS, TALK_MS = 8.0, 200, 300  # 25 s of calls
BEFORE_S, OUTAGE_S = 6.0, 10.0

_BLOCK = re.compile(r"^-{10,} (\d{4}-\d\d-\d\d)\s+(\d\d:\d\d:\d\d\.\d+)\s*$", re.M)
ALL_DAY = "00:00-24:00"  # calling hours must not make these tests depend on the time of day


def invites_and_finals(workdir: Path) -> dict[str, tuple[datetime, int | None]]:
    """Per SIP Call-ID from SIPp's message trace (-trace_msg): when the first INVITE was
    sent and the final response code it got (None: none)."""
    calls: dict[str, list] = {}
    for log in workdir.glob("*_messages.log"):
        content = log.read_text(errors="replace")
        marks = list(_BLOCK.finditer(content))
        for mark, following in zip(marks, marks[1:] + [None]):
            block = content[mark.end(): following.start() if following else len(content)]
            when = datetime.fromisoformat(f"{mark.group(1)} {mark.group(2)}")
            call_id = re.search(r"^Call-ID:\s*(\S+)", block, re.M | re.I)
            cseq = re.search(r"^CSeq:\s*\d+\s+(\w+)", block, re.M | re.I)
            if not call_id or not cseq or cseq.group(1).upper() != "INVITE":
                continue
            entry = calls.setdefault(call_id.group(1), [None, None])
            status = re.search(r"^SIP/2\.0 (\d{3})", block, re.M)
            if "message sent" in block[:200] and block.lstrip().split("\n", 2)[-1].lstrip().startswith("INVITE"):
                entry[0] = entry[0] or when
            elif "message received" in block[:200] and status and int(status.group(1)) >= 200:
                entry[1] = int(status.group(1))
    return {k: (v[0], v[1]) for k, v in calls.items()}


@pytest.fixture
def cluster():
    pg = PgCluster()
    pg.start()
    yield pg
    pg.destroy()


def test_postgresql_outage_under_load_loses_no_cdr_and_misroutes_nothing(lab_up, cluster, tmp_path):
    url = "postgresql+psycopg2://" + cluster.dsn.split("://", 1)[1]
    engine = make_engine(url)
    upgrade(engine)
    tenants.add_tenant(engine, "acme", HOTLINE, callers=[AGENT], hours=ALL_DAY)
    pool.add_numbers(engine, "acme", POOL)
    x = bindings.bind(engine, "acme", CUSTOMER)["x"]
    daemon = harness.callctl_daemon(url, tmp_path, extra_env={"CALLCTL_DB_TIMEOUT": "1"})
    daemon.start()
    phone = sipp.start_uas(harness.PHONE_PORT, expect_ruri=CUSTOMER, expect_from=x,
                           forbidden=[AGENT.removeprefix("+86")])
    carrier_dir = tmp_path / "carrier"
    try:
        carrier = sipp.start(
            "uac_call", remote=harness.SIP_TARGET, calls=[(AGENT, x, f"P-Asserted-Identity: <sip:{AGENT}@127.0.0.1>")],
            max_calls=CALLS, rate=RATE, limit=100, variables={"talk_ms": TALK_MS},
            extra_args=["-trace_msg"], workdir=carrier_dir,
        )
        time.sleep(BEFORE_S)
        stop_began = datetime.now()
        cluster.stop()
        down_from = datetime.now()
        time.sleep(OUTAGE_S)
        down_until = datetime.now()
        cluster.start()
        up_from = datetime.now()
        result = carrier.wait(timeout=CALLS / RATE + 60)
        harness.wait_no_channels(30)
    finally:
        far = phone.stop()
        daemon.stop()
    outage_s = (up_from - stop_began).total_seconds()

    # SIPp's side: every call got a final answer, 200 or 503, and nothing else.
    calls = invites_and_finals(carrier_dir)
    finals = Counter(code for _, code in calls.values())
    assert result.created == CALLS == len(calls)
    assert set(finals) <= {200, 503}, finals
    answered, unavailable = finals[200], finals[503]
    assert result.successful == answered and result.failed == unavailable
    during = [code for sent, code in calls.values() if down_from < sent < down_until]
    after = [code for sent, code in calls.values() if (sent - up_from).total_seconds() > 3]
    assert during and set(during) == {503}, Counter(during)  # fail closed while down
    assert after and set(after) == {200}, Counter(after)  # recovered on its own
    # The phone saw the answered calls and nothing else: no call to a wrong number.
    assert far.successful == answered and far.failed == 0 and "check failed" not in far.log

    # The CDRs: spool replayed (the daemon was stopped with its spool possibly pending:
    # run it again until the spool is empty), then one CDR per call, counted by outcome.
    spool = tmp_path / "spool"
    daemon.start()
    deadline = time.monotonic() + 30
    while (spool / "cdrs.jsonl").exists() or (spool / "cdrs.replaying.jsonl").exists():
        assert time.monotonic() < deadline, "spool not replayed"
        time.sleep(0.2)
    daemon.stop()
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT call_id, decision, reject_reason, dial_status FROM cdrs")).all()
    engine.dispose()
    spooled = sum(1 for e in harness.json_events(daemon.output()) if e.get("event") == "database unavailable, CDR spooled")
    print(f"\nfault test: {CALLS} calls at {RATE:g}/s, PostgreSQL down {outage_s:.1f} s"
          f" (stop issued {BEFORE_S:g} s in); SIPp: {answered} answered, {unavailable} rejected 503,"
          f" {len(during)} placed while down; CDRs: {len(rows)} ({spooled} spooled and replayed),"
          f" phone saw {far.successful}")
    assert len({r.call_id for r in rows}) == len(rows) == CALLS  # all there, none twice
    outcomes = Counter((r.decision, r.reject_reason, r.dial_status) for r in rows)
    assert outcomes == {("bridged", None, "ANSWER"): answered, ("rejected", "unavailable", None): unavailable}
    assert spooled > 0 and not (spool / "cdrs.unreadable.jsonl").exists()
    assert "Traceback" not in daemon.output()
