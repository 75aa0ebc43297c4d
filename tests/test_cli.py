"""The `callctl` command as an administrator runs it: a real subprocess, real databases."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from callctl.config import ConfigError, load
from tests.pg import empty_database_url
from tests import leaks, realnumbers

CALLCTL = Path(sys.executable).with_name("callctl")
CUSTOMER, AGENT, HOTLINE = "+8613800000001", "+8613900000001", "+861058000000"
realnumbers.tenant_line(AGENT, HOTLINE)


def run(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    env = {"CALLCTL_KEYS": os.environ["CALLCTL_KEYS"], **env}  # the session's key ring (conftest)
    done = subprocess.run([str(CALLCTL), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60)
    # Tenant views show the tenant's own lines to its administrator; all else is checked strictly.
    leaks.record("tenant" if args[:1] == ("tenant",) else "cli", " ".join(args[:2]), done.stdout + done.stderr)
    return done


@pytest.fixture(params=["sqlite", "postgresql"])
def cli(request, tmp_path):
    url = empty_database_url(request, tmp_path)
    env = {"PATH": "/usr/bin:/bin", "CALLCTL_DATABASE_URL": url, "CALLCTL_SPOOL_DIR": str(tmp_path / "spool")}
    return lambda *args: run(*args, env=env, cwd=tmp_path)


def test_provision_bind_unbind_and_list(cli):
    assert cli("db", "upgrade").stdout.startswith("applied: 0001_initial")
    assert cli("db", "upgrade").stdout.strip() == "schema is up to date"
    tenant = cli("tenant", "add", "acme", "--hotline", HOTLINE, "--caller", AGENT, "--caller-prefix", "+8610555")
    assert tenant.returncode == 0, tenant.stderr
    assert cli("pool", "add", "--tenant", "acme", "+8617100000001", "017100000002").stdout.startswith("added 2")
    bound = cli("bind", "--tenant", "acme", "--customer", "138 0000 0001", "--reference", "POL-1", "--ttl", "3600")
    binding = json.loads(bound.stdout)
    assert binding["x"] == "+8617100000001" and binding["customer"] == "+86138****0001"
    assert binding["expires_at"] and binding["reference"] == "POL-1"
    assert json.loads(cli("pool", "status", "--tenant", "acme").stdout) == {"free": 1, "bound": 1, "quarantined": 0, "disabled": 0}
    ended = json.loads(cli("unbind", str(binding["id"])).stdout)
    assert ended["status"] == "ended"
    assert json.loads(cli("pool", "status", "--tenant", "acme").stdout)["quarantined"] == 1
    table = cli("cdr", "list")
    assert table.returncode == 0 and "(0 call(s))" in table.stdout
    assert json.loads(cli("cdr", "list", "--json").stdout) == []
    # The tenant's own numbers (hotline, agents) are shown to its administrator; a
    # customer's real number never is.
    assert HOTLINE in tenant.stdout
    assert "13800000001" not in "".join(p.stdout + p.stderr for p in (tenant, bound, table))


@pytest.mark.parametrize("args, code, message", [
    (["bind", "--tenant", "acme", "--customer", "not-a-number"], 1, "customer"),
    (["bind", "--tenant", "nobody", "--customer", CUSTOMER], 1, "tenant_not_found"),
    (["bind", "--tenant", "acme", "--customer", CUSTOMER, "--expires", "tomorrow"], None, "ISO date-time"),
    (["bind", "--tenant", "acme", "--customer", CUSTOMER, "--ttl", "-5"], 1, "invalid_expiry"),
    (["bind", "--tenant", "acme", "--customer", CUSTOMER, "--mode", "AXB"], 1, "missing_other_party"),
    (["unbind", "999"], 1, "binding_not_found"),
    (["pool", "add", "--tenant", "acme", "12"], 1, "not a valid"),
])
def test_bad_input_is_a_clear_error_and_changes_nothing(cli, args, code, message):
    cli("db", "upgrade")
    cli("tenant", "add", "acme", "--hotline", HOTLINE, "--caller", AGENT)
    cli("pool", "add", "--tenant", "acme", "+8617100000001")
    done = cli(*args)
    assert done.returncode == code if code is not None else done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr
    assert json.loads(cli("pool", "status", "--tenant", "acme").stdout) == {"free": 1, "bound": 0, "quarantined": 0, "disabled": 0}


def test_unreachable_database_exits_3_with_a_hint(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "CALLCTL_DATABASE_URL": "postgresql+psycopg2://postgres@127.0.0.1:1/none"}
    done = run("tenant", "list", env=env, cwd=tmp_path)
    assert done.returncode == 3 and "database error" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("text, message", [
    ("database_url: [unclosed", "not valid YAML at line 1"),
    ("- a list", "must be a mapping"),
    ("databse_url: sqlite://", "databse_url: Extra inputs are not permitted"),
    ("agi:\n  listen: localhost", "agi.listen: Value error, must be HOST:PORT"),
    ("log:\n  format: xml", "log.format"),
])
def test_bad_config_file_names_the_problem(tmp_path, text, message):
    path = tmp_path / "callctl.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load(path, environ={})
    done = run("--config", str(path), "tenant", "list", env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_environment_overrides_the_file(tmp_path):
    path = tmp_path / "callctl.yaml"
    path.write_text("database_url: sqlite:///a.db\nagi:\n  listen: 127.0.0.1:4573\n")
    cfg = load(path, environ={"CALLCTL_DATABASE_URL": "sqlite:///b.db", "CALLCTL_AGI_LISTEN": "0.0.0.0:5000"})
    assert cfg.database_url == "sqlite:///b.db" and cfg.agi.port == 5000
    with pytest.raises(ConfigError, match="no such config file"):
        load(tmp_path / "missing.yaml", environ={})
