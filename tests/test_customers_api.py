"""The insurer's read API and the customers' preferences over HTTP (issue #16), the real
`callctl serve api` on SQLite and PostgreSQL: GET /v1/cdrs and /v1/findings for a tenant
token (its own rows only, masked, the CLI's filters, cursor paging that reads every row
once), GET/PUT /v1/customers/preferences by customer number (consent required, masked)."""
from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from callctl.store import calls
from callctl.store.db import make_engine
from callctl.store.models import AnomalyFinding
from lab.harness import ApiServer
from tests import leaks, realnumbers
from tests.apiclients import clients as api_clients, provisioned

AGENT, HOTLINE, OTHER_HOTLINE = realnumbers.tenant_line("+8613900000191", "+861058000191", "+861058000192")
CUSTOMER = "+8613800000191"
X_ACME, X_OTHER = "+8617100019101", "+8617100019201"
T0 = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=1)


def _cdr(n: int, tenant: int, decision: str, reason: str | None = None) -> dict:
    return {"call_id": f"api-{tenant}-{n}", "tenant_id": tenant, "binding_id": None,
            "virtual_number": X_ACME if tenant == 1 else X_OTHER, "direction": "to_customer",
            "caller_masked": "+86139****0191", "caller_hash": "h", "callee_masked": "+86138****0191",
            "decision": decision, "reject_reason": reason, "started_at": T0 + timedelta(seconds=n // 2),
            "answered_at": None, "ended_at": T0 + timedelta(seconds=n + 5), "ring_seconds": None,
            "talk_seconds": None, "dial_status": None, "hangup_cause": 16, "node": "t"}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def api(request, tmp_path_factory):
    workdir, url, cli = provisioned(
        request, tmp_path_factory, "customers-api",
        ["tenant", "add", "acme", "--hotline", HOTLINE, "--caller", AGENT],
        ["tenant", "add", "other", "--hotline", OTHER_HOTLINE],
        ["pool", "add", "--tenant", "acme", X_ACME], ["pool", "add", "--tenant", "other", X_OTHER])
    engine = make_engine(url)
    # 7 calls of acme (two per start second: the cursor must split ties), 2 of other.
    calls.write_cdrs(engine, [_cdr(n, 1, "rejected" if n % 3 == 0 else "bridged", "opted_out" if n % 3 == 0 else None)
                              for n in range(7)] + [_cdr(n, 2, "bridged") for n in range(2)])
    with engine.begin() as conn:
        for tenant, n in ((1, 0), (1, 1), (1, 2), (2, 0)):
            conn.execute(AnomalyFinding.__table__.insert().values(
                rule="customer_frequency", tenant_id=tenant, subject_kind="binding", subject=str(n), binding_id=n,
                period=n, window_start=T0, window_end=T0 + timedelta(minutes=n), calls=5, measure=5, threshold=3,
                severity="medium", action="alert", evidence="[]"))
    engine.dispose()
    tokens = {t: json.loads(cli("token", "create", "--tenant", t, "--name", f"{t} app").stdout)["token"]
              for t in ("acme", "other")}

    def keep(response: httpx.Response):
        response.read()
        leaks.record("api", f"{response.request.method} {response.request.url.path}", response.text)

    with ApiServer(url, workdir) as server:
        made = api_clients(server.url, tokens, keep)
        yield {**made, "cli": cli}
        for client in made.values():
            client.close()


def _all_pages(client, path, **params):
    seen, cursor = [], None
    while True:
        page = client.get(path, params={**params, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        seen += page.json()["items"]
        cursor = page.json()["next"]
        if cursor is None:
            return seen


def test_cdrs_own_rows_only_masked_each_once_across_pages(api):
    rows = _all_pages(api["acme"], "/v1/cdrs", limit=2)
    assert sorted(r["call_id"] for r in rows) == sorted(f"api-1-{n}" for n in range(7))
    assert [r["started_at"] for r in rows] == sorted((r["started_at"] for r in rows), reverse=True)
    assert all(r["callee_masked"] == "+86138****0191" and "caller_hash" not in r for r in rows)
    refused = _all_pages(api["acme"], "/v1/cdrs", reason="opted_out", limit=1)
    assert sorted(r["call_id"] for r in refused) == ["api-1-0", "api-1-3", "api-1-6"]
    assert [r["call_id"] for r in _all_pages(api["other"], "/v1/cdrs")] == ["api-2-1", "api-2-0"]
    bad = api["acme"].get("/v1/cdrs", params={"cursor": "not-a-cursor"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_cursor"
    bad = api["acme"].get("/v1/cdrs", params={"reason": "nonsense"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_filter"


def test_findings_own_rows_only_paged(api):
    rows = _all_pages(api["acme"], "/v1/findings", limit=2)
    assert [r["binding_id"] if "binding_id" in r else r["subject"] for r in rows] in (["2", "1", "0"], [2, 1, 0])
    assert all(r["tenant"] == "acme" for r in rows)
    assert len(_all_pages(api["other"], "/v1/findings")) == 1


def test_preferences_need_consent_and_are_answered_masked(api):
    missing = api["acme"].put("/v1/customers/preferences", json={"customer": CUSTOMER, "calls": "none"})
    assert missing.status_code == 422 and CUSTOMER not in missing.text
    body = {"customer": CUSTOMER, "calls": "service_only", "channel": "app", "consent_source": "acme app v5",
            "consent_at": (datetime.now(timezone.utc) - timedelta(minutes=1)).isoformat()}
    done = api["acme"].put("/v1/customers/preferences", json=body)
    assert done.status_code == 200, done.text
    assert done.json()["customer"] == "+86138****0191" and done.json()["updated_by"].startswith("tenant:acme")
    got = api["acme"].get("/v1/customers/preferences", params={"customer": CUSTOMER}).json()
    assert got["calls"] == "service_only" and got["channel"] == "app" and got["consent_source"] == "acme app v5"
    # Another tenant's view of the same customer is its own (never set: the defaults).
    assert api["other"].get("/v1/customers/preferences", params={"customer": CUSTOMER}).json()["calls"] == "allowed"
    future = {**body, "consent_at": (datetime.now(timezone.utc) + timedelta(days=1)).isoformat()}
    assert api["acme"].put("/v1/customers/preferences", json=future).json()["error"]["code"] == "invalid_consent"
    audit = api["cli"]("audit", "export")
    assert audit.returncode == 0 and "preference_set" in audit.stdout and CUSTOMER not in audit.stdout


def test_quiet_hours_the_schema_states_what_the_server_refuses(api):
    """The OpenAPI document states the form of quiet_hours: what it allows is taken (bar
    equal ends, which its description names), what it refuses is refused by the schema
    (invalid_request), never by a rule the schema does not state (#15 item 10)."""
    field = api["acme"].get("/openapi.json").json()["components"]["schemas"]["PreferenceIn"]["properties"]["quiet_hours"]
    pattern = next(option["pattern"] for option in field["anyOf"] if "pattern" in option)
    body = {"customer": CUSTOMER, "consent_source": "acme app v5",
            "consent_at": (datetime.now(timezone.utc) - timedelta(minutes=1)).isoformat()}
    for hours in ("22:00-07:00", "", "12:30-13:00", "23:59-24:00", "99:99-xx:00", "24:00-07:00", "0\u0668:00-21:00",
                  " 22:00-07:00", "22:00-07:00\n", "22:00"):
        answer = api["acme"].put("/v1/customers/preferences", json={**body, "quiet_hours": hours})
        if re.fullmatch(pattern, hours):  # as a client checks it (ECMA: $ is the very end)
            assert answer.status_code == 200, (hours, answer.text)
        else:
            assert (answer.status_code, answer.json()["error"]["code"]) == (422, "invalid_request"), (hours, answer.text)
    equal = api["acme"].put("/v1/customers/preferences", json={**body, "quiet_hours": "22:00-22:00"})
    assert equal.json()["error"]["code"] == "invalid_hours" and "differ" in field["description"]
    # Only ASCII digits are hours, on the command line too (other scripts' digits were
    # stored, and no call to that customer or tenant could then be decided).
    for args in (["customer", "set", "--tenant", "acme", "--customer", CUSTOMER, "--quiet-hours", "0\u0668:00-21:00"],
                 ["tenant", "update", "acme", "--hours", "0\u0668:00-21:00"]):
        refused = api["cli"](*args)
        assert refused.returncode == 1 and "[invalid_hours]" in refused.stderr, refused.stderr
