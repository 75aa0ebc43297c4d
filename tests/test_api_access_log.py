"""api.access_log: one line per request with method, path and status, never the query
string (GET /v1/customers/preferences?customer=<number> would put a real number in the
log) nor a number a client put in the path. The real `callctl serve api`; its whole
output goes to the suite's leak check."""
from __future__ import annotations

import json

import httpx

from lab import harness
from tests import leaks, realnumbers
from tests.test_cli import run

HOTLINE = realnumbers.tenant_line("+861058000081")
AGENT = realnumbers.tenant_line("+8613900000081")
CUSTOMER = realnumbers.person("+8613800000081")


def test_access_lines_carry_method_path_and_status_only(tmp_path):
    url = f"sqlite:///{tmp_path}/callctl.db"
    env = {"PATH": "/usr/bin:/bin", "CALLCTL_DATABASE_URL": url}
    for args in (["db", "upgrade"], ["tenant", "add", "acme", "--hotline", HOTLINE, "--caller", AGENT]):
        assert run(*args, env=env, cwd=tmp_path).returncode == 0
    token = json.loads(run("token", "create", "--tenant", "acme", "--name", "acme app", env=env,
                           cwd=tmp_path).stdout)["token"]
    conf = tmp_path / "callctl.yaml"
    conf.write_text("api:\n  access_log: true\n")
    api = harness.ApiServer(url, tmp_path, {"CALLCTL_CONFIG": str(conf)})
    with api, httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        asked = client.get("/v1/customers/preferences", params={"customer": CUSTOMER})
        odd = client.get(f"/v1/bindings/{CUSTOMER}")  # a number in the path: not a binding id
    output = api.output()
    leaks.record("log", "api-access-log", output)
    lines = [line for line in output.splitlines() if "api access:" in line]
    assert asked.status_code == 200 and odd.status_code == 404
    assert lines[-2].endswith("api access: GET /v1/customers/preferences 200"), output
    assert lines[-1].endswith("api access: GET /v1/bindings/+86138****0081 404"), output
    assert "customer=" not in output and "127.0.0.1:" not in " ".join(lines)
