"""The provisioning HTTP API as an insurer's system uses it: `callctl serve api` as a
subprocess on a real loopback socket, tokens made with the real CLI, on SQLite and
PostgreSQL. Every response body of the session is kept and, last, searched for the real
numbers used here."""
from __future__ import annotations

import json
import re
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from lab.harness import ApiServer
from tests import leaks, realnumbers
from tests.apiclients import clients as api_clients, provisioned

AGENT, HOTLINE = realnumbers.tenant_line("+8613900000001", "+861058000000")
realnumbers.tenant_line("+861058000001")  # tenant "other"'s hotline
A, A2, B = "+8613800000001", "+8613800000002", "+8613800000003"
OTHER_CUSTOMER = "+447911123456"  # a UK mobile: other countries work too
REAL_NUMBERS = [A, A2, B, OTHER_CUSTOMER]
X_ACME = [f"+86171000000{i:02d}" for i in range(1, 7)]
X_OTHER = "+8617200000001"

BODIES: dict[str, list[str]] = {"sqlite": [], "postgresql": []}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def api(request, tmp_path_factory):
    """A provisioned database, the API server on it, and a token per tenant."""
    workdir, url, cli = provisioned(
        request, tmp_path_factory, "api",
        ["tenant", "add", "acme", "--hotline", HOTLINE, "--caller", AGENT],
        ["tenant", "add", "other", "--hotline", "+861058000001"],
        ["pool", "add", "--tenant", "acme", *X_ACME],
        ["pool", "add", "--tenant", "other", X_OTHER])
    tokens = {}
    for tenant in ("acme", "other"):
        made = cli("token", "create", "--tenant", tenant, "--name", f"{tenant} policy system")
        assert made.returncode == 0, made.stderr
        tokens[tenant] = json.loads(made.stdout)
    bodies = BODIES[request.param]

    def keep(response: httpx.Response):
        response.read()
        bodies.append(response.text)
        leaks.record("api", f"{response.request.method} {response.request.url.path}", response.text)

    with ApiServer(url, workdir) as server:
        clients = api_clients(server.url, {tenant: t["token"] for tenant, t in tokens.items()}, keep, nobody=True)
        yield {"kind": request.param, "cli": cli, "tokens": tokens, "server": server, "bodies": bodies, "url": url,
               "workdir": workdir, **clients}
        for client in clients.values():
            client.close()
        log = server.output()
    for number in REAL_NUMBERS:
        assert number[3:] not in log, "a real number reached the API server's log"


def err(response: httpx.Response) -> tuple[int, str]:
    body = response.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    return response.status_code, body["error"]["code"]


def test_create_get_list_extend_update_delete(api):
    acme = api["acme"]
    expires = (datetime.now(timezone.utc) + timedelta(days=365)).replace(microsecond=0)
    made = acme.post("/v1/bindings", json={"customer": A, "reference": "POL-1", "expires_at": expires.isoformat()})
    assert made.status_code == 201, made.text
    binding = made.json()
    assert binding["x"] in X_ACME and binding["customer"] == "+86138****0001" and binding["mode"] == "AXN"
    assert binding["tenant"] == "acme" and binding["status"] == "active"
    assert datetime.fromisoformat(binding["expires_at"]) == expires
    path = f"/v1/bindings/{binding['id']}"
    assert acme.get(path).json() == binding
    temporary = acme.post("/v1/bindings", json={"customer": "13800000002", "reference": "POL-2", "ttl_seconds": 3600})
    assert temporary.status_code == 201 and temporary.json()["customer"] == "+86138****0002"

    page = acme.get("/v1/bindings", params={"limit": 1}).json()
    assert [b["id"] for b in page["items"]] == [binding["id"]] and page["next"] == binding["id"]
    second = acme.get("/v1/bindings", params={"limit": 1, "after": page["next"]}).json()
    assert [b["id"] for b in second["items"]] == [temporary.json()["id"]]
    assert [b["id"] for b in acme.get("/v1/bindings", params={"reference": "POL-2"}).json()["items"]] == \
        [temporary.json()["id"]]

    renewed = acme.post(f"{path}/extend", json={"ttl_seconds": 86400})
    assert renewed.status_code == 200
    assert datetime.fromisoformat(renewed.json()["expires_at"]) < expires
    assert acme.post(f"{path}/extend", json={"expires_at": None}).json()["expires_at"] is None
    changed = acme.patch(path, json={"customer": A2, "reference": "POL-1b"})
    assert changed.status_code == 200 and changed.json()["customer"] == "+86138****0002"
    assert changed.json()["reference"] == "POL-1b"

    ended = acme.delete(path)
    assert ended.status_code == 200 and ended.json()["status"] == "ended"
    assert err(acme.delete(path)) == (409, "binding_ended")
    assert err(acme.post(f"{path}/extend", json={"ttl_seconds": 60})) == (409, "binding_ended")
    assert acme.get("/v1/bindings", params={"status": "ended"}).json()["items"][0]["id"] == binding["id"]
    assert acme.get("/v1/pool").json() == {"free": 4, "bound": 1, "quarantined": 1, "disabled": 0}


