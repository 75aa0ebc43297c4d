"""The three binding modes and the lifecycle edges at call time, through the real
Asterisk 22 lab (product dialplan), `callctl serve asterisk` and SIPp, on PostgreSQL
(and SQLite for the modes).

- AXB: one X serves many pairs; (X, caller) picks the other party.
- AXE: one X shared through extensions; the agent is answered by the prompt, keys the
  extension as RFC 2833 DTMF (Debian's sip-tester pcaps), and reaches the customer; a
  wrong or missing extension gets a retry, then its own rejection (cause 28).
- Lifecycle: expired one second ago (410), extended (routes again), customer's number
  changed (the new one only), unbound (404), quarantined X re-allocated only after the
  cooldown and then to the new customer only, and an unbind during a call that does not
  cut it.
"""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest

from lab import sipp
from callctl.errors import ProvisionError
from callctl.store import bindings, pool, tenants
from lab import harness
from tests.test_lab_calls import LABS, Lab, digits, lab_params, running_lab
from tests.test_modes import bind_on

pytestmark = pytest.mark.lab

AGENT, HOTLINE = "+8613900000042", "+861058000042"
RIDE_HOTLINE = "+861058000043"
A1, B1, A2, B2 = "+8613800000421", "+8613600000422", "+8613800000423", "+8613600000424"
C1, C2, C3 = "+8613800000431", "+8613800000432", "+8613800000433"
STRANGER = "+8613700000049"
AXB_X, AXE_X = "+8617100004201", "+8617100004202"
POOL = [f"+86171000043{i:02d}" for i in range(1, 11)]
SOLO_X = "+8617100004401"  # the only number of tenant "solo": reuse is observable
# Keys a call presses must follow the order of the RTP timestamps in Debian's pcaps
# (1 0 2 3 4 5 6 7 8 9 * #), see sipp_scenarios/uac_extension.xml.
EXT_1, EXT_2 = "135", "468"
NOBODYS, NOBODYS_2 = "102", "357"
INVALID_EXTENSION_CAUSE = 28


class ModesLab(Lab):
    def __init__(self, engine, url, workdir, pbx: harness.Pbx = harness.ASTERISK):
        super().__init__(engine, url, workdir, pbx)
        # The lifecycle tests call one second after an expiry and expect the call-time
        # check (410 expired); the housekeeping that releases a lapsed binding's X (every
        # 5 s by default, tested in test_customers_daemon) would race them.
        self.daemon = harness.callctl_daemon(url, workdir, pbx=pbx.name,
                                             extra_env={"CALLCTL_HOUSEKEEPING_SECONDS": "3600"})

    def keyed_call(self, caller: str, x: str, keys: str, *, expect_cause: int | None = None,
                   talk_ms: int = 1500, **phone) -> tuple[sipp.SippResult, sipp.SippResult]:
        """An agent's call to a shared X: answered by the prompt, keys pressed as RFC 2833
        DTMF. The phone on 5070 checks (or, with expect_ruri='nobody', refuses) the leg."""
        uas = sipp.start_uas(harness.PHONE_PORT, **phone)
        try:
            variables = {"expect_cause": expect_cause} if expect_cause else {}
            result = sipp.run_uac(
                "uac_extension",
                calls=[(caller, x, f"P-Asserted-Identity: <sip:{caller}@127.0.0.1>", keys)],
                talk_ms=talk_ms if expect_cause is None else 40_000,
                variables=variables, timeout=60, target=self.pbx.sip_target,
            )
        finally:
            far = uas.stop()
        self.pbx.wait_no_channels()
        return result, far

    def last_cdr(self, count_before: int) -> dict:
        rows = self.wait_cdrs(count_before + 1)
        assert len(rows) == count_before + 1, "the call wrote no CDR"
        return rows[0]


ALL_DAY = "00:00-24:00"  # calling hours must not make these tests depend on the time of day


