"""Blocks over the HTTP API (`callctl serve api` as a subprocess on a real socket) for a
platform token, on SQLite and PostgreSQL: add, list, lift; tenant tokens are refused; bad
input is a JSON error that changes nothing; a block added here rejects the next call."""
from __future__ import annotations

import json
import tempfile

import httpx
import pytest

from callctl.core.decision import Bridge, Reason
from callctl.service import CallService
from callctl.store.db import make_engine
from callctl.store import tokens
from callctl.store.spool import CdrSpool
from lab.harness import ApiServer
from tests import leaks, realnumbers
from tests.apiclients import clients as api_clients, provisioned

AGENT, HOTLINE = realnumbers.tenant_line("+8613900006001", "+861058006000")
CUSTOMER, CALLER = realnumbers.person("+8613800006001", "+8613800006002")
POOL = ["+8617100006001", "+8617100006002"]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def api(request, tmp_path_factory):
    workdir, url, cli = provisioned(
        request, tmp_path_factory, "api-blocks",
        ["tenant", "add", "acme", "--hotline", HOTLINE, "--caller", AGENT, "--hours", "00:00-24:00"],
        ["pool", "add", "--tenant", "acme", *POOL], ["bind", "--tenant", "acme", "--customer", CUSTOMER])
    issued = {role: json.loads(cli("token", "create", "--role", role, *(["--tenant", "acme"] if role == "tenant" else []),
                                   "--name", f"{role} test").stdout)["token"] for role in ("platform", "tenant")}
    for person in ("ops:li", "ops:wang", "ops:zhao"):  # named platform tokens: reveals need two people
        issued[person] = json.loads(cli("token", "create", "--role", "platform", "--name", person).stdout)["token"]

    def keep(response: httpx.Response):
        response.read()
        path = response.request.url.path
        audited = path.startswith("/v1/reveals/") and path.endswith("/use")  # the one audited way out
        leaks.record("reveal" if audited else "api", f"{response.request.method} {path}", response.text)

    engine = make_engine(url)
    with ApiServer(url, workdir) as server:
        clients = api_clients(server.url, issued, keep)
        yield {"engine": engine, **clients}
        for client in clients.values():
            client.close()
    leaks.record("log", "callctl serve api", server.output())
    engine.dispose()


def route(engine, caller):
    service = CallService(engine, CdrSpool(tempfile.mkdtemp(prefix="callctl-api-blocks-spool-")))
    return service.route(POOL[0], caller)[1]


def test_platform_adds_lists_and_lifts_a_block_effective_on_the_next_call(api):
    client = api["platform"]
    assert isinstance(route(api["engine"], AGENT), Bridge)
    made = client.post("/v1/blocks", json={"scope": "number", "number": POOL[0], "direction": "to_customer",
                                          "reason": "complaint C-9", "by": "ops:li", "duration_seconds": 3600})
    assert made.status_code == 201, made.text
    block = made.json()
    assert (block["tenant"], block["x"], block["status"]) == ("acme", POOL[0], "active")
    assert block["created_by"].startswith("ops:li (api token ")
    assert route(api["engine"], AGENT).reason == Reason.BLOCKED
    assert isinstance(route(api["engine"], CUSTOMER), Bridge)  # one way only
    caller = client.post("/v1/blocks", json={"scope": "caller", "tenant": "acme", "caller": CALLER,
                                            "direction": "both", "reason": "abuse", "by": "ops:li"}).json()
    assert caller["caller"] == "+86138****6002"
    listed = client.get("/v1/blocks", params={"tenant": "acme", "active": True})
    assert [b["id"] for b in listed.json()] == [caller["id"], block["id"]]
    assert [b["id"] for b in client.get("/v1/blocks", params={"number": POOL[0]}).json()] == [block["id"]]
    lifted = client.delete(f"/v1/blocks/{block['id']}", params={"by": "ops:wang"})
    assert lifted.status_code == 200 and lifted.json()["status"] == "ended"
    assert lifted.json()["lifted_by"].startswith("ops:wang")
    assert isinstance(route(api["engine"], AGENT), Bridge)
    again = client.delete(f"/v1/blocks/{block['id']}", params={"by": "ops:wang"})
    assert (again.status_code, again.json()["error"]["code"]) == (409, "block_ended")
    assert client.delete(f"/v1/blocks/{caller['id']}", params={"by": "ops"}).status_code == 200