def test_modes_and_other_countries(api):
    acme = api["acme"]
    pair = acme.post("/v1/bindings", json={"customer": OTHER_CUSTOMER, "mode": "AXB", "other_party": B})
    assert pair.status_code == 201, pair.text
    assert pair.json()["customer"] == "+44791***3456" and pair.json()["other_party"] == "+86138****0003"
    shared = acme.post("/v1/bindings", json={"customer": A, "mode": "AXE"})
    assert shared.status_code == 201 and len(shared.json()["extension"]) == 4
    assert err(acme.post("/v1/bindings", json={"customer": A, "mode": "AXB"})) == (422, "missing_other_party")
    for made in (pair, shared):
        assert acme.delete(f"/v1/bindings/{made.json()['id']}").status_code == 200


def test_tenant_isolation(api):
    acme, other = api["acme"], api["other"]
    mine = acme.post("/v1/bindings", json={"customer": A, "reference": "POL-ISO"}).json()
    path = f"/v1/bindings/{mine['id']}"
    for response in (other.get(path), other.post(f"{path}/extend", json={"ttl_seconds": 60}),
                     other.patch(path, json={"customer": B}), other.delete(path)):
        assert err(response) == (404, "binding_not_found")
    assert err(other.get("/v1/bindings/999999")) == (404, "binding_not_found")  # same answer as missing
    assert other.get("/v1/bindings", params={"reference": "POL-ISO"}).json()["items"] == []
    assert all(b["tenant"] == "other" for b in other.get("/v1/bindings").json()["items"])
    assert other.get("/v1/pool").json()["free"] == 1
    still = acme.get(path).json()
    assert still["status"] == "active" and still["customer"] == "+86138****0001"
    assert acme.delete(path).status_code == 200


def test_authentication(api):
    nobody = api["nobody"]
    assert err(nobody.get("/v1/pool")) == (401, "unauthorized")
    assert err(nobody.get("/v1/pool", headers={"Authorization": "Bearer cc_not-a-token"})) == (401, "unauthorized")
    assert err(nobody.get("/v1/pool", headers={"Authorization": "Basic dXNlcjpwYXNz"})) == (401, "unauthorized")
    made = json.loads(api["cli"]("token", "create", "--tenant", "other").stdout)
    header = {"Authorization": f"Bearer {made['token']}"}
    assert nobody.get("/v1/pool", headers=header).status_code == 200
    assert api["cli"]("token", "revoke", str(made["id"])).returncode == 0
    # Refused once the server's remembered acceptance is older than api.token_cache_seconds
    # (5 s; tests/test_api_tokens.py pins the bound with a clock of its own): a deadline, not a timing.
    deadline = time.monotonic() + 60
    while nobody.get("/v1/pool", headers=header).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert err(nobody.get("/v1/pool", headers=header)) == (401, "unauthorized")
    assert err(nobody.post("/v1/bindings", headers=header, json={"customer": A})) == (401, "unauthorized")
    listed = api["cli"]("token", "list").stdout
    assert made["token"] not in listed and api["tokens"]["acme"]["token"] not in listed
    bad = api["cli"]("token", "create", "--tenant", "acme", "--role", "wizard")
    assert bad.returncode == 1 and "invalid_role" in bad.stderr


