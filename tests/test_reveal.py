"""Audited reveals and the hash-chained audit log, on SQLite and PostgreSQL."""
from __future__ import annotations

import json
import os
import subprocess
import threading
from datetime import timedelta

import pytest
from sqlalchemy import text

from callctl.store import bindings, pool, reveal, tenants
from callctl.store.models import utcnow
from callctl.errors import ProvisionError
from callctl.store.reveal import RevealError

from tests import leaks
from tests.test_cli import CALLCTL, run

A, AGENT, HOTLINE, X1 = "+8613800000041", "+8613900000041", "+861058000041", "+8617100000041"


@pytest.fixture
def bound(engine):
    tenants.add_tenant(engine, "acme", HOTLINE, callers=[AGENT])
    pool.add_numbers(engine, "acme", [X1])
    return engine, bindings.bind(engine, "acme", A)["id"]


def audit_rows(engine) -> list:
    with engine.connect() as conn:
        return conn.execute(text("SELECT id, actor, action, grant_id, detail FROM audit_log ORDER BY id")).all()


def test_request_approve_use_until_used_up(bound):
    engine, binding = bound
    grant = reveal.request(engine, binding, "a", "claim", "CLM-1", "alice", max_uses=2)
    assert grant["status"] == "requested" and not grant["active"]
    with pytest.raises(RevealError, match="grant requested"):
        reveal.use(engine, grant["id"], "alice")  # not approved yet
    approved = reveal.approve(engine, grant["id"], "bob", note="claim file checked")
    assert approved["status"] == "approved" and approved["active"] and approved["decided_by"] == "bob"
    assert reveal.use(engine, grant["id"], "alice")["number"] == A
    with pytest.raises(RevealError, match="not the requester"):
        reveal.use(engine, grant["id"], "mallory")
    assert reveal.use(engine, grant["id"], "alice")["number"] == A
    with pytest.raises(RevealError, match="grant used up"):
        reveal.use(engine, grant["id"], "alice")
    actions = [(r.actor, r.action) for r in audit_rows(engine)]
    assert actions == [("alice", "reveal_requested"), ("alice", "reveal_denied"), ("bob", "reveal_approved"),
                       ("alice", "reveal_used"), ("mallory", "reveal_denied"), ("alice", "reveal_used"),
                       ("alice", "reveal_denied")]
    assert all(A not in r.detail and A[1:] not in r.detail for r in audit_rows(engine))
    assert json.loads(audit_rows(engine)[3].detail)["shown"] == "+86138****0041"
    assert reveal.verify(engine) == {"ok": True, "rows": 7, "head": reveal.verify(engine)["head"]}


def test_self_approval_refused_and_logged(bound):
    engine, binding = bound
    grant = reveal.request(engine, binding, "a", "aml", "AML-9", "alice")
    with pytest.raises(RevealError, match="second person"):
        reveal.approve(engine, grant["id"], "alice")
    assert reveal.list_grants(engine)[0]["status"] == "requested"
    assert audit_rows(engine)[-1].action == "decision_refused"
    with engine.begin() as conn, pytest.raises(Exception, match="ck_grant_second_person"):
        conn.execute(text("UPDATE reveal_grants SET decided_by = requested_by"))  # the database says no too


def test_refused_and_expired_grants_reveal_nothing(bound):
    engine, binding = bound
    refused = reveal.request(engine, binding, "a", "complaint", "CMP-3", "alice")
    reveal.refuse(engine, refused["id"], "carol", note="no complaint on file")
    with pytest.raises(RevealError, match="grant refused"):
        reveal.use(engine, refused["id"], "alice")
    with pytest.raises(RevealError, match="was refused already"):
        reveal.approve(engine, refused["id"], "bob")
    timed = reveal.request(engine, binding, "a", "claim", "CLM-4", "alice", ttl_seconds=60)
    reveal.approve(engine, timed["id"], "bob")
    with pytest.raises(RevealError, match="grant expired"):
        reveal.use(engine, timed["id"], "alice", now=utcnow() + timedelta(seconds=61))
    with pytest.raises(RevealError, match="no grant"):
        reveal.use(engine, 999, "alice")
    denied = [json.loads(r.detail)["reason"] for r in audit_rows(engine) if r.action == "reveal_denied"]
    assert denied == ["grant_refused", "grant_expired", "no_grant"]
    assert reveal.verify(engine)["ok"]


@pytest.mark.parametrize("kwargs, code", [
    ({"scenario": "curiosity"}, "invalid_scenario"),
    ({"case_reference": " "}, "invalid_case"),
    ({"requested_by": ""}, "invalid_person"),
    ({"party": "b"}, "invalid_party"),  # an AXN binding has no party b
    ({"max_uses": 0}, "invalid_uses"),
    ({"ttl_seconds": 10}, "invalid_ttl"),
])
def test_bad_requests_are_clear_errors_and_log_nothing(bound, kwargs, code):
    engine, binding = bound
    args = {"party": "a", "scenario": "claim", "case_reference": "CLM-1", "requested_by": "alice", **kwargs}
    with pytest.raises(ProvisionError) as caught:
        reveal.request(engine, binding, args.pop("party"), args.pop("scenario"), args.pop("case_reference"),
                       args.pop("requested_by"), **args)
    assert caught.value.code == code and audit_rows(engine) == []