def _numbers(engine) -> None:
    tenants.add_tenant(engine, "acme", HOTLINE, callers=[AGENT], hours=ALL_DAY)
    pool.add_numbers(engine, "acme", POOL + [AXE_X])
    tenants.add_tenant(engine, "ride", RIDE_HOTLINE, hours=ALL_DAY)
    pool.add_numbers(engine, "ride", [AXB_X])
    tenants.add_tenant(engine, "solo", HOTLINE, callers=[AGENT], hours=ALL_DAY)
    pool.add_numbers(engine, "solo", [SOLO_X])
    # Real allocation: the second pair goes onto the X already serving AXB pairs.
    for a, b in ((A1, B1), (A2, B2)):
        assert bindings.bind(engine, "ride", a, mode="AXB", other_party=b)["x"] == AXB_X
    bind_on(engine, "acme", AXE_X, "AXE", C1, extension=EXT_1)
    bind_on(engine, "acme", AXE_X, "AXE", C2, extension=EXT_2)


@pytest.fixture(scope="module", params=LABS, ids=["-".join(p) for p in LABS])
def lab(request, tmp_path_factory):
    kind, pbx = lab_params(request)
    workdir = tmp_path_factory.mktemp(f"modes-{kind}-{pbx}")
    with running_lab(kind, workdir, _numbers, ModesLab, pbx=pbx) as env:
        env.param = kind
        yield env


def postgresql_only(lab):
    if lab.param != "postgresql":
        pytest.skip("lifecycle edges and the slower AXE paths run on PostgreSQL")


def asterisk_only(lab):
    if lab.pbx is not harness.ASTERISK:
        pytest.skip("provisioning edges at call time: the daemon decides the same whatever the PBX")


# --- AXB ------------------------------------------------------------------------------

@pytest.mark.parametrize("caller, callee, other", [(A1, B1, A2), (B1, A1, B2), (A2, B2, A1), (B2, A2, B1)])
def test_axb_caller_picks_the_other_party_of_its_pair(lab, caller, callee, other):
    result, phone = lab.call(caller, AXB_X, expect_ruri=callee, expect_from=AXB_X,
                             forbidden=[digits(caller), digits(other)])
    assert result.ok, result.summary()
    assert phone.successful == 1 and "check failed" not in phone.log, phone.log


@pytest.mark.parametrize("caller", [STRANGER, AGENT])
def test_axb_nobody_outside_a_pair_reaches_anyone(lab, caller):
    result, phone = lab.call(caller, AXB_X, expect_code=403, expect_ruri="nobody")
    assert result.ok and phone.attempted == 0, result.summary()


# --- AXE ------------------------------------------------------------------------------

@pytest.mark.parametrize("extension, customer", [(EXT_1, C1), (EXT_2, C2)])
def test_axe_agent_keys_extension_and_reaches_that_customer(lab, extension, customer):
    before = len(lab.cdrs())
    other = C2 if customer == C1 else C1
    result, phone = lab.keyed_call(AGENT, AXE_X, extension, expect_ruri=customer, expect_from=AXE_X,
                                   forbidden=[digits(AGENT), digits(other)])
    assert result.ok, (result.summary(), result.log)
    assert phone.successful == 1 and "check failed" not in phone.log, phone.log
    cdr = lab.last_cdr(before)
    assert cdr["decision"] == "bridged" and cdr["direction"] == "to_customer"
    assert cdr["callee_masked"] == customer[:6] + "****" + customer[-4:]
    assert cdr["virtual_number"] == AXE_X and cdr["dial_status"] == "ANSWER"


def test_axe_customer_reaches_hotline_without_a_prompt(lab):
    result, phone = lab.call(C1, AXE_X, expect_ruri=HOTLINE, expect_from=AXE_X, forbidden=[digits(C1)])
    assert result.ok, result.summary()
    assert phone.successful == 1 and "check failed" not in phone.log, phone.log


def test_axe_stranger_is_never_prompted(lab):
    result, phone = lab.call(STRANGER, AXE_X, expect_code=403, expect_ruri="nobody")
    assert result.ok and phone.attempted == 0, result.summary()


def test_axe_wrong_extension_gets_a_retry(lab):
    postgresql_only(lab)
    # The retry prompt plays after a wrong extension, then the right one is keyed.
    result, phone = lab.keyed_call(AGENT, AXE_X, f"{NOBODYS},,{EXT_2}", expect_ruri=C2, expect_from=AXE_X)
    assert result.ok, (result.summary(), result.log)
    assert phone.successful == 1 and "check failed" not in phone.log, phone.log


