"""Every input to the HTTP API gets a documented JSON error, never a 500, and the OpenAPI
document is the contract: every status an operation returns is declared there, every
constraint the server enforces is in its schema, a method a path does not have is 405.
`callctl serve api` as a subprocess on a real socket, SQLite and PostgreSQL (issue 15,
item 10), and Hypothesis fuzzing of request bodies and query strings."""
from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import create_engine, func, select

from callctl.api.app import create_app
from callctl.store.db import make_engine
from callctl.store.models import BlacklistEntry, Binding, Block, CustomerPreference, RevealGrant
from lab.harness import ApiServer, free_port
from tests import leaks, realnumbers
from tests.apiclients import clients as api_clients, provisioned

AGENT, HOTLINE = realnumbers.tenant_line("+8613900007001", "+861058007000")
CUSTOMER, OTHER = realnumbers.person("+8613800007001", "+8613800007002")
POOL = ["+8617100007001", "+8617100007002", "+8617100007003"]
BIG = 2 ** 63  # one past the largest id SQLite and PostgreSQL store
JSON = {"content-type": "application/json"}
DOCS = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def documented_codes() -> set[str]:
    """The error codes docs/api.md lists in its Errors table."""
    text = DOCS.read_text()
    table = text[text.index("## Errors"):]
    end = table.find("\n\n", table.index("| HTTP"))
    table = table[:end if end > 0 else None]
    return set(re.findall(r"`([a-z_]+)`", table))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def api(request, tmp_path_factory):
    workdir, url, cli = provisioned(
        request, tmp_path_factory, "api-hardening",
        ["tenant", "add", "acme", "--hotline", HOTLINE, "--caller", AGENT, "--hours", "00:00-24:00"],
        ["pool", "add", "--tenant", "acme", *POOL], ["bind", "--tenant", "acme", "--customer", CUSTOMER])
    issued = {role: json.loads(cli("token", "create", "--role", role, *(["--tenant", "acme"] if role == "tenant" else []),
                                   "--name", f"ops:{role}").stdout)["token"] for role in ("platform", "tenant", "regulator")}

    def keep(response: httpx.Response):
        response.read()
        leaks.record("api", f"{response.request.method} {response.request.url.path}", response.text)

    engine = make_engine(url)
    # its own metrics port: other API servers (other test runs) may hold the default one
    with ApiServer(url, workdir, extra_env={"CALLCTL_API_METRICS_LISTEN": f"127.0.0.1:{free_port()}"}) as server:
        clients = api_clients(server.url, issued, keep, nobody=True)
        openapi = clients["nobody"].get("/openapi.json").json()
        yield {"engine": engine, "openapi": openapi, "kind": request.param, **clients}
        for client in clients.values():
            client.close()
        log = server.output()
    leaks.record("log", "callctl serve api", log)
    assert "Traceback" not in log
    engine.dispose()


def counts(engine) -> tuple[int, ...]:
    """Rows an API call may write: nothing may be half-written by a refused request."""
    with engine.connect() as conn:
        return tuple(conn.execute(select(func.count()).select_from(model)).scalar_one()
                     for model in (Binding, Block, RevealGrant, CustomerPreference, BlacklistEntry))


def operation(openapi: dict, method: str, path: str) -> dict | None:
    """The OpenAPI operation serving this request, or None."""
    for template, item in openapi["paths"].items():
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if re.match(pattern, path) and method.lower() in item:
            return item[method.lower()]
    return None


