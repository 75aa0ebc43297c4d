"""A wrong key fails closed: the daemon, the API and every command hold the key ring
against the check values in the database and refuse to start on a difference; an
install from before the check values gets them on its first start, after the ring was
tried on its data; rotation and a deliberate lookup change keep working (issue #15,
item 6). SQLite and PostgreSQL."""
from __future__ import annotations

import asyncio
import os
import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import insert, text

from callctl.store import bindings, crypto, keycheck, pool, tenants
from callctl.store.crypto import ENV_KEYS, KeyRing, new_key
from callctl.store.keycheck import KeyMismatch
from callctl.store.models import Block
from callctl.store.db import make_engine, upgrade
from callctl.store.reencrypt import reencrypt
from lab import harness
from tests import realnumbers
from tests import test_cdr_durability as durability
from tests.test_cdr_durability import cluster, route as route_call  # noqa: F401 (a fixture)
from tests.test_cli import run

X = "+8617100000051"
AGENT, HOTLINE = realnumbers.tenant_line("+8613900000051", "+861058000051")
CUSTOMER = realnumbers.person("+8613800000051")
SESSION = os.environ[ENV_KEYS]  # the session's ring (conftest): lookup=... test=...
ENTRIES = dict(token.partition("=")[::2] for token in SESSION.split())


def ring_text(**changes: str) -> str:
    return " ".join(f"{k}={v}" for k, v in {**ENTRIES, **changes}.items())


@pytest.fixture
def acme(engine):
    tenants.add_tenant(engine, "acme", HOTLINE, callers=[AGENT], hours="00:00-24:00")
    pool.add_numbers(engine, "acme", [X])
    bindings.bind(engine, "acme", CUSTOMER)
    with engine.begin() as conn:  # a caller block, found by lookup hash at call time
        conn.execute(insert(Block), {"tenant_id": 1, "scope": "caller", "direction": "both", "reason": "harassment",
                                     "created_by": "pytest", "caller": CUSTOMER,
                                     "starts_at": datetime.now(timezone.utc) - timedelta(seconds=5)})
    return engine


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)  # both databases: the probe test below
def test_a_wrong_secret_stops_every_entry_point_with_one_line(acme, tmp_path):
    url = acme.url.render_as_string(hide_password=False)
    env = {"PATH": "/usr/bin:/bin", "CALLCTL_DATABASE_URL": url, "CALLCTL_SPOOL_DIR": str(tmp_path / "spool"),
           "CALLCTL_AGI_LISTEN": f"127.0.0.1:{harness.free_port()}",
           "CALLCTL_API_LISTEN": f"127.0.0.1:{harness.free_port()}",
           "CALLCTL_ANOMALY_RULES": str(harness.REPO / "conf" / "anomaly.yaml")}  # no warning of its own
    wrong_lookup = {**env, ENV_KEYS: ring_text(lookup=new_key())}
    for args in (["tenant", "list"], ["binding", "get", "1"], ["serve", "asterisk"], ["serve", "api"]):
        done = run(*args, env=wrong_lookup, cwd=tmp_path)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert done.stderr.startswith("callctl: key error: the lookup secret ('lookup=') is not the one")
        assert len(done.stderr.strip().splitlines()) == 1 and done.stdout == ""
    done = run("binding", "get", "1", env={**env, ENV_KEYS: ring_text(test=new_key())}, cwd=tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith(
        "callctl: key error: key 'test' is not the key this database's numbers under 'test' were written with: "
        "restore the right key file (docs/keys.md) (")  # then the config that was read
    done = run("tenant", "list", env={**env, ENV_KEYS: ring_text(audit=new_key())}, cwd=tmp_path)
    assert done.returncode == 2 and "the audit key is not the one" in done.stderr
    assert run("binding", "get", "1", env=env, cwd=tmp_path).returncode == 0  # the right ring
    for secret in (ENTRIES["lookup"], ENTRIES["test"]):
        assert secret not in done.stderr


def test_an_install_from_before_the_checks_is_probed_then_checked(acme):
    with acme.begin() as conn:
        conn.execute(text("DELETE FROM key_checks"))  # as before migration 0085
    for wrong in (ring_text(lookup=new_key()), ring_text(test=new_key())):
        with pytest.raises(KeyMismatch):
            keycheck.verify(acme, KeyRing.parse(wrong))  # tried on the stored numbers and hashes
    with acme.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM key_checks")) == 0  # nothing stored for a wrong ring
    assert sorted(keycheck.verify(acme, crypto.ring())) == ["audit", "key:test", "lookup"]
    assert keycheck.verify(acme, crypto.ring()) == []
    with pytest.raises(KeyMismatch, match="lookup secret"):
        keycheck.verify(acme, KeyRing.parse(ring_text(lookup=new_key())))  # now by the stored check


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)  # the CLI's key handling: one database will do
def test_rotation_and_a_deliberate_lookup_change_keep_working(acme, tmp_path):
    keys = tmp_path / "callctl.keys"
    keys.write_text("\n".join(f"{k}={v}" for k, v in ENTRIES.items()) + "\n")
    keys.chmod(0o600)
    env = {"PATH": "/usr/bin:/bin", "CALLCTL_DATABASE_URL": acme.url.render_as_string(hide_password=False),
           "CALLCTL_KEY_FILE": str(keys)}
    cli = lambda *args: run(*args, env={**env, ENV_KEYS: ""}, cwd=tmp_path)  # noqa: E731 (the key file only)
    assert cli("keys", "generate", "--id", "k2").returncode == 0
    rotated = cli("keys", "rotate")
    assert rotated.returncode == 0 and "bindings 1, blocks 1" in rotated.stdout
    assert cli("binding", "get", "1").returncode == 0
    # The lookup secret replaced (it leaked): the old one stays as audit=, the rehash runs.
    old = ENTRIES["lookup"]
    keys.write_text(keys.read_text().replace(f"lookup={old}", f"lookup={new_key()}\naudit={old}"))
    refused = cli("tenant", "list")
    assert refused.returncode == 2 and "lookup secret" in refused.stderr
    rehashed = cli("keys", "rotate", "--rehash")
    assert rehashed.returncode == 0, rehashed.stderr
    assert cli("tenant", "list").returncode == 0 and cli("audit", "verify").returncode == 0
    crypto.install(KeyRing.parse(keys.read_text()))
    try:
        from callctl.service import CallService
        from callctl.store.spool import CdrSpool

        service = CallService(acme, CdrSpool(tmp_path / "spool"))
        assert service.route(X, CUSTOMER)[1].reason == "blocked"  # found by its new hash
        assert not any(reencrypt(acme).values())  # nothing left under another key
    finally:
        crypto.install(KeyRing.parse(SESSION))