def test_tenant_tokens_cannot_touch_blocks(api):
    client = api["tenant"]
    for response in (client.get("/v1/blocks"), client.delete("/v1/blocks/1", params={"by": "me"}),
                     client.post("/v1/blocks", json={"scope": "tenant", "tenant": "acme", "direction": "both",
                                                     "reason": "x", "by": "me"})):
        assert (response.status_code, response.json()["error"]["code"]) == (403, "forbidden")
    assert api["platform"].get("/v1/pool").status_code == 403  # and platform tokens are no tenant


@pytest.mark.parametrize("body, status, code", [
    ({"scope": "tenant", "direction": "both", "reason": "x", "by": "ops"}, 422, "invalid_target"),
    ({"scope": "tenant", "tenant": "acme", "direction": "up", "reason": "x", "by": "ops"}, 422, "invalid_request"),
    ({"scope": "tenant", "tenant": "acme", "direction": "both", "reason": "x"}, 422, "invalid_request"),
    ({"scope": "tenant", "tenant": "acme", "direction": "both", "reason": "x", "by": "o", "extra": 1}, 422,
     "invalid_request"),
    ({"scope": "caller", "tenant": "acme", "caller": "+86 138 0000 60", "direction": "both", "reason": "x",
      "by": "ops"}, 422, "invalid_number"),
    ({"scope": "tenant", "tenant": "acme", "direction": "both", "reason": "from 13800006002", "by": "ops"}, 422,
     "invalid_reason"),
    ({"scope": "number", "number": "+8617199996000", "direction": "both", "reason": "x", "by": "ops"}, 404,
     "number_not_found"),
    ({"scope": "tenant", "tenant": "ghost", "direction": "both", "reason": "x", "by": "ops"}, 404,
     "tenant_not_found"),
    ({"scope": "tenant", "tenant": "acme", "direction": "both", "reason": "x", "by": "ops",
      "ends_at": "2020-01-01T00:00:00+08:00"}, 422, "invalid_time"),
])
def test_bad_blocks_get_json_errors_and_change_nothing(api, body, status, code):
    before = api["platform"].get("/v1/blocks").json()
    response = api["platform"].post("/v1/blocks", json=body)
    assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text
    assert "13800006002" not in response.text
    assert api["platform"].get("/v1/blocks").json() == before
    missing = api["platform"].delete("/v1/blocks/987654", params={"by": "ops"})
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "block_not_found")


def test_reveal_needs_a_second_named_person_and_is_audited(api):
    li, wang, tenant = api["ops:li"], api["ops:wang"], api["tenant"]
    binding_id = tenant.get("/v1/bindings").json()["items"][0]["id"]
    asked = li.post("/v1/reveals", json={"binding_id": binding_id, "scenario": "claim", "case_reference": "CLM-7",
                                        "max_uses": 1, "ttl_seconds": 600})
    assert asked.status_code == 201, asked.text
    grant = asked.json()
    assert (grant["requested_by"], grant["status"], grant["active"]) == ("ops:li", "requested", False)
    assert li.post(f"/v1/reveals/{grant['id']}/use").json()["error"]["code"] == "grant_requested"
    assert li.post(f"/v1/reveals/{grant['id']}/approve", json={}).json()["error"]["code"] == "self_approval"
    unnamed = tokens.create_token(api["engine"], role="platform")["token"]  # no --name: no person
    refused = li.get("/v1/reveals", headers={"Authorization": f"Bearer {unnamed}"})
    assert (refused.status_code, refused.json()["error"]["code"]) == (403, "unnamed_token")
    assert tenant.post(f"/v1/reveals/{grant['id']}/approve", json={}).status_code == 403
    approved = wang.post(f"/v1/reveals/{grant['id']}/approve", json={"note": "claim checked"})
    assert approved.status_code == 200 and approved.json()["decided_by"] == "ops:wang"
    assert wang.post(f"/v1/reveals/{grant['id']}/use").json()["error"]["code"] == "not_the_requester"
    shown = li.post(f"/v1/reveals/{grant['id']}/use")
    assert shown.status_code == 200 and shown.json()["number"] == CUSTOMER
    assert shown.headers["cache-control"] == "no-store"
    assert li.post(f"/v1/reveals/{grant['id']}/use").json()["error"]["code"] == "grant_used_up"
    audit = li.get("/v1/audit")
    assert audit.headers["x-audit-verified"] == "true"
    actions = [row["action"] for row in audit.json() if row["grant_id"] == grant["id"]]
    assert actions == ["reveal_requested", "reveal_denied", "decision_refused", "reveal_approved",
                       "reveal_denied", "reveal_used", "reveal_denied"]
    assert CUSTOMER not in audit.text and CUSTOMER.removeprefix("+86") not in audit.text