def make_log(engine, binding) -> None:
    grant = reveal.request(engine, binding, "a", "claim", "CLM-1", "alice")
    reveal.approve(engine, grant["id"], "bob")
    reveal.use(engine, grant["id"], "alice")
    with pytest.raises(RevealError):
        reveal.use(engine, grant["id"], "alice")  # denied: used up
    assert reveal.verify(engine) == {"ok": True, "rows": 4, "head": reveal.verify(engine)["head"]}


def tamper(engine, *statements) -> None:
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("SET LOCAL session_replication_role = replica")  # past the append-only trigger
        for statement in statements:
            conn.exec_driver_sql(statement)


@pytest.mark.parametrize("statements, bad_row, problem", [
    (["UPDATE audit_log SET actor = 'mallory' WHERE id = 3"], 3, "content does not match"),
    (["UPDATE audit_log SET detail = replace(detail, 'CLM-1', 'CLM-2') WHERE id = 1"], 1, "content does not match"),
    (["UPDATE audit_log SET hash = '" + "f" * 64 + "' WHERE id = 2"], 2, "content does not match"),
    (["DELETE FROM audit_log WHERE id = 2"], 3, "expected row 2"),
    (["DELETE FROM audit_log WHERE id = 4"], None, None),  # the tail: see below
    (["UPDATE audit_log SET id = id + 100 WHERE id IN (2, 3)",
      "UPDATE audit_log SET id = 3 WHERE id = 102", "UPDATE audit_log SET id = 2 WHERE id = 103"], 2, "prev_hash"),
])
def test_tampering_with_one_row_is_detected(bound, statements, bad_row, problem):
    engine, binding = bound
    make_log(engine, binding)
    head = reveal.verify(engine)["head"]
    tamper(engine, *statements)
    result = reveal.verify(engine)
    if bad_row is None:
        # A cut tail leaves a valid shorter chain: the head kept outside (export, verify
        # output) no longer matches, which is how truncation is found.
        assert result["ok"] and result["rows"] == 3 and result["head"] != head
        return
    assert not result["ok"] and result["bad_row"] == bad_row and problem in result["problem"]


def test_postgresql_refuses_update_delete_truncate_of_the_log(bound):
    engine, binding = bound
    if engine.dialect.name != "postgresql":
        pytest.skip("the database-side guard is PostgreSQL's; SQLite relies on the chain")
    make_log(engine, binding)
    for statement in ("UPDATE audit_log SET actor = 'x'", "DELETE FROM audit_log", "TRUNCATE audit_log"):
        with engine.begin() as conn, pytest.raises(Exception, match="append-only"):
            conn.exec_driver_sql(statement)
    assert reveal.verify(engine)["rows"] == 4


def test_concurrent_appends_keep_one_chain(bound):
    engine, binding = bound
    grant = reveal.request(engine, binding, "a", "claim", "CLM-1", "alice", max_uses=40)
    reveal.approve(engine, grant["id"], "bob")
    errors = []

    def worker():
        try:
            for _ in range(5):
                try:
                    reveal.use(engine, grant["id"], "alice")
                except RevealError:
                    pass
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    result = reveal.verify(engine)
    assert result["ok"] and result["rows"] == 2 + 40
    assert reveal.list_grants(engine)[0]["uses"] == 40


def test_cli_reveal_and_audit(bound, tmp_path):
    engine, binding = bound
    env = {"PATH": "/usr/bin:/bin", "CALLCTL_DATABASE_URL": engine.url.render_as_string(hide_password=False)}
    cli = lambda *args: run(*args, env=env, cwd=tmp_path)  # noqa: E731
    made = cli("reveal", "request", "--binding", str(binding), "--scenario", "claim", "--case", "CLM-7", "--by", "alice")
    assert made.returncode == 0, made.stderr
    grant = json.loads(made.stdout)["id"]
    denied = cli("reveal", "use", str(grant), "--by", "alice")
    assert denied.returncode == 1 and "reveal refused (grant requested); the attempt is logged" in denied.stderr
    assert A not in denied.stdout + denied.stderr
    selfie = cli("reveal", "approve", str(grant), "--by", "alice")
    assert selfie.returncode == 1 and "[self_approval]" in selfie.stderr
    assert cli("reveal", "approve", str(grant), "--by", "bob").returncode == 0
    shown = reveal_cli(env, tmp_path, grant)
    assert json.loads(shown)["number"] == A
    verified = cli("audit", "verify")
    assert verified.returncode == 0 and verified.stdout.startswith("audit log intact: 5 row(s)")
    exported = cli("audit", "export", "--format", "csv")
    assert exported.stdout.splitlines()[0] == "id,at,actor,action,grant_id,detail,prev_hash,hash"
    assert len(exported.stdout.splitlines()) == 6 and A[1:] not in exported.stdout
    assert [r["action"] for r in json.loads(cli("audit", "export").stdout)][-1] == "reveal_used"
    tamper(engine, "UPDATE audit_log SET actor = 'mallory' WHERE id = 2")
    broken = cli("audit", "verify")
    assert broken.returncode == 4 and "row 2: its content does not match its MAC" in broken.stderr


def reveal_cli(env: dict, cwd, grant: int) -> str:
    """`callctl reveal use`: its output is an audited reveal, recorded as such for the
    leak check (tests.test_cli.run would record it as ordinary CLI output)."""
    done = subprocess.run([str(CALLCTL), "reveal", "use", str(grant), "--by", "alice"], capture_output=True,
                          text=True, env={"CALLCTL_KEYS": os.environ["CALLCTL_KEYS"], **env}, cwd=cwd, timeout=60)
    assert done.returncode == 0, done.stderr
    leaks.record("reveal", "reveal use", done.stdout)
    return done.stdout