@pytest.mark.parametrize("keys", [f"{NOBODYS},,{NOBODYS_2}", ""], ids=["wrong-twice", "nothing-keyed"])
def test_axe_wrong_or_missing_extension_twice_is_rejected_with_its_own_cause(lab, keys):
    if keys == "":
        postgresql_only(lab)  # two full timeouts: the slowest call here
    before = len(lab.cdrs())
    result, phone = lab.keyed_call(AGENT, AXE_X, keys, expect_cause=INVALID_EXTENSION_CAUSE,
                                   expect_ruri="nobody")
    assert result.ok, (result.summary(), result.log)
    assert phone.attempted == 0
    cdr = lab.last_cdr(before)
    assert cdr["decision"] == "rejected" and cdr["reject_reason"] == "invalid_extension"
    assert cdr["hangup_cause"] == INVALID_EXTENSION_CAUSE and cdr["callee_masked"] is None
    assert cdr["binding_id"] is None and cdr["direction"] == "to_customer"


# --- lifecycle ------------------------------------------------------------------------

def _sleep_until(moment: datetime) -> None:
    time.sleep(max((moment - datetime.now(timezone.utc)).total_seconds(), 0))


def test_call_one_second_after_expiry_is_rejected_as_expired(lab):
    postgresql_only(lab)
    binding = bindings.bind(lab.engine, "acme", C3, ttl_seconds=4)
    expires_at = datetime.fromisoformat(binding["expires_at"])
    assert lab.call(AGENT, binding["x"], expect_ruri=C3)[0].ok  # alive before
    _sleep_until(expires_at + timedelta(seconds=1))
    before = len(lab.cdrs())
    result, phone = lab.call(AGENT, binding["x"], expect_code=410, expect_ruri="nobody")
    assert result.ok and phone.attempted == 0, result.summary()
    cdr = lab.last_cdr(before)
    assert cdr["reject_reason"] == "expired" and cdr["binding_id"] == binding["id"]


def test_extended_binding_routes_again(lab):
    postgresql_only(lab)
    asterisk_only(lab)
    customer = "+8613800000481"
    binding = bindings.bind(lab.engine, "acme", customer, ttl_seconds=1)
    _sleep_until(datetime.fromisoformat(binding["expires_at"]) + timedelta(seconds=1))
    result, phone = lab.call(AGENT, binding["x"], expect_code=410, expect_ruri="nobody")
    assert result.ok and phone.attempted == 0, result.summary()
    bindings.extend_binding(lab.engine, binding["id"], ttl_seconds=3600)  # a late renewal
    result, phone = lab.call(AGENT, binding["x"], expect_ruri=customer, expect_from=binding["x"])
    assert result.ok and phone.successful == 1 and "check failed" not in phone.log, phone.log


def test_changed_customer_number_routes_to_the_new_number_only(lab):
    postgresql_only(lab)
    asterisk_only(lab)
    old, new = "+8613800000491", "+8613800000492"
    binding = bindings.bind(lab.engine, "acme", old)
    bindings.update_binding(lab.engine, binding["id"], customer=new)
    result, phone = lab.call(AGENT, binding["x"], expect_ruri=new, expect_from=binding["x"],
                             forbidden=[digits(old)])
    assert result.ok and phone.successful == 1 and "check failed" not in phone.log, phone.log
    assert lab.call(new, binding["x"], expect_ruri=HOTLINE)[0].ok
    result, phone = lab.call(old, binding["x"], expect_code=403, expect_ruri="nobody")
    assert result.ok and phone.attempted == 0, result.summary()


def test_unbound_x_no_longer_routes(lab):
    postgresql_only(lab)
    binding = bindings.bind(lab.engine, "acme", "+8613800000441")
    assert lab.call(AGENT, binding["x"], expect_ruri="+8613800000441")[0].ok
    bindings.unbind(lab.engine, binding["id"], timedelta(days=30))
    for caller in (AGENT, "+8613800000441"):
        result, phone = lab.call(caller, binding["x"], expect_code=404, expect_ruri="nobody")
        assert result.ok and phone.attempted == 0, result.summary()