def test_platform_staff_blacklist_a_caller_over_the_api_two_approvals_then_lift(api):
    """Propose with a CDR as evidence, two approvals by others than the proposer: the
    caller's next call is refused `blacklisted`; a tenant token only reads its part; a
    lift restores the calls. Each step is the store's, audited (tests/test_blacklist.py)."""
    from datetime import datetime, timezone

    from sqlalchemy import insert

    from callctl.core.numbers import mask
    from callctl.store.crypto import number_hash
    from callctl.store.models import Cdr

    li, wang, zhao, tenant = api["ops:li"], api["ops:wang"], api["ops:zhao"], api["tenant"]
    with api["engine"].begin() as conn:  # a call the agent line placed: the evidence
        cdr_id = conn.execute(insert(Cdr).values(
            call_id="api-bl-1", tenant_id=1, direction="to_customer", decision="bridged",
            started_at=datetime.now(timezone.utc), caller_hash=number_hash(AGENT), caller_masked=mask(AGENT),
        ).returning(Cdr.id)).scalar_one()
    refused = li.post("/v1/blacklist/entries", json={"caller": AGENT, "reason": "harassment complaints"})
    assert (refused.status_code, refused.json()["error"]["code"]) == (422, "no_evidence")
    assert tenant.post("/v1/blacklist/entries", json={"caller": AGENT, "reason": "x", "cdrs": [cdr_id]}
                       ).status_code == 403
    made = li.post("/v1/blacklist/entries", json={"caller": AGENT, "reason": "harassment complaints",
                                                  "cdrs": [cdr_id]})
    assert made.status_code == 201, made.text
    entry = made.json()
    assert (entry["status"], entry["caller"]) == ("proposed", mask(AGENT)) and AGENT not in made.text
    twice = wang.post("/v1/blacklist/entries", json={"caller": AGENT, "reason": "again", "cdrs": [cdr_id]})
    assert (twice.status_code, twice.json()["error"]["code"]) == (409, "blacklist_open")  # as documented
    assert li.post(f"/v1/blacklist/entries/{entry['id']}/approve").json()["error"]["code"] == "self_approval"
    assert wang.post(f"/v1/blacklist/entries/{entry['id']}/approve").status_code == 200
    assert isinstance(route(api["engine"], AGENT), Bridge)  # one approval: not yet
    in_force = zhao.post(f"/v1/blacklist/entries/{entry['id']}/approve")
    assert in_force.status_code == 200 and in_force.json()["status"] == "active", in_force.text
    assert route(api["engine"], AGENT).reason == Reason.BLACKLISTED
    assert [e["id"] for e in li.get("/v1/blacklist/entries", params={"status": "active"}).json()] == [entry["id"]]
    seen = tenant.get("/v1/blacklist")
    assert seen.status_code == 200 and [e["id"] for e in seen.json()] == [entry["id"]]
    appealed = tenant.post(f"/v1/blacklist/entries/{entry['id']}/appeal", json={"note": "wrong line"})
    assert appealed.status_code == 403  # appeals go through platform staff
    assert li.post(f"/v1/blacklist/entries/{entry['id']}/appeal", json={"note": ""}).status_code == 422
    lifted = wang.post(f"/v1/blacklist/entries/{entry['id']}/lift", json={"note": "complaint withdrawn"})
    assert lifted.status_code == 200 and lifted.json()["status"] == "lifted", lifted.text
    assert isinstance(route(api["engine"], AGENT), Bridge)
    again = wang.post(f"/v1/blacklist/entries/{entry['id']}/lift", json={})
    assert again.status_code == 409, again.text
    missing = li.get("/v1/blacklist/entries/987654")
    assert missing.status_code == 404
