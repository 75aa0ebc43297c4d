"""Customers in control, through the real Asterisk 22 lab (product dialplan), `callctl
serve asterisk` and SIPp (issue #16), and the same through the real FreeSWITCH (product
dialplan, `callctl serve freeswitch` over the event socket):

- a customer calls the self-service line, hears the insurers holding a binding for
  them, keys one (RFC 2833 DTMF) and stops its calls: that insurer's next agent call is
  refused `opted_out` (403), another insurer's agent still reaches the customer, and the
  customer still reaches the first insurer's hotline;
- purposes: an agent of a marketing caller group is refused `purpose_not_allowed` on a
  binding that does not accept marketing (the default); a service agent is not.
"""
from __future__ import annotations

import pytest

from lab import sipp
from callctl.store import bindings, customers, pool, tenants
from lab import harness
from tests.test_lab_calls import LABS, digits, lab_params, running_lab
from tests.test_lab_modes import ALL_DAY, ModesLab

pytestmark = pytest.mark.lab

AGENT_A, MARKETER_A, HOTLINE_A = "+8613900000161", "+8613900000162", "+861058000161"
AGENT_B, HOTLINE_B = "+8613900000163", "+861058000163"
CUSTOMER, CUSTOMER_2 = "+8613800000161", "+8613800000162"
X_A, X_A2, X_B = "+8617100016101", "+8617100016102", "+8617100016201"
SELF_SERVICE = "+8617299916000"  # the customers' self-service line (the daemon's selfservice_numbers)


class CustomersLab(ModesLab):
    def __init__(self, engine, url, workdir, pbx: harness.Pbx = harness.ASTERISK):
        super().__init__(engine, url, workdir, pbx)
        self.daemon = harness.callctl_daemon(url, workdir, pbx=pbx.name,
                                             extra_env={"CALLCTL_SELFSERVICE_NUMBERS": SELF_SERVICE})

    def self_service(self, caller: str, keys: str) -> sipp.SippResult:
        """The customer calls the self-service line and keys while the menu plays; the
        PBX hangs up after its confirmation (a far-end BYE)."""
        result = sipp.run_uac("uac_extension", calls=[(caller, SELF_SERVICE, "", keys)], talk_ms=30_000,
                              variables={"key_wait_ms": 1500}, timeout=60, target=self.pbx.sip_target)
        self.pbx.wait_no_channels()
        return result


def _numbers(engine) -> None:
    tenants.add_tenant(engine, "ins_a", HOTLINE_A, callers=[AGENT_A], hours=ALL_DAY)
    tenants.add_callers(engine, "ins_a", callers=[MARKETER_A], purpose="marketing")
    pool.add_numbers(engine, "ins_a", [X_A, X_A2])
    tenants.add_tenant(engine, "ins_b", HOTLINE_B, callers=[AGENT_B], hours=ALL_DAY)
    pool.add_numbers(engine, "ins_b", [X_B])
    assert bindings.bind(engine, "ins_a", CUSTOMER)["x"] == X_A
    assert bindings.bind(engine, "ins_a", CUSTOMER_2)["x"] == X_A2
    assert bindings.bind(engine, "ins_b", CUSTOMER)["x"] == X_B


@pytest.fixture(scope="module", params=LABS, ids=["-".join(p) for p in LABS])
def lab(request, tmp_path_factory):
    kind, pbx = lab_params(request)
    with running_lab(kind, tmp_path_factory.mktemp(f"customers-{kind}-{pbx}"), _numbers, CustomersLab,
                     pbx=pbx) as env:
        yield env


def test_customer_opts_out_of_one_insurer_by_dtmf_on_the_self_service_line(lab):
    # The menu: key 1 is ins_a (tenant ids in order), key 2 ins_b.
    assert [m["tenant"] for m in customers.selfservice_menu(lab.engine, CUSTOMER)] == ["ins_a", "ins_b"]
    before = len(lab.cdrs())
    result = lab.self_service(CUSTOMER, "1")
    assert result.ok, (result.summary(), result.log)
    assert customers.get_preference(lab.engine, "ins_a", CUSTOMER)["calls"] == "none"
    assert customers.get_preference(lab.engine, "ins_b", CUSTOMER)["calls"] == "allowed"
    assert lab.last_cdr(before)["decision"] == "self"

    # ins_a's agent: refused, the customer's phone never rings.
    before = len(lab.cdrs())
    result, phone = lab.call(AGENT_A, X_A, expect_code=403, expect_ruri="nobody")
    assert result.ok and phone.attempted == 0, result.summary()
    assert lab.last_cdr(before)["reject_reason"] == "opted_out"
    # ins_b's agent still reaches the customer, presenting ins_b's X.
    result, phone = lab.call(AGENT_B, X_B, expect_ruri=CUSTOMER, expect_from=X_B, forbidden=[digits(AGENT_B)])
    assert result.ok, result.summary()
    assert phone.successful == 1 and "check failed" not in phone.log, phone.log
    # The customer still reaches ins_a's hotline (a call from a customer has no purpose).
    before = len(lab.cdrs())
    result, phone = lab.call(CUSTOMER, X_A, expect_ruri=HOTLINE_A, expect_from=X_A, forbidden=[digits(CUSTOMER)])
    assert result.ok, result.summary()
    assert phone.successful == 1 and "check failed" not in phone.log, phone.log
    cdr = lab.last_cdr(before)
    assert (cdr["decision"], cdr["direction"], cdr["purpose"]) == ("bridged", "from_customer", None)

    # Keying 1 again allows ins_a's calls again.
    result = lab.self_service(CUSTOMER, "1")
    assert result.ok, (result.summary(), result.log)
    assert customers.get_preference(lab.engine, "ins_a", CUSTOMER)["calls"] == "allowed"


def test_marketing_agent_refused_service_agent_bridged(lab):
    before = len(lab.cdrs())
    result, phone = lab.call(MARKETER_A, X_A2, expect_code=403, expect_ruri="nobody")
    assert result.ok and phone.attempted == 0, result.summary()
    refused = lab.last_cdr(before)
    # The CDR says why the customer was called (the regulator's feed and export read it).
    assert (refused["reject_reason"], refused["purpose"]) == ("purpose_not_allowed", "marketing")
    before = len(lab.cdrs())
    result, phone = lab.call(AGENT_A, X_A2, expect_ruri=CUSTOMER_2, expect_from=X_A2, forbidden=[digits(AGENT_A)])
    assert result.ok, result.summary()
    assert phone.successful == 1 and "check failed" not in phone.log, phone.log
    bridged = lab.last_cdr(before)
    assert (bridged["decision"], bridged["direction"], bridged["purpose"]) == ("bridged", "to_customer", "service")
