"""Webhook endpoints are https://; http:// only to a loopback host (a receiver on this
box, tests), with a clear error otherwise: `callctl webhook add` as an operator runs it."""
from __future__ import annotations

import json

import pytest

from tests import realnumbers
from tests.test_cli import run

HOTLINE = realnumbers.tenant_line("+861058000071")
AGENT = realnumbers.tenant_line("+8613900000071")
REFUSED = ["http://hooks.acme.example/callctl", "http://10.0.0.5:8080/hook", "http://127.0.0.1.nip.example/hook",
           "ftp://hooks.acme.example/", "https:///no-host"]
TAKEN = ["https://hooks.acme.example/callctl", "http://127.0.0.1:8000/hook", "http://[::1]:8000/hook",
         "http://localhost:8000/hook"]


@pytest.fixture
def cli(tmp_path):
    """The CLI on a fresh SQLite database with one tenant (the rule is in the store, not the dialect)."""
    env = {"PATH": "/usr/bin:/bin", "CALLCTL_DATABASE_URL": f"sqlite:///{tmp_path}/callctl.db"}
    cli = lambda *args: run(*args, env=env, cwd=tmp_path)
    assert cli("db", "upgrade").returncode == 0
    assert cli("tenant", "add", "acme", "--hotline", HOTLINE, "--caller", AGENT).returncode == 0
    return cli


def test_only_https_or_loopback_http_endpoints_are_taken(cli):
    for url in REFUSED:
        done = cli("webhook", "add", "--tenant", "acme", "--url", url)
        assert done.returncode == 1 and done.stdout == "", url
        assert done.stderr.startswith("callctl: the endpoint must be") and "[invalid_url]" in done.stderr, url
    for url in TAKEN:
        done = cli("webhook", "add", "--tenant", "acme", "--url", url)
        assert done.returncode == 0, (url, done.stderr)
    assert [row["url"] for row in json.loads(cli("webhook", "list", "--json").stdout)] == TAKEN
