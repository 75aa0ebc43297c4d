"""The shared harassment blacklist through the real store on SQLite and PostgreSQL: two
approvals (never the proposer, never the same person twice) before it is in force; then
the next call from that number is refused `blacklisted` on every tenant's X, customers
still reach the hotlines, a lift restores the calls; appeals; everything audited. The
anomaly job proposes a caller found in two tenants once, with both tenants' evidence;
a tenant sees only its own part."""
from __future__ import annotations

import itertools
import json
import tempfile
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, insert, select, text

from callctl.anomaly.config import RULES, AnomalyConfig
from callctl.anomaly.job import run_pass
from callctl.core.decision import Bridge, Reason
from callctl.core.numbers import mask
from callctl.service import CallService
from callctl.store import bindings, blacklist, pool, reveal, tenants
from callctl.store.crypto import number_hash
from callctl.store.models import AuditEntry, BlacklistEntry, BlacklistEvidence, Cdr
from callctl.errors import ProvisionError
from callctl.store.spool import CdrSpool
from tests import realnumbers

HARASSER = realnumbers.tenant_line("+8613900017001")  # an agent line of both tenants
OTHER_AGENT = realnumbers.tenant_line("+8613900017002")
HOTLINES = realnumbers.tenant_line("+861058017001", "+861058017002", "+861058017003")
CUSTOMERS = realnumbers.person("+8613800017001", "+8613800017002")
X = ["+8617100017001", "+8617100017002"]
T0 = datetime(2026, 11, 2, 2, 0, tzinfo=timezone.utc)
_CALL_IDS = itertools.count(1)


@pytest.fixture
def two(engine):
    for n, (name, x) in enumerate((("acme", X[0]), ("bolt", X[1]))):
        tenants.add_tenant(engine, name, HOTLINES[n], callers=[HARASSER, OTHER_AGENT])
        tenants.update_tenant(engine, name, hours="00:00-24:00")
        pool.add_numbers(engine, name, [x])
    tenants.add_tenant(engine, "calm", HOTLINES[2], callers=[OTHER_AGENT])
    return {"acme": bindings.bind(engine, "acme", CUSTOMERS[0]), "bolt": bindings.bind(engine, "bolt", CUSTOMERS[1])}


def route(engine, caller, x):
    """A fresh daemon's decision: nothing cached."""
    return CallService(engine, CdrSpool(tempfile.mkdtemp(prefix="callctl-bl-spool-"))).route(x, caller)[1]


def calls_from(engine, caller, tenant_id, count, start=T0, spacing=60) -> list[int]:
    rows = [{"call_id": f"bl-{next(_CALL_IDS)}", "tenant_id": tenant_id, "binding_id": None,
             "direction": "to_customer", "decision": "bridged", "started_at": start + timedelta(seconds=n * spacing),
             "caller_hash": number_hash(caller), "caller_masked": mask(caller), "dial_status": "ANSWER"}
            for n in range(count)]
    with engine.begin() as conn:
        return [conn.execute(insert(Cdr).values(**row).returning(Cdr.id)).scalar_one() for row in rows]


def audit_actions(engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(select(AuditEntry.action).order_by(AuditEntry.id)))