def check_error(api, response: httpx.Response, codes=None) -> str:
    """A documented JSON 4xx error, declared for its operation; returns its code."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers["content-type"]
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    code = body["error"]["code"]
    assert code in (codes or documented_codes()), code
    check_declared(api, response)
    return code


def check_declared(api, response: httpx.Response) -> None:
    request = response.request
    found = operation(api["openapi"], request.method, request.url.path)
    if found is None:  # no such operation: 404 or 405, which every path documents (docs/api.md)
        assert response.status_code in (404, 405), response.status_code
        return
    assert str(response.status_code) in found["responses"], (request.method, request.url.path,
                                                              response.status_code, sorted(found["responses"]))


BAD_BINDINGS = [
    {"customer": CUSTOMER, "ttl_seconds": 1e20},
    {"customer": CUSTOMER, "ttl_seconds": 10 ** 20},
    {"customer": CUSTOMER, "ttl_seconds": -5},
    {"customer": CUSTOMER, "expires_at": "9999-12-31T23:59:59-14:00"},
    {"customer": CUSTOMER, "expires_at": "0001-01-01T00:00:00+14:00"},
    {"customer": CUSTOMER, "reference": "POL\x00-1"},
    {"customer": CUSTOMER, "reference": "POL\udcff"},
    {"customer": ""},
    {"customer": CUSTOMER + "\x00"},
    {"customer": CUSTOMER, "mode": "AXB", "other_party": "\x00"},
]


@pytest.mark.parametrize("body", BAD_BINDINGS, ids=range(len(BAD_BINDINGS)))
def test_bad_binding_bodies_get_a_documented_json_4xx_and_write_nothing(api, body):
    before = counts(api["engine"])
    response = api["tenant"].post("/v1/bindings", content=json.dumps(body), headers=JSON)
    check_error(api, response)
    assert counts(api["engine"]) == before


def test_out_of_range_ids_times_and_bad_bytes_get_documented_json_4xx(api):
    tenant, platform = api["tenant"], api["platform"]
    before = counts(api["engine"])
    requests = [
        tenant.get(f"/v1/bindings/{BIG}"), tenant.get(f"/v1/bindings/{10 ** 30}"), tenant.get("/v1/bindings/-1"),
        tenant.get(f"/v1/bindings?after={BIG}"), tenant.get("/v1/bindings?after=-1"),
        tenant.get(f"/v1/bindings?limit={BIG}"),
        tenant.patch(f"/v1/bindings/{BIG}", json={"reference": "x"}),
        tenant.patch("/v1/bindings/1", json={"reference": "a\x00b"}),
        tenant.post(f"/v1/bindings/{BIG}/extend", json={"ttl_seconds": 60}),
        tenant.post("/v1/bindings/1/extend", json={"ttl_seconds": 1e20}),
        tenant.post("/v1/bindings/1/extend", json={"expires_at": "9999-12-31T23:59:59-14:00"}),
        tenant.delete(f"/v1/bindings/{BIG}"),
        platform.post("/v1/blocks", json={"scope": "tenant", "tenant": "acme", "direction": "both", "reason": "r",
                                          "by": "ops:li", "duration_seconds": 1e20}),
        platform.post("/v1/blocks", json={"scope": "tenant", "tenant": "acme", "direction": "both", "reason": "r",
                                          "by": "ops:li", "ends_at": "9999-12-31T23:59:59-14:00"}),
        platform.post("/v1/blocks", json={"scope": "binding", "binding_id": BIG, "direction": "both", "reason": "r",
                                          "by": "ops:li"}),
        platform.post("/v1/blocks", json={"scope": "tenant", "tenant": "ac\x00me", "direction": "both",
                                          "reason": "r", "by": "ops:li"}),
        platform.get(f"/v1/blocks?binding_id={BIG}"),
        platform.delete(f"/v1/blocks/{BIG}?by=ops:li"),
        platform.post("/v1/reveals", json={"binding_id": BIG, "scenario": "claim", "case_reference": "C-1"}),
        platform.get(f"/v1/reveals?binding_id={BIG}"),
        platform.post(f"/v1/reveals/{BIG}/approve", json={}),
        tenant.post("/v1/bindings", content=b'{"customer": "\xff\xfe"}', headers={"content-type": "application/json"}),
        tenant.post("/v1/bindings", content=b"[" * 100_000 + b"]" * 100_000,
                    headers={"content-type": "application/json"}),
        tenant.post("/v1/bindings", content=b'{"customer": ' * 5000 + b"1" + b"}" * 5000,
                    headers={"content-type": "application/json"}),
        tenant.post("/v1/bindings", content=b"not json", headers={"content-type": "application/json"}),
        tenant.post("/v1/bindings", content=b"{}", headers={"content-type": "text/plain"}),
    ]
    for response in requests:
        check_error(api, response)
    assert counts(api["engine"]) == before


@pytest.mark.parametrize("method, path", [
    ("PUT", "/v1/bindings"), ("DELETE", "/v1/bindings"), ("PUT", "/v1/bindings/1"), ("GET", "/v1/bindings/1/extend"),
    ("POST", "/v1/pool"), ("PATCH", "/v1/blocks"), ("GET", "/v1/reveals/1/approve"), ("PUT", "/v1/audit"),
])
def test_a_method_a_path_does_not_have_gets_405(api, method, path):
    for who in ("nobody", "tenant"):
        response = api[who].request(method, path, json={})
        assert response.status_code == 405, (who, method, path, response.status_code)
        assert check_error(api, response) == "method_not_allowed"
        assert response.headers.get("allow")


def test_openapi_states_the_constraints_the_server_enforces(api):
    schemas = api["openapi"]["components"]["schemas"]
    binding_in = schemas["BindingIn"]["properties"]
    assert binding_in["customer"]["minLength"] == 1
    for field in ("ttl_seconds",):
        bounded = [b for b in binding_in[field].get("anyOf", [binding_in[field]]) if b.get("type") == "integer"][0]
        assert bounded["minimum"] >= 1 and bounded["maximum"] < BIG
    duration = [b for b in schemas["BlockIn"]["properties"]["duration_seconds"]["anyOf"] if b.get("type") == "integer"][0]
    assert duration["minimum"] >= 1 and duration["maximum"] < BIG
    # ids in paths and queries: no larger than the database stores
    for template, item in api["openapi"]["paths"].items():
        for op in item.values():
            for parameter in op.get("parameters", []):
                schema = parameter["schema"]
                for option in schema.get("anyOf", [schema]):
                    if option.get("type") == "integer":
                        assert option.get("maximum", BIG) < BIG, (template, parameter["name"])
    # every operation declares the errors every request can get
    for template, item in api["openapi"]["paths"].items():
        for method, op in item.items():
            if template.startswith("/v1/"):
                assert {"401", "422"} <= set(op["responses"]), (method, template)


def test_a_body_valid_by_the_schema_is_not_refused_for_an_unstated_reason(api):
    """An empty customer is refused with 422: the schema states it (minLength)."""
    response = api["tenant"].post("/v1/bindings", json={"customer": ""})
    assert check_error(api, response) == "invalid_request"


# --- fuzzing: bodies and query strings ------------------------------------------------

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30),
    st.sampled_from([CUSTOMER, OTHER, CUSTOMER[3:], POOL[0], "AXN", "AXB", "AXE", "acme", "tenant", "binding",
                     "both", "claim", "9999-12-31T23:59:59-14:00", "2030-01-01T00:00:00Z", "\x00", "1e20"]),
)
_json = st.recursive(_scalars, lambda children: st.one_of(st.lists(children, max_size=3),
                                                          st.dictionaries(st.text(max_size=8), children, max_size=3)),
                     max_leaves=8)
# Every operation of the API (its OpenAPI document, made without a database), the token
# that may call it, every query parameter and every body field any of them takes.
_DOC = create_app(create_engine("sqlite://"), quarantine=timedelta(0)).openapi()
_ROLES = {"/exports/regulator": "regulator", "/regulator/": "regulator", "/v1/blocks": "platform",
          "/v1/reveals": "platform", "/v1/audit": "platform", "/v1/blacklist/entries": "platform"}
_ENDPOINTS = [(next((role for prefix, role in _ROLES.items() if path.startswith(prefix)), "tenant"), method.upper(), path)
              for path, item in _DOC["paths"].items() for method in item]
_QUERY_KEYS = sorted({p["name"] for item in _DOC["paths"].values() for op in item.values()
                      for p in op.get("parameters", []) if p["in"] == "query"})
_FIELDS = sorted({field for name, schema in _DOC["components"]["schemas"].items() if name.endswith("In")
                  for field in schema.get("properties", {})})
_bodies = st.one_of(st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=6), _json)
_query_value = st.one_of(st.integers(min_value=-(2 ** 70), max_value=2 ** 70).map(str), st.text(max_size=20),
                         st.sampled_from(["1", "0", str(BIG), "active", "ops:li", "\x00", "%ff", "2h",
                                          "2030-01-01T00:00:00Z", "rejected", "opted_out", "csv", "html", CUSTOMER]))


def test_the_fuzzer_calls_every_operation_of_the_openapi_document(api):
    served = {(method.upper(), path) for path, item in api["openapi"]["paths"].items() for method in item}
    assert {(method, path) for _, method, path in _ENDPOINTS} == served and len(served) >= 32


# Each operation gets a third of the profile's examples (tests/conftest.py; the profile
# is loaded before this module is read, --hypothesis-profile fuzz-long included).
@pytest.mark.parametrize("endpoint", _ENDPOINTS, ids=[f"{m} {p}" for _, m, p in _ENDPOINTS])
@settings(deadline=None, max_examples=max(5, settings().max_examples // 3),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=_bodies, raw=st.one_of(st.none(), st.binary(max_size=60)),
       query=st.dictionaries(st.sampled_from(_QUERY_KEYS), _query_value, max_size=3),
       ident=st.one_of(st.integers(min_value=-5, max_value=2 ** 70).map(str), st.text(max_size=10)))
def test_fuzz_api_bodies_and_queries(api, endpoint, body, raw, query, ident):
    who, method, template = endpoint
    path = re.sub(r"\{[^}]+\}", quote(ident, safe="") if ident.strip(".") else "1", template)
    before = counts(api["engine"])
    content = raw if raw is not None else json.dumps(body).encode()
    kwargs = {"params": query}
    if method in ("POST", "PATCH", "PUT"):
        kwargs.update(content=content, headers={"content-type": "application/json"})
    response = api[who].request(method, path, **kwargs)
    assert response.status_code < 500 or response.status_code == 503 and response.json()["error"]["code"] == "pool_busy", \
        (response.status_code, response.text)
    if response.status_code >= 400:
        check_error(api, response)
        assert counts(api["engine"]) == before
    else:
        check_declared(api, response)
    for number in (CUSTOMER, OTHER):
        assert number[3:] not in response.text


@pytest.mark.parametrize("method, path", [("DELETE", "/v1/bindings/%2F"), ("GET", "/v1/bindings/"),
                                          ("GET", "/v1/blacklist/entries/%2F")])
def test_a_trailing_slash_is_a_documented_404_not_a_redirect(api, method, path):
    """An id of "/" (found by the fuzzer) made Starlette answer 307 to the path without it."""
    who = "platform" if "blacklist" in path else "tenant"
    response = api[who].request(method, path)
    assert response.status_code == 404
    check_error(api, response)
