"""The anomaly job end to end, on PostgreSQL: a SIPp pattern of short repeated calls from
an agent to one customer goes through the real Asterisk and the real daemon; the real
`callctl anomaly run` finds it and blocks the binding; the agent's next call is rejected
as blocked (403) and reaches nobody, while the customer can still call the hotline."""
from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from lab import sipp
from callctl.store import bindings, pool, tenants
from callctl.store.cdrs import list_cdrs
from callctl.store.db import make_engine, upgrade
from lab import harness
from tests.pg import TestDatabase
from tests.test_cli import CALLCTL

pytestmark = [pytest.mark.lab, pytest.mark.timeout(1500)]  # waits its turn for the lab

AGENT, HOTLINE, CUSTOMER = "+8613900000002", "+861058000000", "+8613800000001"
SHORT_CALLS = 6
RULES = """
rules:
  ultra_short: {talk_seconds: 3, share: 0.8, min_calls: 5, window: 86400, severity: high,
                action: block, block: {direction: to_customer, seconds: 3600}}
  caller_frequency: {enabled: false}
  tenant_frequency: {enabled: false}
  customer_frequency: {enabled: false}
  declined_repeat: {enabled: false}
  off_hours: {enabled: false}
  blast: {enabled: false}
"""
ALL_DAY = "00:00-24:00"  # calling hours must not make these tests depend on the time of day


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lab-anomaly")
    database = TestDatabase()
    engine = make_engine(database.url)
    upgrade(engine)
    tenants.add_tenant(engine, "acme", HOTLINE, callers=[AGENT], hours=ALL_DAY)
    pool.add_numbers(engine, "acme", ["+8617100000001"])
    binding = bindings.bind(engine, "acme", CUSTOMER)
    (workdir / "anomaly.yaml").write_text(RULES)
    daemon = harness.callctl_daemon(database.url, workdir)
    try:
        with harness.LabLock():
            harness.clear_stale_phones()
            harness.lab("up")
            try:
                daemon.start()
                yield engine, database.url, binding, workdir
            finally:
                daemon.stop()
                harness.lab("down")
    finally:
        engine.dispose()
        database.drop()


def cdrs(engine, count: int, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(rows := list_cdrs(engine, limit=100)) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return rows


def callctl(url: str, workdir: Path, *args: str) -> dict | list:
    env = {"PATH": "/usr/bin:/bin", "CALLCTL_DATABASE_URL": url, "CALLCTL_SPOOL_DIR": str(workdir / "spool")}
    done = subprocess.run([str(CALLCTL), *args], capture_output=True, text=True, env=env, cwd=workdir, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_short_repeated_calls_get_the_binding_blocked(lab):
    engine, url, binding, workdir = lab
    x = binding["x"]
    # ultra_short counts in UTC days: keep the calls and the pass inside one.
    seconds_into_day = datetime.now(timezone.utc).timestamp() % 86400
    if seconds_into_day > 86400 - 120:
        time.sleep(86400 - seconds_into_day + 1)

    phone = sipp.start_uas(harness.PHONE_PORT, expect_ruri=CUSTOMER, expect_from=x)
    try:
        calls = sipp.run_uac("uac_call", calls=[(AGENT, x)], count=SHORT_CALLS, rate=2, talk_ms=500,
                             pai=True, timeout=60)
    finally:
        far = phone.stop()
    harness.wait_no_channels()
    assert calls.ok and calls.successful == SHORT_CALLS, calls.summary()
    assert far.successful == SHORT_CALLS, far.log
    rows = cdrs(engine, SHORT_CALLS)
    assert len(rows) == SHORT_CALLS and all(r["decision"] == "bridged" and r["talk_seconds"] < 3 for r in rows)

    report = callctl(url, workdir, "anomaly", "run", "--rules", "anomaly.yaml")
    assert (report["new_findings"], report["blocks"]) == (1, 1), report
    [finding] = callctl(url, workdir, "findings", "list", "--json")
    assert (finding["rule"], finding["subject"], finding["action"]) == ("ultra_short", str(binding["id"]), "block")
    assert finding["evidence"] == sorted(r["id"] for r in rows) and finding["block_id"]
    again = callctl(url, workdir, "anomaly", "run", "--rules", "anomaly.yaml")
    assert (again["new_findings"], again["blocks"]) == (0, 0)

    # The next call from the agent is rejected as blocked and rings no phone.
    rejected = sipp.run_uac("uac_expect_reject", calls=[(AGENT, x)], expect_code=403, pai=True, timeout=30)
    harness.wait_no_channels()
    assert rejected.ok and rejected.successful == 1, rejected.summary()
    blocked = cdrs(engine, SHORT_CALLS + 1)[0]
    assert (blocked["decision"], blocked["reject_reason"]) == ("rejected", "blocked")

    # The block is on calls to the customer: the customer still reaches the hotline.
    phone = sipp.start_uas(harness.PHONE_PORT, expect_ruri=HOTLINE, expect_from=x)
    try:
        back = sipp.run_uac("uac_call", calls=[(CUSTOMER, x)], talk_ms=200, pai=True, timeout=30)
    finally:
        far = phone.stop()
    harness.wait_no_channels()
    assert back.ok and far.successful == 1, back.summary()