def test_unbinding_one_axb_pair_leaves_the_other_pairs_routing(lab):
    postgresql_only(lab)
    asterisk_only(lab)
    a3, b3 = "+8613800000451", "+8613600000452"
    binding = bindings.bind(lab.engine, "ride", a3, mode="AXB", other_party=b3)
    assert binding["x"] == AXB_X
    assert lab.call(a3, AXB_X, expect_ruri=b3, expect_from=AXB_X)[0].ok
    bindings.unbind(lab.engine, binding["id"], timedelta(days=30))
    result, phone = lab.call(a3, AXB_X, expect_code=403, expect_ruri="nobody")
    assert result.ok and phone.attempted == 0, result.summary()
    assert lab.call(A1, AXB_X, expect_ruri=B1, expect_from=AXB_X)[0].ok


def test_quarantined_x_is_reallocated_only_after_the_cooldown_to_the_new_customer(lab):
    postgresql_only(lab)
    asterisk_only(lab)
    old, new = "+8613800000461", "+8613800000462"
    first = bindings.bind(lab.engine, "solo", old)
    assert first["x"] == SOLO_X
    ended = bindings.unbind(lab.engine, first["id"], timedelta(seconds=3))
    cooldown_over = datetime.fromisoformat(ended["ended_at"]) + timedelta(seconds=3)
    with pytest.raises(ProvisionError) as refused:
        bindings.bind(lab.engine, "solo", new)
    assert refused.value.code == "pool_exhausted"
    result, phone = lab.call(AGENT, SOLO_X, expect_code=404, expect_ruri="nobody")  # resting
    assert result.ok and phone.attempted == 0, result.summary()
    _sleep_until(cooldown_over)
    second = bindings.bind(lab.engine, "solo", new)
    assert second["x"] == SOLO_X
    result, phone = lab.call(AGENT, SOLO_X, expect_ruri=new, expect_from=SOLO_X, forbidden=[digits(old)])
    assert result.ok and phone.successful == 1 and "check failed" not in phone.log, phone.log
    # The old customer is nobody to this X any more: a stranger on a strict tenant.
    result, phone = lab.call(old, SOLO_X, expect_code=403, expect_ruri="nobody")
    assert result.ok and phone.attempted == 0, result.summary()


def test_unbinding_during_a_call_does_not_cut_it(lab):
    postgresql_only(lab)
    customer = "+8613800000471"
    binding = bindings.bind(lab.engine, "acme", customer)
    talk_ms = 4000
    uas = sipp.start_uas(harness.PHONE_PORT, expect_ruri=customer, expect_from=binding["x"])
    try:
        caller = sipp.start(
            "uac_call", remote=lab.pbx.sip_target, calls=[(AGENT, binding["x"])], max_calls=1,
            variables={"talk_ms": talk_ms},
        )
        deadline = time.monotonic() + 10
        while lab.pbx.active_channels() < 2:  # both legs up: the call is in progress
            assert time.monotonic() < deadline, "the call never came up"
            time.sleep(0.05)
        bindings.unbind(lab.engine, binding["id"], timedelta(days=30))
        result = caller.wait(timeout=30)
    finally:
        phone = uas.stop()
    lab.pbx.wait_no_channels()
    assert result.ok and result.successful == 1, result.summary()
    assert result.remote_hangups == 0, "the PBX cut the call"  # the caller sent BYE itself
    assert result.elapsed_s >= talk_ms / 1000
    assert phone.successful == 1 and "check failed" not in phone.log, phone.log
    # The next call finds X unbound.
    assert lab.call(AGENT, binding["x"], expect_code=404, expect_ruri="nobody")[0].ok


def test_no_real_number_in_cdrs_or_the_daemon_log(lab):
    everything = str(lab.cdrs()) + lab.daemon.output()
    for number in (AGENT, HOTLINE, RIDE_HOTLINE, A1, B1, A2, B2, C1, C2, C3, STRANGER):
        assert digits(number) not in everything, f"a real number leaked: {number[:6]}..."
    assert harness.json_events(lab.daemon.output())