@pytest.mark.parametrize("method, path, body, expected", [
    ("post", "/v1/bindings", {"customer": "12345"}, (422, "invalid_number")),
    ("post", "/v1/bindings", {"customer": A, "ttl_seconds": -1}, (422, "invalid_request")),  # the schema says ge=1
    ("post", "/v1/bindings", {"customer": A, "expires_at": "2020-01-01T00:00:00Z"}, (422, "invalid_expiry")),
    ("post", "/v1/bindings", {"customer": A, "expires_at": "2030-01-01T00:00:00"}, (422, "invalid_expiry")),
    ("post", "/v1/bindings", {"customer": A, "mode": "AXZ"}, (422, "invalid_request")),
    ("post", "/v1/bindings", {"customer": A, "colour": "red"}, (422, "invalid_request")),
    ("post", "/v1/bindings", {"customer": 8613800000001}, (422, "invalid_request")),  # not echoed back
    ("post", "/v1/bindings", {"other_party": A}, (422, "invalid_request")),
    ("post", "/v1/bindings", "not json", (422, "invalid_request")),
    ("post", "/v1/bindings/1/extend", {}, (422, "invalid_expiry")),
    ("patch", "/v1/bindings/1", {}, (422, "invalid_request")),
    ("get", "/v1/bindings?limit=0", None, (422, "invalid_request")),
    ("get", "/v1/bindings?status=gone", None, (422, "invalid_request")),
    ("get", "/v1/bindings/abc", None, (422, "invalid_request")),
    ("get", "/v2/nothing", None, (404, "not_found")),
    ("put", "/v1/pool", None, (405, "method_not_allowed")),
])
def test_bad_requests_get_json_errors_and_change_nothing(api, method, path, body, expected):
    acme = api["acme"]
    before = acme.get("/v1/pool").json()
    kwargs = {"content": body} if isinstance(body, str) else {"json": body} if body is not None else {}
    response = acme.request(method.upper(), path, **kwargs)
    assert err(response) == expected
    assert acme.get("/v1/pool").json() == before


def test_exhausted_pool_is_a_clear_409(api):
    other = api["other"]
    made = other.post("/v1/bindings", json={"customer": A})
    assert made.status_code == 201
    assert err(other.post("/v1/bindings", json={"customer": B})) == (409, "pool_exhausted")
    other.delete(f"/v1/bindings/{made.json()['id']}")
    assert err(other.post("/v1/bindings", json={"customer": B})) == (409, "pool_exhausted")  # quarantined


def test_openapi_document(api):
    document = api["nobody"].get("/openapi.json")
    assert document.status_code == 200
    paths = document.json()["paths"]
    assert {"/v1/bindings", "/v1/bindings/{binding_id}", "/v1/bindings/{binding_id}/extend", "/v1/pool"} <= set(paths)
    assert set(paths["/v1/bindings/{binding_id}"]) == {"get", "patch", "delete"}
    assert api["nobody"].get("/docs").status_code == 200


def test_several_worker_processes_serve_the_same_api(api):
    with ApiServer(api["url"], api["workdir"] / "workers", extra_env={"CALLCTL_API_WORKERS": "2"}) as server:
        headers = {"Authorization": f"Bearer {api['tokens']['other']['token']}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
            answers = [client.get("/v1/pool") for _ in range(20)]
    assert all(a.status_code == 200 and a.json()["free"] + a.json()["bound"] + a.json()["quarantined"] == 1
               for a in answers)


def test_no_response_body_carried_a_real_number(api):
    """Runs last for each database: every body the API sent in this module."""
    bodies = api["bodies"]
    assert len(bodies) > 50
    digits = [re.sub(r"\D", "", n) for n in REAL_NUMBERS]
    for body in bodies:
        flat = re.sub(r"\D", "", body)
        for number in digits:
            assert number[-10:] not in flat, f"a real number in a response: {body[:200]}"
