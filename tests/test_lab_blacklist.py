"""The shared harassment blacklist end to end through the real Asterisk 22 lab and the
real daemon, on PostgreSQL (the daemon's asyncpg call path; the store and the decision
are tested on both databases in test_blacklist.py): SIPp calls from one agent number
trip the caller rule in two tenants; the real `callctl anomaly run` proposes it ONCE
with both tenants' evidence; two people approve it with `callctl blacklist approve`;
the very next call from that number to either tenant's X is refused `blacklisted` (403,
nobody rings), customers still reach the hotlines; `callctl blacklist lift` restores
both tenants' calls."""
from __future__ import annotations

import pytest

from lab import sipp
from callctl.store import bindings, pool, tenants
from lab import harness
from tests import realnumbers
from tests.test_lab_policy import PolicyLab
from tests.test_lab_calls import running_lab

pytestmark = [pytest.mark.lab, pytest.mark.timeout(1500)]  # waits its turn for the lab

HARASSER = realnumbers.tenant_line("+8613900017101")  # an agent line of both insurers
HOTLINES = realnumbers.tenant_line("+861058017101", "+861058017102")
CUSTOMERS = realnumbers.person("+8613800017101", "+8613800017102")
POOL = {"acme": "+8617100017101", "bolt": "+8617100017102"}
RULES = """
rules:
  caller_frequency: {calls: 3, window: 3600}
  tenant_frequency: {enabled: false}
  customer_frequency: {enabled: false}
  ultra_short: {enabled: false}
  declined_repeat: {enabled: false}
  off_hours: {enabled: false}
  blast: {enabled: false}
blacklist: {min_tenants: 2}
"""


def _numbers(engine) -> None:
    for n, (name, x) in enumerate(POOL.items()):
        tenants.add_tenant(engine, name, HOTLINES[n], callers=[HARASSER], hours="00:00-24:00")
        pool.add_numbers(engine, name, [x])


@pytest.fixture(scope="module")
def lab(lab_up, tmp_path_factory):
    with running_lab("postgresql", tmp_path_factory.mktemp("blacklist"), _numbers, PolicyLab) as env:
        yield env


def test_proposed_from_two_tenants_approved_twice_refused_on_both_then_lifted(lab):
    for n, (name, x) in enumerate(POOL.items()):
        bindings.bind(lab.engine, name, CUSTOMERS[n])
    x1, x2 = POOL["acme"], POOL["bolt"]
    # Three bridged calls to each tenant's customer: the caller rule fires in both.
    phone = sipp.start_uas(harness.PHONE_PORT)
    try:
        calls = sipp.run_uac("uac_call", calls=[(HARASSER, x1), (HARASSER, x2)] * 3, talk_ms=200, pai=True,
                             rate=5, timeout=60)
    finally:
        answered = phone.stop()
    harness.wait_no_channels()
    assert calls.ok and answered.successful == 6, calls.summary()
    lab.wait_cdrs(6)
    rules = lab.workdir / "anomaly.yaml"
    rules.write_text(RULES)
    run = lab.callctl("anomaly", "run", "--rules", str(rules))
    assert run["by_rule"] == {"caller_frequency": 2} and len(run["blacklist_proposals"]) == 1, run
    entry_id = run["blacklist_proposals"][0]
    assert lab.callctl("anomaly", "run", "--rules", str(rules))["blacklist_proposals"] == []  # once
    entry = lab.callctl("blacklist", "show", str(entry_id))
    assert (entry["status"], entry["origin"], entry["tenants"]) == ("proposed", "automatic", ["acme", "bolt"])
    assert sorted(len(e["cdr_ids"]) for e in entry["evidence"]) == [3, 3]
    # A proposal and one approval stop nothing.
    lab.callctl("blacklist", "approve", str(entry_id), "--by", "ops:wang")
    assert lab.call(HARASSER, x1, expect_ruri=CUSTOMERS[0], expect_from=x1)[0].ok
    assert lab.callctl("blacklist", "approve", str(entry_id), "--by", "ops:zhao")["in_force"]
    before = len(lab.cdrs())
    for x in (x1, x2):  # the very next call on either tenant's X
        result, phone = lab.call(HARASSER, x, expect_code=403, expect_ruri="nobody")
        assert result.ok and phone.attempted == 0, result.summary()
    rejected = lab.wait_cdrs(before + 2)[:2]
    assert {(c["virtual_number"], c["reject_reason"]) for c in rejected} == {(x1, "blacklisted"), (x2, "blacklisted")}
    assert "blacklisted" in (harness.REPO / "dialplan/asterisk/extensions_callctl.conf").read_text()
    # Customers still reach their insurer.
    assert lab.call(CUSTOMERS[1], x2, expect_ruri=HOTLINES[1], expect_from=x2)[0].ok
    # What each tenant is told: its caller, why, its own evidence.
    told = lab.callctl("blacklist", "list", "--tenant", "acme")
    assert [(t["id"], t["in_force"]) for t in told] == [(entry_id, True)] and len(told[0]["your_evidence"]) == 1
    lab.callctl("blacklist", "lift", str(entry_id), "--by", "ops:qian", "--note", "agent dismissed")
    for n, x in enumerate((x1, x2)):
        assert lab.call(HARASSER, x, expect_ruri=CUSTOMERS[n], expect_from=x)[0].ok