def test_two_approvals_then_refused_on_every_tenant_and_lift_restores(engine, two):
    evidence = calls_from(engine, HARASSER, 1, 2) + calls_from(engine, HARASSER, 2, 1)
    entry = blacklist.propose(engine, caller=HARASSER, reason="harassment reported by two insurers",
                              proposed_by="ops:li", cdrs=evidence)
    assert entry["status"] == "proposed" and entry["caller"] == mask(HARASSER)
    assert entry["tenants"] == ["acme", "bolt"] and not entry["in_force"]
    x1, x2 = two["acme"]["x"], two["bolt"]["x"]
    assert isinstance(route(engine, HARASSER, x1), Bridge)  # a proposal stops nothing
    for person, code in (("ops:li", "self_approval"),):
        with pytest.raises(ProvisionError) as refused:
            blacklist.approve(engine, entry["id"], person)
        assert refused.value.code == code
    first = blacklist.approve(engine, entry["id"], "ops:wang")
    assert first["status"] == "proposed" and first["approved_by"] == "ops:wang"
    assert isinstance(route(engine, HARASSER, x2), Bridge)  # one approval is not enough
    with pytest.raises(ProvisionError) as twice:
        blacklist.approve(engine, entry["id"], "ops:wang")
    assert twice.value.code == "second_person"
    active = blacklist.approve(engine, entry["id"], "ops:zhao")
    assert active["status"] == "active" and active["in_force"] and active["ends_at"] is None
    for x in (x1, x2):
        decision = route(engine, HARASSER, x)
        assert decision.reason == Reason.BLACKLISTED and decision.direction.value == "to_customer"
    assert isinstance(route(engine, OTHER_AGENT, x1), Bridge)  # other agents still call
    hotline = route(engine, CUSTOMERS[0], x1)  # customers still reach the business
    assert isinstance(hotline, Bridge) and hotline.destination == HOTLINES[0]
    lifted = blacklist.lift(engine, entry["id"], "ops:qian", note="number reassigned")
    assert lifted["status"] == "lifted" and not lifted["in_force"] and lifted["closed_by"] == "ops:qian"
    for x in (x1, x2):
        assert isinstance(route(engine, HARASSER, x), Bridge)
    assert audit_actions(engine) == ["blacklist_proposed", "blacklist_step_refused", "blacklist_approved",
                                     "blacklist_step_refused", "blacklist_in_force", "blacklist_lifted"]
    assert reveal.verify(engine)["ok"]
    with engine.connect() as conn:  # stored encrypted, found by hash
        stored = conn.execute(text("SELECT caller, caller_hash FROM blacklist")).one()
    assert HARASSER[3:] not in stored.caller and stored.caller_hash == number_hash(HARASSER)
    assert HARASSER[3:] not in json.dumps(blacklist.list_entries(engine))


def test_an_entry_with_an_end_stops_at_its_end(engine, two):
    entry = blacklist.propose(engine, caller=HARASSER, reason="repeated calls at night", proposed_by="a",
                              cdrs=calls_from(engine, HARASSER, 1, 1), seconds=3600)
    blacklist.approve(engine, entry["id"], "b")
    active = blacklist.approve(engine, entry["id"], "c")
    ends = datetime.fromisoformat(active["ends_at"])
    service = CallService(engine, CdrSpool(tempfile.mkdtemp(prefix="callctl-bl-spool-")))
    assert service.route(two["acme"]["x"], HARASSER, ends - timedelta(seconds=1))[1].reason == Reason.BLACKLISTED
    assert isinstance(service.route(two["acme"]["x"], HARASSER, ends)[1], Bridge)


def test_appeal_upheld_then_lifted_and_refusal(engine, two):
    cdrs = calls_from(engine, HARASSER, 1, 1)
    entry = blacklist.propose(engine, caller=HARASSER, reason="abusive calls", proposed_by="a", cdrs=cdrs)
    with pytest.raises(ProvisionError) as early:
        blacklist.appeal(engine, entry["id"], "holder", "not me")
    assert early.value.code == "blacklist_not_active"
    blacklist.approve(engine, entry["id"], "b")
    blacklist.approve(engine, entry["id"], "c")
    appealed = blacklist.appeal(engine, entry["id"], "support:on behalf of the holder", "the line changed hands")
    assert appealed["appeal"] == "the line changed hands" and appealed["appeal_outcome"] is None
    with pytest.raises(ProvisionError) as pending:
        blacklist.appeal(engine, entry["id"], "someone", "again")
    assert pending.value.code == "appeal_pending"
    assert blacklist.uphold(engine, entry["id"], "d")["appeal_outcome"] == "upheld"
    assert route(engine, HARASSER, two["acme"]["x"]).reason == Reason.BLACKLISTED
    blacklist.appeal(engine, entry["id"], "holder", "new facts")
    lifted = blacklist.lift(engine, entry["id"], "e")
    assert lifted["appeal_outcome"] == "lifted" and lifted["status"] == "lifted"
    # A new proposal for the same number is a new entry; this one is refused.
    again = blacklist.propose(engine, caller=HARASSER, reason="abusive calls again", proposed_by="a", cdrs=cdrs)
    refused = blacklist.refuse(engine, again["id"], "b", note="not enough")
    assert refused["status"] == "refused" and not refused["in_force"]
    assert isinstance(route(engine, HARASSER, two["acme"]["x"]), Bridge)
    assert "blacklist_appeal_upheld" in audit_actions(engine) and reveal.verify(engine)["ok"]


