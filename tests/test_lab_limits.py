"""A tenant's concurrent-call limit through each real PBX (product dialplans) and SIPp:
the PBX counts the tenant's live calls (Asterisk: GROUP/GROUP_COUNT in the dialplan;
FreeSWITCH: mod_hash's `limit`, run by the daemon over the event socket), so the count
holds across a daemon restart; past the limit the call is refused 486 with the reason
`concurrent_limit` in its CDR. (The same on an Asterisk in its own network namespace,
with `callctl calls` over AMI: tests/test_live_calls.py.)
"""
from __future__ import annotations

import time

import pytest

from lab import sipp
from callctl.store import bindings, pool, tenants
from lab import harness
from tests.test_lab_calls import ALL_DAY, digits, import_pbx, lab_params, running_lab

pytestmark = pytest.mark.lab

AGENT, HOTLINE = "+8613900000181", "+861058000181"
CUSTOMERS = ["+8613800000181", "+8613800000182"]
POOL = ["+8617100018101", "+8617100018102"]
TALK_MS = 120_000  # the first call lasts until the test ends it
REFUSED_PORT = 5082  # the refused calls' SIPp, beside the first call's

LIMIT_LABS = [("postgresql", "asterisk"), ("postgresql", "freeswitch")]


def _numbers(engine) -> None:
    tenants.add_tenant(engine, "acme", HOTLINE, callers=[AGENT], hours=ALL_DAY)
    tenants.update_tenant(engine, "acme", max_concurrent_calls=1)
    pool.add_numbers(engine, "acme", POOL)


@pytest.fixture(scope="module", params=LIMIT_LABS, ids=["-".join(p) for p in LIMIT_LABS])
def lab(request, tmp_path_factory):
    kind, pbx = lab_params(request)
    with running_lab(kind, tmp_path_factory.mktemp(f"limits-{kind}-{pbx}"), _numbers, pbx=pbx) as env:
        yield env


def test_a_tenants_concurrent_call_limit_holds_across_a_daemon_restart(lab, tmp_path):
    """Limit 1: with one call up, the tenant's next is refused 486 (its phone never rings,
    reason concurrent_limit in the CDR), also after the daemon restarted (the PBX holds
    the count); once the call is down, calls go through again."""
    first_x, second_x = (bindings.bind(lab.engine, "acme", c)["x"] for c in CUSTOMERS)
    lab.pbx.forget_kept_cdrs()
    phone = sipp.start_uas(harness.PHONE_PORT, forbidden=[digits(AGENT)])

    def refused() -> sipp.SippResult:
        return sipp.run_uac("uac_expect_reject", target=lab.pbx.sip_target, calls=[(AGENT, second_x)],
                            expect_code=486, local_port=REFUSED_PORT, timeout=60)

    first = sipp.start("uac_call", remote=lab.pbx.sip_target, calls=[(AGENT, first_x)], max_calls=1,
                       variables={"talk_ms": TALK_MS}, workdir=tmp_path / "first")
    try:
        deadline = time.monotonic() + 30
        while lab.pbx.active_channels() < 2:  # both legs up: the call is in progress
            assert time.monotonic() < deadline, "the first call is not up"
            time.sleep(0.1)
        result = refused()
        assert result.successful == 1, result.summary()  # the tenant's second call at once: 486
        lab.daemon.stop()
        lab.daemon.start()
        result = refused()
        assert result.successful == 1, result.summary()  # still: the count lives in the PBX
        deadline = time.monotonic() + 5
        while lab.pbx.active_channels() != 2:  # the refused call's channel goes; the first call stays up
            assert time.monotonic() < deadline, "the first call is not up any more, or the refused one stays"
            time.sleep(0.1)
        lab.pbx.hangup_all()  # the first call ends
        lab.pbx.wait_no_channels(timeout=30)
        again = sipp.run_uac("uac_call", target=lab.pbx.sip_target, calls=[(AGENT, second_x)], talk_ms=200,
                             local_port=REFUSED_PORT, timeout=60)
        assert again.successful == 1, again.summary()  # under the limit again
    finally:
        first.kill()
        far = phone.stop(grace=0.5)
    assert far.attempted == 2 and "check failed" not in far.log, far.log  # the refused never rang
    lab.pbx.wait_no_channels()
    # The first call's CDR: on FreeSWITCH the stopped daemon held its session, so the PBX
    # kept it (docs/esl.md, section 4) and import-pbx writes it; Asterisk's hangup handler
    # reaches the restarted daemon.
    if lab.pbx.kept_cdrs():
        assert import_pbx(lab)["written"] == 1
    rows = lab.wait_cdrs(4)
    refusals = [r for r in rows if r["reject_reason"] == "concurrent_limit"]
    assert len(refusals) == 2 and all(r["decision"] == "rejected" and r["hangup_cause"] == 17 for r in refusals), rows
    assert sum(r["decision"] == "bridged" for r in rows) == 2, rows
