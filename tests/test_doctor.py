"""`callctl doctor` when something is wrong, as an administrator meets it: the database
not answering, a schema not migrated, a key ring that is not the database's, no daemon
(FastAGI port and /healthz): each gives a FAIL line saying what, a `fix:` line saying
how, and exit 1, never a traceback. (A box where everything passes: test_live_calls.)"""
from __future__ import annotations

import os

from callctl.store.crypto import ENV_KEYS, LOOKUP, new_key
from lab import harness
from tests import realnumbers
from tests.test_cli import run

HOTLINE = realnumbers.tenant_line("+861058000091")
AGENT = realnumbers.tenant_line("+8613900000091")


def doctor(tmp_path, url: str, **env) -> tuple[int, list[str]]:
    base = {"PATH": "/usr/bin:/bin", "CALLCTL_DATABASE_URL": url, "CALLCTL_SPOOL_DIR": str(tmp_path / "spool"),
            "CALLCTL_AGI_LISTEN": f"127.0.0.1:{harness.free_port()}",  # nothing listens on either
            "CALLCTL_METRICS_LISTEN": f"127.0.0.1:{harness.free_port()}", "CALLCTL_DB_TIMEOUT": "2"}
    done = run("doctor", env={**base, **env}, cwd=tmp_path)
    assert "Traceback" not in done.stdout + done.stderr
    return done.returncode, done.stdout.splitlines()


def failed(lines: list[str], name: str) -> tuple[str, str]:
    """The FAIL line of a check and the fix line under it."""
    at = next(n for n, line in enumerate(lines) if line.startswith("FAIL") and line.split()[1:2] == name.split()[:1])
    assert lines[at + 1].strip().startswith("fix: "), lines
    return lines[at], lines[at + 1].strip()


def test_a_database_that_does_not_answer(tmp_path):
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{harness.free_port()}/callctl"  # no server there
    code, lines = doctor(tmp_path, url)
    line, fix = failed(lines, "database")
    assert code == 1 and "postgresql does not answer" in line
    assert fix == "fix: check database_url, that the server runs and this host may connect (pg_hba.conf)"
    assert lines[-1] == "1 check(s) failed"


def test_a_schema_not_migrated(tmp_path):
    code, lines = doctor(tmp_path, f"sqlite:///{tmp_path}/callctl.db")  # an empty database file
    line, fix = failed(lines, "schema")
    assert code == 1 and "migration(s) not applied, first 0001_initial" in line
    assert fix == "fix: callctl db upgrade"


def test_a_key_ring_that_is_not_the_databases(tmp_path):
    url = f"sqlite:///{tmp_path}/callctl.db"
    env = {"PATH": "/usr/bin:/bin", "CALLCTL_DATABASE_URL": url}
    for args in (["db", "upgrade"], ["tenant", "add", "acme", "--hotline", HOTLINE, "--caller", AGENT]):
        assert run(*args, env=env, cwd=tmp_path).returncode == 0  # written under the session's ring
    other = f"{LOOKUP}={new_key()} " + os.environ[ENV_KEYS].split(" ", 1)[1]  # another lookup secret
    code, lines = doctor(tmp_path, url, **{ENV_KEYS: other})
    line, fix = failed(lines, "keys vs database")
    assert code == 1 and "the lookup secret ('lookup=') is not the one" in line
    assert fix == "fix: use the key file this database was written with"


def test_no_daemon_running(tmp_path):
    url = f"sqlite:///{tmp_path}/callctl.db"
    assert run("db", "upgrade", env={"PATH": "/usr/bin:/bin", "CALLCTL_DATABASE_URL": url},
               cwd=tmp_path).returncode == 0
    code, lines = doctor(tmp_path, url)
    assert code == 1 and lines[-1] == "2 check(s) failed", lines
    line, fix = failed(lines, "daemon")
    assert "nothing answers on agi.listen 127.0.0.1:" in line
    assert fix == "fix: start it: systemctl start callctl-asterisk (or callctl serve asterisk)"
    line, fix = failed(lines, "health")
    assert "/healthz does not answer" in line and fix == "fix: is the daemon running with this metrics.listen?"