def test_bad_proposals_are_clear_errors_and_change_nothing(engine, two):
    mine = calls_from(engine, HARASSER, 1, 1)
    others = calls_from(engine, OTHER_AGENT, 1, 1, start=T0 + timedelta(hours=1))
    args = {"caller": HARASSER, "reason": "harassment", "proposed_by": "a", "cdrs": mine}
    for change, code in [
        ({"cdrs": []}, "no_evidence"),
        ({"reason": "calls from +8613800017001 all night"}, "invalid_reason"),
        ({"caller": "not a number"}, "invalid_number"),
        ({"proposed_by": " "}, "invalid_person"),
        ({"seconds": 5}, "invalid_time"),
        ({"cdrs": others}, "invalid_evidence"),
        ({"findings": [999]}, "finding_not_found"),
    ]:
        with pytest.raises(ProvisionError) as bad:
            blacklist.propose(engine, **{**args, **change})
        assert bad.value.code == code
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(BlacklistEntry)) == 0
        assert conn.scalar(select(func.count()).select_from(AuditEntry)) == 0


def caller_rule(**fields) -> AnomalyConfig:
    chosen = {r: {"enabled": False} for r in RULES}
    chosen["caller_frequency"] = {"calls": 3, "window": 3600}
    return AnomalyConfig.model_validate({"rules": chosen, **fields})


def test_anomaly_job_proposes_a_caller_found_in_two_tenants_once(engine, two):
    now = T0 + timedelta(days=1)
    calls_from(engine, HARASSER, 1, 3)  # trips caller_frequency in acme...
    assert run_pass(engine, caller_rule(), now=now).blacklist == []  # ...one tenant is not enough
    calls_from(engine, HARASSER, 2, 4)  # ...and in bolt
    calls_from(engine, OTHER_AGENT, 1, 5)  # another caller, found in one tenant only
    result = run_pass(engine, caller_rule(), now=now)
    assert len(result.blacklist) == 1
    entry = blacklist.get(engine, result.blacklist[0])
    assert entry["origin"] == "automatic" and entry["status"] == "proposed" and entry["proposed_by"] == "anomaly"
    assert entry["caller"] == mask(HARASSER) and entry["tenants"] == ["acme", "bolt"]
    assert sorted(len(e["cdr_ids"]) for e in entry["evidence"]) == [3, 4]
    # Re-running finds the same findings: no second proposal, no new evidence.
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM anomaly_state")
    assert run_pass(engine, caller_rule(), now=now).blacklist == []
    # Two people approve it: in force on both tenants' X at the next call.
    blacklist.approve(engine, entry["id"], "ops:wang")
    blacklist.approve(engine, entry["id"], "ops:zhao")
    assert {route(engine, HARASSER, b["x"]).reason for b in two.values()} == {Reason.BLACKLISTED}
    # A tenant sees that its caller was blacklisted and why, with its own evidence only.
    acme = blacklist.tenant_entries(engine, "acme")
    assert [(e["id"], e["caller"], e["in_force"]) for e in acme] == [(entry["id"], mask(HARASSER), True)]
    acme_cdrs = {i for e in acme[0]["your_evidence"] for i in e["cdr_ids"]}
    with engine.connect() as conn:
        assert set(conn.scalars(select(Cdr.tenant_id).where(Cdr.id.in_(acme_cdrs)))) == {1}
    assert "tenants" not in acme[0] and "bolt" not in json.dumps(acme)
    assert blacklist.tenant_entries(engine, "calm") == []
    assert audit_actions(engine) == ["blacklist_proposed", "blacklist_approved", "blacklist_in_force"]


def test_later_findings_join_the_open_entry(engine, two):
    now = T0 + timedelta(days=1)
    calls_from(engine, HARASSER, 1, 3)
    calls_from(engine, HARASSER, 2, 3)
    first = run_pass(engine, caller_rule(), now=now).blacklist
    calls_from(engine, HARASSER, 1, 3, start=T0 + timedelta(hours=5))  # a new finding in acme
    assert run_pass(engine, caller_rule(), now=now).blacklist == first
    assert len(blacklist.get(engine, first[0])["evidence"]) == 3
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(BlacklistEntry)) == 1
        assert conn.scalar(select(func.count()).select_from(BlacklistEvidence)) == 3
    # Refused: the same findings never propose again; switched off, nothing is proposed.
    blacklist.refuse(engine, first[0], "ops:wang")
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM anomaly_state")
    assert run_pass(engine, caller_rule(), now=now).blacklist == []
    calls_from(engine, HARASSER, 2, 3, start=T0 + timedelta(hours=9))
    assert run_pass(engine, caller_rule(blacklist={"enabled": False}), now=now).blacklist == []
