"""Call policy through the real Asterisk 22 lab, on SQLite and PostgreSQL, and through the
real FreeSWITCH lab on PostgreSQL (tests/test_lab_calls.py LABS): blocks set
with the `callctl` command while the daemon runs (seen on the very next call, one way
only), tenant suspension, calling hours (480), the maximum call duration cut by the PBX
(the phone sees Asterisk's BYE), the ring timeout (the PBX cancels the ringing phone), and no
identity header carrying a real number.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from lab import sipp
from callctl.store import bindings, pool, tenants
from lab import harness
from tests import leaks, realnumbers
from tests.test_lab_calls import LABS, Lab, lab_params, running_lab

pytestmark = pytest.mark.lab

AGENT, HOTLINE = realnumbers.tenant_line("+8613900005001", "+861058005000")
CUSTOMER, CUSTOMER_2, CUSTOMER_3, CUSTOMER_4, CUSTOMER_5, CUSTOMER_6, FORWARDER = realnumbers.person(
    "+8613800005001", "+8613800005002", "+8613800005003", "+8613800005004", "+8613800005005",
    "+8613800005006", "+8613800005099",
)
RINGING = realnumbers.person("+8613800005007")
POOL = [f"+86171000050{i:02d}" for i in range(1, 11)]
CALLCTL = Path(sys.executable).with_name("callctl")


def digits(number: str) -> str:
    return number.removeprefix("+86")


class PolicyLab(Lab):
    def callctl(self, *args: str) -> dict | list:
        """The command an operator types, against the database the daemon is serving."""
        env = {**os.environ, "CALLCTL_DATABASE_URL": self.url, "CALLCTL_SPOOL_DIR": str(self.workdir / "cli-spool")}
        done = subprocess.run([str(CALLCTL), *args], capture_output=True, text=True, env=env, timeout=60)
        leaks.record("tenant" if args[0] == "tenant" else "cli", " ".join(args[:2]), done.stdout + done.stderr)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def newest_cdr(self, count: int) -> dict:
        rows = self.wait_cdrs(count)
        assert len(rows) == count
        return rows[0]


def _numbers(engine) -> None:
    # All day to start with: each test sets the policy it is about.
    tenants.add_tenant(engine, "acme", HOTLINE, callers=[AGENT], hours="00:00-24:00")
    pool.add_numbers(engine, "acme", POOL)


@pytest.fixture(scope="module", params=LABS, ids=["-".join(p) for p in LABS])
def lab(request, tmp_path_factory):
    kind, pbx = lab_params(request)
    workdir = tmp_path_factory.mktemp(f"policy-{kind}-{pbx}")
    with running_lab(kind, workdir, _numbers, PolicyLab, pbx=pbx) as env:
        yield env


def test_block_by_command_stops_the_next_call_one_way_only(lab):
    binding = bindings.bind(lab.engine, "acme", CUSTOMER)
    x, before = binding["x"], len(lab.cdrs())
    assert lab.call(AGENT, x, expect_ruri=CUSTOMER, expect_from=x)[0].ok  # the daemon has served X
    block = lab.callctl("block", "add", "--scope", "binding", "--binding", str(binding["id"]),
                        "--direction", "to_customer", "--reason", "complaint C-1", "--by", "ops:li")
    # The very next call, on the running daemon: rejected, no phone rings.
    result, phone = lab.call(AGENT, x, expect_code=403, expect_ruri="nobody")
    assert result.ok and phone.attempted == 0, result.summary()
    assert lab.newest_cdr(before + 2)["reject_reason"] == "blocked"
    # The other direction still goes through: the customer reaches the hotline.
    result, phone = lab.call(CUSTOMER, x, expect_ruri=HOTLINE, expect_from=x)
    assert result.ok and phone.successful == 1, result.summary()
    lab.callctl("block", "lift", str(block["id"]), "--by", "ops:wang")
    assert lab.call(AGENT, x, expect_ruri=CUSTOMER, expect_from=x)[0].ok


def test_suspension_rejects_all_calls_to_customers_not_to_the_hotline(lab):
    first = bindings.bind(lab.engine, "acme", CUSTOMER_2)
    second = bindings.bind(lab.engine, "acme", CUSTOMER_3)
    block = lab.callctl("block", "add", "--scope", "tenant", "--tenant", "acme", "--direction", "to_customer",
                        "--reason", "calling rights suspended", "--by", "regulator")
    try:
        for binding in (first, second):
            result, phone = lab.call(AGENT, binding["x"], expect_code=403, expect_ruri="nobody")
            assert result.ok and phone.attempted == 0, result.summary()
        result, phone = lab.call(CUSTOMER_2, first["x"], expect_ruri=HOTLINE, expect_from=first["x"])
        assert result.ok and phone.successful == 1, result.summary()
    finally:
        lab.callctl("block", "lift", str(block["id"]), "--by", "regulator")


def test_call_outside_hours_rejected_with_480(lab):
    binding = bindings.bind(lab.engine, "acme", CUSTOMER_4)
    x, before = binding["x"], len(lab.cdrs())
    # A two-hour window that starts two hours from now on the tenant's clock.
    local = datetime.now(timezone.utc).astimezone(ZoneInfo("Asia/Shanghai"))
    window = f"{(local + timedelta(hours=2)):%H:%M}-{(local + timedelta(hours=4)):%H:%M}"
    lab.callctl("tenant", "update", "acme", "--hours", window, "--tz", "Asia/Shanghai")
    try:
        result, phone = lab.call(AGENT, x, expect_code=480, expect_ruri="nobody")
        assert result.ok and phone.attempted == 0, result.summary()
        cdr = lab.newest_cdr(before + 1)
        assert (cdr["decision"], cdr["reject_reason"], cdr["direction"]) == ("rejected", "outside_hours", "to_customer")
        # Customers may always call the tenant.
        assert lab.call(CUSTOMER_4, x, expect_ruri=HOTLINE, expect_from=x)[0].ok
    finally:
        lab.callctl("tenant", "update", "acme", "--hours", "00:00-24:00")
    assert lab.call(AGENT, x, expect_ruri=CUSTOMER_4, expect_from=x)[0].ok


def test_call_cut_at_the_maximum_duration_by_the_pbx(lab):
    binding = bindings.bind(lab.engine, "acme", CUSTOMER_5)
    x, before = binding["x"], len(lab.cdrs())
    lab.callctl("tenant", "update", "acme", "--max-call-seconds", "2")
    try:
        # The caller would talk for 20 s and the phone never hangs up: only the PBX can end it.
        result, phone = lab.call(AGENT, x, talk_ms=20000, scenario="uas_wait_bye")
    finally:
        lab.callctl("tenant", "update", "acme", "--max-call-seconds", "3600")
    assert result.ok and result.remote_hangups == 1, result.summary()
    assert phone.ok and phone.successful == 1, phone.summary()
    talked_ms = phone.response_ms_mean(1)  # the phone: ACK -> Asterisk's BYE
    assert 1900 <= talked_ms <= 4000, talked_ms
    assert 1900 <= result.answer_to_remote_bye_ms_mean <= 4000
    cdr = lab.newest_cdr(before + 1)
    assert cdr["decision"] == "bridged" and cdr["dial_status"] == "ANSWER"
    assert 1.9 <= cdr["talk_seconds"] <= 4 and cdr["hangup_cause"] == 16
    assert cdr["hangup_by"] == "pbx"  # nobody hung up but the PBX


def test_unanswered_call_stops_ringing_at_the_tenant_ring_timeout(lab):
    binding = bindings.bind(lab.engine, "acme", RINGING)
    x, before = binding["x"], len(lab.cdrs())
    lab.callctl("tenant", "update", "acme", "--ring-timeout", "2")
    try:
        result, phone = lab.call(AGENT, x, expect_code=480, scenario="uas_no_answer")
    finally:
        lab.callctl("tenant", "update", "acme", "--ring-timeout", "30")
    assert result.ok, result.summary()
    assert phone.ok and phone.successful == 1, phone.summary()
    assert 1900 <= phone.response_ms_mean(1) <= 4000  # INVITE -> the PBX's CANCEL
    cdr = lab.newest_cdr(before + 1)
    assert (cdr["decision"], cdr["dial_status"]) == ("bridged", "NOANSWER")
    assert 1.9 <= cdr["ring_seconds"] <= 4 and cdr["talk_seconds"] == 0
    assert cdr["hangup_by"] == "pbx"


@pytest.mark.parametrize("caller, callee", [(CUSTOMER, "hotline"), (AGENT, "customer")])
def test_identity_headers_from_the_carrier_never_reach_the_far_end(lab, caller, callee):
    customer = CUSTOMER_6 if callee == "customer" else CUSTOMER
    x = bindings.bind(lab.engine, "acme", customer)["x"]
    headers = [
        f"P-Asserted-Identity: <sip:{caller}@127.0.0.1>",
        f'Remote-Party-ID: "Real Name" <sip:{caller}@127.0.0.1>',
        f"Diversion: <sip:{FORWARDER}@127.0.0.1>",  # the call was forwarded by yet another person
    ]
    phone = sipp.start_uas(
        harness.PHONE_PORT, expect_ruri=HOTLINE if callee == "hotline" else customer, expect_from=x,
        forbidden=[digits(caller), digits(FORWARDER), "P-Asserted-Identity", "Remote-Party-ID", "Diversion",
                   "Real Name"],
    )
    try:
        result = sipp.run_uac("uac_call", calls=[(caller, x, *headers)], talk_ms=200, timeout=30,
                              target=lab.pbx.sip_target)
    finally:
        far = phone.stop()
    lab.pbx.wait_no_channels()
    assert result.ok, result.summary()
    assert far.successful == 1 and "check failed" not in far.log, far.log