def test_daemon_started_while_the_database_is_down_checks_the_ring_when_it_returns(cluster, tmp_path):
    """Up: it routes once the ring checked out. Wrong ring: it stops (exit 2) instead of
    routing a single call with it."""
    url = "postgresql+psycopg2://" + cluster.dsn.split("://", 1)[1]
    engine = make_engine(url)
    upgrade(engine)
    tenants.add_tenant(engine, "acme", durability.HOTLINE, callers=[durability.AGENT], hours="00:00-24:00")
    pool.add_numbers(engine, "acme", [durability.X])  # the numbers route_call dials
    bindings.bind(engine, "acme", durability.CUSTOMER)
    engine.dispose()
    for ring, expected in ((SESSION, "bridge"), (ring_text(lookup=new_key()), None)):
        cluster.stop()
        port = harness.free_port()
        daemon = harness.callctl_daemon(url, tmp_path, port=port, extra_env={ENV_KEYS: ring, "CALLCTL_DB_TIMEOUT": "1"})
        with daemon:
            variables, _ = asyncio.run(route_call(port, "down"))
            assert variables["CALLCTL_REASON"] == "unavailable"
            cluster.start()
            if expected:
                for _ in range(120):  # housekeeping checks every 5 s; a bound, not a timing claim
                    if (asyncio.run(route_call(port, "back"))[0] or {}).get("CALLCTL_REASON") != "unavailable":
                        break
                    assert daemon.proc.poll() is None
                    time.sleep(0.5)
                assert asyncio.run(route_call(port, "back"))[0]["CALLCTL_ACTION"] == expected
            else:
                assert daemon.proc.wait(60) == 2
                assert "the lookup secret ('lookup=') is not the one" in daemon.output()
