"""Binding lifecycle edges through the real Asterisk lab and the real daemon, on
PostgreSQL: expired, extended, customer's number changed, unbound (a call in progress
goes on), and a released X re-allocated only after its cooldown."""
from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from callctl import sipp
from callctl.store import provision
from callctl.store.db import make_engine, upgrade
from callctl.store.provision import ProvisionError
from lab import harness
from tests.pg import TestDatabase
from tests.test_lab_calls import Lab, digits  # the lab itself: session fixture lab_up in conftest

pytestmark = pytest.mark.lab

AGENT, HOTLINE = "+8613900000002", "+861058000000"
CUSTOMER, NEW_NUMBER, NEXT_CUSTOMER = "+8613800000011", "+8613800000012", "+8613800000013"
POOL = [f"+86171000001{i:02d}" for i in range(1, 6)]
SPARE_POOL = ["+8617100000201"]  # a one-number pool for the cooldown test


@pytest.fixture(scope="module")
def lab(lab_up, tmp_path_factory):  # noqa: F811
    workdir = tmp_path_factory.mktemp("lab-lifecycle")
    database = TestDatabase()
    engine = make_engine(database.url)
    upgrade(engine)
    provision.add_tenant(engine, "acme", HOTLINE, callers=[AGENT])
    provision.add_numbers(engine, "acme", POOL)
    provision.add_tenant(engine, "spare", "+861058000001", callers=[AGENT])
    provision.add_numbers(engine, "spare", SPARE_POOL)
    env = Lab(engine, database.url, workdir)
    env.daemon.start()
    try:
        yield env
    finally:
        env.daemon.stop()
        engine.dispose()
        database.drop()


def reaches(lab: Lab, x: str, number: str) -> None:
    result, phone = lab.call(AGENT, x, expect_ruri=number, expect_from=x, forbidden=[digits(AGENT)])
    assert result.ok and result.successful == 1, result.summary()
    assert phone.successful == 1 and "check failed" not in phone.log, phone.log


def test_expired_then_extended(lab):
    now = datetime.now(timezone.utc)
    # made ten seconds ago with a five-second TTL: it expired five seconds ago
    binding = provision.bind(lab.engine, "acme", CUSTOMER, ttl_seconds=5, now=now - timedelta(seconds=10))
    result, _ = lab.call(AGENT, binding["x"], expect_code=410, expect_ruri="nobody")
    assert result.ok, result.summary()
    provision.extend_binding(lab.engine, binding["id"], ttl_seconds=3600)
    reaches(lab, binding["x"], CUSTOMER)
    provision.unbind(lab.engine, binding["id"], timedelta(days=1))


def test_changed_customer_number_is_dialled_on_the_next_call(lab):
    binding = provision.bind(lab.engine, "acme", CUSTOMER)
    provision.update_binding(lab.engine, binding["id"], customer=NEW_NUMBER)
    reaches(lab, binding["x"], NEW_NUMBER)
    provision.unbind(lab.engine, binding["id"], timedelta(days=1))


def test_unbind_never_cuts_a_call_in_progress_and_rejects_the_next(lab):
    binding = provision.bind(lab.engine, "acme", CUSTOMER)
    uas = sipp.start_uas(harness.PHONE_PORT, expect_ruri=CUSTOMER, expect_from=binding["x"])
    outcome = {}
    call = threading.Thread(target=lambda: outcome.update(result=sipp.run_uac(
        "uac_call", calls=[(AGENT, binding["x"])], talk_ms=4000, pai=True, timeout=30)))
    call.start()
    try:
        deadline = time.monotonic() + 10
        while harness.active_channels() < 2 and time.monotonic() < deadline:
            time.sleep(0.1)  # until both legs are up
        assert harness.active_channels() >= 2, "the call was never bridged"
        provision.unbind(lab.engine, binding["id"], timedelta(days=1))
    finally:
        call.join(40)
        phone = uas.stop()
    harness.wait_no_channels()
    assert outcome["result"].ok and outcome["result"].successful == 1, outcome["result"].summary()
    assert phone.successful == 1, phone.log  # talked its full four seconds, then a normal BYE
    result, _ = lab.call(AGENT, binding["x"], expect_code=404, expect_ruri="nobody")
    assert result.ok, result.summary()


def test_released_x_is_reallocated_only_after_its_cooldown(lab):
    [x] = SPARE_POOL
    now = datetime.now(timezone.utc)
    first = provision.bind(lab.engine, "spare", CUSTOMER)
    provision.unbind(lab.engine, first["id"], timedelta(hours=1), now=now)
    with pytest.raises(ProvisionError) as info:
        provision.bind(lab.engine, "spare", NEXT_CUSTOMER, now=now + timedelta(minutes=59))
    assert info.value.code == "pool_exhausted"
    result, _ = lab.call(AGENT, x, expect_code=404, expect_ruri="nobody")  # resting: nobody behind it
    assert result.ok, result.summary()
    again = provision.bind(lab.engine, "spare", NEXT_CUSTOMER, now=now + timedelta(hours=1))
    assert again["x"] == x
    reaches(lab, x, NEXT_CUSTOMER)
