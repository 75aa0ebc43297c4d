"""`callctl anomaly run` (one pass, and --follow until SIGTERM) and `callctl findings list`
as an operator runs them: real subprocesses on SQLite and PostgreSQL."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import insert

from callctl.store.db import make_engine
from callctl.store.models import Cdr
from tests.test_cli import AGENT, CALLCTL, HOTLINE, run

RULES = """
rules:
  customer_frequency: {calls: 3, window: 86400, action: block, block: {direction: to_customer, seconds: 3600}}
  caller_frequency: {enabled: false}
  tenant_frequency: {enabled: false}
  ultra_short: {enabled: false}
  declined_repeat: {enabled: false}
  off_hours: {enabled: false}
  blast: {enabled: false}
"""


@pytest.fixture
def setup(engine, tmp_path):
    """A migrated database of each kind with one tenant and binding, and the callctl command."""
    url = engine.url.render_as_string(hide_password=False)
    env = {"PATH": "/usr/bin:/bin", "CALLCTL_DATABASE_URL": url, "CALLCTL_SPOOL_DIR": str(tmp_path / "spool")}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return run(*args, env=env, cwd=tmp_path)

    cli.env, cli.cwd = env, tmp_path
    tenant = json.loads(cli("tenant", "add", "acme", "--hotline", HOTLINE, "--caller", AGENT).stdout)
    assert cli("pool", "add", "--tenant", "acme", "+8617100000001").returncode == 0
    binding = json.loads(cli("bind", "--tenant", "acme", "--customer", "+8613800000001").stdout)
    (tmp_path / "anomaly.yaml").write_text(RULES)

    def calls(count: int, start: datetime) -> None:
        engine = make_engine(url)
        with engine.begin() as conn:
            conn.execute(insert(Cdr), [{
                "call_id": f"cli-{start.timestamp()}-{i}", "tenant_id": tenant["id"],
                "binding_id": binding["id"], "direction": "to_customer", "decision": "bridged",
                "started_at": start + timedelta(minutes=i), "caller_hash": "agent"} for i in range(count)])
        engine.dispose()

    return cli, binding, calls, str(tmp_path / "anomaly.yaml")


def test_run_then_list_findings(setup):
    cli, binding, calls, rules = setup
    now = datetime.now(timezone.utc)
    calls(3, now - timedelta(minutes=10))
    run = cli("anomaly", "run", "--rules", rules)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["cdrs"] == 3 and report["new_findings"] == 1 and report["blocks"] == 1
    assert json.loads(cli("anomaly", "run", "--rules", rules).stdout)["new_findings"] == 0

    table = cli("findings", "list")
    assert table.returncode == 0 and "customer_frequency" in table.stdout
    assert f"binding {binding['id']}" in table.stdout and "(1 finding(s))" in table.stdout
    rows = json.loads(cli("findings", "list", "--json", "--tenant", "acme", "--rule", "customer_frequency").stdout)
    assert len(rows) == 1 and rows[0]["calls"] == 3 and len(rows[0]["evidence"]) == 3 and rows[0]["block_id"]
    later = (now + timedelta(hours=1)).isoformat()
    assert json.loads(cli("findings", "list", "--json", "--since", later).stdout) == []
    # The same forms as `cdr list --since` (one parser): an age counts back from now.
    assert [f["id"] for f in json.loads(cli("findings", "list", "--json", "--since", "2h").stdout)] == [rows[0]["id"]]
    assert json.loads(cli("findings", "list", "--json", "--since", "1m").stdout) == []
    assert json.loads(cli("findings", "list", "--json", "--rule", "blast").stdout) == []
    assert json.loads(cli("findings", "list", "--json", "--tenant", "nobody").stdout) == []


@pytest.mark.parametrize("args, code, message", [
    (["findings", "list", "--since", "yesterday"], 1, "--since must be an ISO date-time with zone"),
    (["findings", "list", "--since", "2026-11-01T00:00:00"], 1, "--since must be an ISO date-time with zone"),
    (["anomaly", "run", "--rules", "/nonexistent.yaml"], 2, "no such anomaly rules file"),
    (["anomaly", "run", "--follow", "--interval", "0"], 1, "--interval must be a positive number"),
])
def test_bad_arguments_are_clear_errors(setup, args, code, message):
    cli = setup[0]
    done = cli(*args)
    assert done.returncode == code and message in done.stderr


def test_follow_consumes_new_cdrs_and_stops_on_sigterm(setup):
    cli, _, calls, rules = setup
    proc = subprocess.Popen([str(CALLCTL), "anomaly", "run", "--follow", "--interval", "0.2", "--rules", rules],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli.env, cwd=cli.cwd)
    try:
        first = json.loads(proc.stdout.readline())
        assert first["cdrs"] == 0
        calls(3, datetime.now(timezone.utc) - timedelta(minutes=5))
        deadline = time.monotonic() + 30
        found = 0
        while not found and time.monotonic() < deadline:
            found = json.loads(proc.stdout.readline())["new_findings"]
        assert found == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
