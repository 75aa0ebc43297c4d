"""The regulator's API role: `callctl serve api` as a subprocess on a real socket, tokens
made with the real CLI. A regulator token reads GET /exports/regulator and nothing else;
tenant tokens cannot read it."""
from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from callctl.service import CallService
from tests.agicalls import agi_call
from callctl.store.db import make_engine
from callctl.store.spool import CdrSpool
from lab.harness import ApiServer
from tests import leaks, realnumbers
from tests.apiclients import clients as api_clients, provisioned

AGENT, HOTLINE = realnumbers.tenant_line("+8613900000011", "+861058000011")
CUSTOMER = realnumbers.person("+8613800000011")
X = "+8617100000011"
T0 = datetime(2026, 11, 20, 8, 0, tzinfo=timezone.utc)
PERIOD = {"from": "2026-11-20", "to": "2026-11-22"}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def api(request, tmp_path_factory):
    workdir, url, cli = provisioned(
        request, tmp_path_factory, "api-regulator",
        ["tenant", "add", "acme", "--hotline", HOTLINE, "--caller", AGENT],
        ["pool", "add", "--tenant", "acme", X], ["bind", "--tenant", "acme", "--customer", CUSTOMER])
    engine = make_engine(url)
    service = CallService(engine, CdrSpool(workdir / "spool"))
    for n, action in enumerate(["bridge", "reject", "bridge"]):
        start = (T0 + timedelta(hours=n)).timestamp()
        service.record(agi_call(f"lab-{start:.0f}.{n}", called=X, caller=AGENT, destination=CUSTOMER,
                                    action=action, reason="blocked", tenant="1", start=f"{start:.3f}",
                                    end=f"{start + 20:.3f}", dial_status="ANSWER" if action == "bridge" else "",
                                    answered_ms="10000"))
    engine.dispose()
    tokens = {}
    for name, args in (("regulator", ["--role", "regulator"]), ("tenant", ["--tenant", "acme"])):
        made = cli("token", "create", *args, "--name", f"{name} token")
        assert made.returncode == 0, made.stderr
        tokens[name] = json.loads(made.stdout)["token"]
    assert cli("token", "create", "--role", "regulator", "--tenant", "acme").returncode == 1  # takes no tenant

    def keep(response: httpx.Response):
        response.read()
        leaks.record("api", f"{response.request.method} {response.request.url.path}", response.text)

    with ApiServer(url, workdir) as server:
        clients = api_clients(server.url, tokens, keep, nobody=True)
        yield clients
        for client in clients.values():
            client.close()


def test_regulator_reads_the_export_in_every_format(api):
    got = api["regulator"].get("/exports/regulator", params={**PERIOD, "format": "json"})
    assert got.status_code == 200 and got.headers["content-type"].startswith("application/json")
    (acme,) = got.json()["tenants"]
    assert (acme["tenant"], acme["calls"], acme["answered"], acme["blocked"]) == ("acme", 3, 2, 1)
    table = api["regulator"].get("/exports/regulator", params={**PERIOD, "format": "csv"})
    assert table.headers["content-type"].startswith("text/csv")
    assert next(csv.DictReader(io.StringIO(table.text.split("\n\n")[0])))["calls"] == "3"
    page = api["regulator"].get("/exports/regulator", params={**PERIOD, "format": "html"})
    assert page.headers["content-type"].startswith("text/html") and "<svg" in page.text
    assert api["regulator"].get("/exports/regulator", params=PERIOD).json()["tenants"][0]["calls"] == 3  # json by default


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/bindings"), ("GET", "/v1/bindings/1"), ("GET", "/v1/pool"), ("DELETE", "/v1/bindings/1"),
])
def test_regulator_token_reads_nothing_else(api, method, path):
    got = api["regulator"].request(method, path)
    assert got.status_code == 403 and got.json()["error"]["code"] == "forbidden"


def test_regulator_token_cannot_create_bindings(api):
    got = api["regulator"].post("/v1/bindings", json={"customer": "+8613800000012"})
    assert got.status_code == 403


def test_tenant_tokens_and_strangers_cannot_read_the_export(api):
    assert api["tenant"].get("/exports/regulator", params=PERIOD).status_code == 403
    assert api["nobody"].get("/exports/regulator", params=PERIOD).status_code == 401
    assert api["tenant"].get("/v1/pool").status_code == 200  # the tenant token itself works


@pytest.mark.parametrize("params, code", [
    ({"from": "2026-11-22", "to": "2026-11-20"}, "invalid_period"),
    ({"from": "yesterday", "to": "2026-11-20"}, "invalid_period"),
    ({"from": "2026-11-20"}, "invalid_request"),
    ({**PERIOD, "format": "pdf"}, "invalid_request"),
])
def test_bad_export_requests_are_clear_errors(api, params, code):
    got = api["regulator"].get("/exports/regulator", params=params)
    assert got.status_code == 422 and got.json()["error"]["code"] == code


def test_regulator_reads_the_live_feed_page_by_page(api):
    """GET /regulator/events: the calls above, a page at a time, each once; `next`
    resumes; nothing new gives the same cursor back. Regulator tokens only."""
    seen, after = [], None
    while True:
        got = api["regulator"].get("/regulator/events", params={"limit": 2, **({"after": after} if after else {})})
        assert got.status_code == 200, got.text
        body = got.json()
        seen += body["events"]
        if not body["events"]:
            assert body["next"] == after and body["more"] is False
            break
        after = body["next"]
    calls = [e for e in seen if e["type"] == "call"]
    assert len(calls) == 3 == len({e["cdr_id"] for e in calls})
    assert {e["decision"] for e in calls} == {"bridged", "rejected"} and calls[0]["tenant"] == "acme"
    bad = api["regulator"].get("/regulator/events", params={"after": "nonsense"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_cursor"
    assert api["tenant"].get("/regulator/events").status_code == 403
    assert api["nobody"].get("/regulator/events").status_code == 401


def test_tenant_reads_its_part_of_the_blacklist(api):
    got = api["tenant"].get("/v1/blacklist")
    assert got.status_code == 200 and got.json() == []  # nothing on its callers
    assert api["regulator"].get("/v1/blacklist").status_code == 403


def test_tenant_reads_its_contact_register(api):
    today = (datetime.now(timezone.utc) + timedelta(minutes=5)).isoformat()  # a date-time: any hour of the day
    got = api["tenant"].get("/v1/exports/contacts", params={"as_of": today})
    assert got.status_code == 200 and got.headers["content-type"].startswith("text/csv"), got.text
    (row,) = list(csv.DictReader(io.StringIO(got.text)))
    assert (row["tenant"], row["contact_number"], row["status_as_of"]) == ("acme", X, "active")
    assert CUSTOMER[3:] not in got.text
    bad = api["tenant"].get("/v1/exports/contacts", params={"as_of": "soon"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_as_of"
    assert api["regulator"].get("/v1/exports/contacts", params={"as_of": today}).status_code == 403
