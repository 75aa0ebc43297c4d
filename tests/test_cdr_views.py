"""Support staff's view of CDRs: `callctl cdr list` filters and `callctl cdr tail`, run as
the real command against SQLite and PostgreSQL, with CDRs written by the real CDR path."""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import text

from callctl.service import CallService
from tests.agicalls import agi_call
from callctl.store import bindings, pool, tenants
from callctl.store.cdrs import CdrFilter, follow_cdrs, list_cdrs
from callctl.errors import ProvisionError
from callctl.store.spool import CdrSpool
from tests.test_cli import run

CALLCTL = Path(sys.executable).with_name("callctl")
AGENT, HOTLINE = "+8613900000001", "+861058000000"
X1, X2, X3 = "+8617100000001", "+8617100000002", "+8617100000003"
T0 = datetime(2026, 11, 20, 8, 0, tzinfo=timezone.utc)


@pytest.fixture
def world(engine, tmp_path):
    """Two tenants; calls over three days: bridged and rejected for several reasons."""
    tenants.add_tenant(engine, "acme", HOTLINE, callers=[AGENT])
    tenants.add_tenant(engine, "bolt", "+861058000001", callers=["+8613900000009"])
    pool.add_numbers(engine, "acme", [X1, X2])
    pool.add_numbers(engine, "bolt", [X3])
    b1 = bindings.bind(engine, "acme", "+8613800000001")["id"]
    b3 = bindings.bind(engine, "bolt", "+8613800000003")["id"]
    service = CallService(engine, CdrSpool(tmp_path / "spool"))
    calls = [  # (day, X, tenant id, binding, action, reason)
        (0, X1, 1, b1, "bridge", ""), (0, X1, 1, b1, "reject", "blocked"), (1, X2, 1, "", "reject", "unknown_number"),
        (1, X1, 1, b1, "bridge", ""), (2, X3, 2, b3, "bridge", ""), (2, X3, 2, b3, "reject", "unavailable"),
    ]
    for n, (day, x, tenant, binding, action, reason) in enumerate(calls):
        start = (T0 + timedelta(days=day, minutes=n)).timestamp()
        service.record(agi_call(
            f"lab-{start:.0f}.{n}", called=x, caller=AGENT, destination="+8613800000001" if action == "bridge" else "",
            action=action, reason=reason, binding=str(binding), tenant=str(tenant), direction="to_customer",
            start=f"{start:.3f}", end=f"{start + 30:.3f}", dial_status="ANSWER" if action == "bridge" else "",
            dialed_ms="30000" if action == "bridge" else "", answered_ms="25000" if action == "bridge" else "",
            hangup_cause="16"))
    return {"b1": b1, "b3": b3, "service": service}


def run_cli(engine, tmp_path, *args) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "CALLCTL_DATABASE_URL": engine.url.render_as_string(hide_password=False)}
    return run(*args, env=env, cwd=tmp_path)  # outputs go to the leak check


def listed(engine, tmp_path, *args) -> list[dict]:
    done = run_cli(engine, tmp_path, "cdr", "list", "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_cdr_list_filters(engine, world, tmp_path):
    assert len(listed(engine, tmp_path)) == 6
    assert {r["virtual_number"] for r in listed(engine, tmp_path, "--tenant", "bolt")} == {X3}
    assert len(listed(engine, tmp_path, "--x", "017100000001")) == 3  # national form works too
    assert {r["binding_id"] for r in listed(engine, tmp_path, "--binding", str(world["b1"]))} == {world["b1"]}
    day1 = listed(engine, tmp_path, "--since", "2026-11-21", "--until", "2026-11-22")
    assert [r["virtual_number"] for r in day1] == [X1, X2]  # newest first
    rejected = listed(engine, tmp_path, "--decision", "rejected", "--tenant", "acme")
    assert sorted(r["reject_reason"] for r in rejected) == ["blocked", "unknown_number"]
    assert [r["tenant_id"] for r in listed(engine, tmp_path, "--reason", "unavailable")] == [2]
    assert listed(engine, tmp_path, "--since", "2026-11-20T16:30+08:00", "--until", "2026-11-20T17:00+08:00") == []
    assert len(listed(engine, tmp_path, "--since", "2026-11-20T16:00+08:00", "--limit", "1")) == 1


def test_cdr_list_table_is_readable_and_masked(engine, world, tmp_path):
    done = run_cli(engine, tmp_path, "cdr", "list", "--tenant", "acme", "--decision", "bridged")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["started", "(UTC)", "call"] and set(lines[1]) <= {"-", " "}
    assert "2026-11-21 08:03:00" in lines[2] and "+86138****0001" in lines[2] and "ANSWER" in lines[2]
    assert lines[-1] == "(2 call(s))"
    assert "13800000001" not in done.stdout and "13900000001" not in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--since", "yesterday"], "--since must be an ISO date"),
    (["--since", "2026-11-21T08:00"], "give a time zone"),
    (["--since", "2026-11-22", "--until", "2026-11-21"], "--since must be before --until"),
    (["--x", "not-a-number"], "X must be a phone number"),
    (["--tenant", "nobody"], "no tenant named 'nobody'"),
])
def test_cdr_list_bad_filters_are_clear_errors(engine, world, tmp_path, args, message):
    done = run_cli(engine, tmp_path, "cdr", "list", *args)
    assert done.returncode == 1 and message in done.stderr and done.stdout == ""


def test_cdr_tail_with_a_bad_filter_stops_at_once(engine, world, tmp_path):
    done = run_cli(engine, tmp_path, "cdr", "tail", "--tenant", "nobody")
    assert done.returncode == 1 and "no tenant named 'nobody'" in done.stderr and done.stdout == ""


def test_bad_choice_is_refused_by_the_command_line(engine, world, tmp_path):
    done = run_cli(engine, tmp_path, "cdr", "list", "--reason", "angry")
    assert done.returncode == 2 and "invalid choice" in done.stderr


def test_relative_ages():
    now = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)
    assert CdrFilter.parse(since="2h", now=now).since == now - timedelta(hours=2)
    assert CdrFilter.parse(since="7d", until="15m", now=now).until == now - timedelta(minutes=15)
    with pytest.raises(ProvisionError, match="before"):
        CdrFilter.parse(since="1h", until="2h", now=now)


def test_follow_yields_each_new_cdr_once_even_when_commits_come_out_of_order(engine, world):
    service = world["service"]
    inserted = []

    def record(name: str, minute: int) -> None:
        start = (T0 + timedelta(days=5, minutes=minute)).timestamp()
        service.record(agi_call(name, called=X1, caller=AGENT, action="reject", reason="blocked",
                                    tenant="1", start=f"{start:.3f}", end=f"{start + 1:.3f}"))
        inserted.append(name)

    def between_polls(_seconds):
        step = len(inserted)
        if step == 0:
            record("new-0", 0)
        elif step == 1:  # an insert that got a high id...
            record("new-1", 1)
            with engine.begin() as conn:
                conn.execute(text("UPDATE cdrs SET id = id + 50 WHERE call_id = 'new-1'"))
        elif step == 2:  # ...and one with a lower id, visible only now (committed later)
            with engine.begin() as conn:
                conn.execute(text(
                    "INSERT INTO cdrs (id, call_id, tenant_id, decision, reject_reason, started_at)"
                    " SELECT id - 40, 'late', 1, 'rejected', 'blocked', started_at FROM cdrs WHERE call_id = 'new-1'"))
            inserted.append("late")
        else:
            raise KeyboardInterrupt

    seen = []
    with pytest.raises(KeyboardInterrupt):
        for row in follow_cdrs(engine, CdrFilter(tenant="acme"), backlog=2, sleep=between_polls):
            seen.append(row["call_id"])
    assert len(seen) == 2 + 3
    assert seen[2:] == ["new-0", "new-1", "late"]


def test_cdr_tail_follows_new_cdrs_with_filters(engine, world, tmp_path):
    env = {**os.environ, "CALLCTL_DATABASE_URL": engine.url.render_as_string(hide_password=False)}
    tail = subprocess.Popen([str(CALLCTL), "cdr", "tail", "--json", "--every", "0.2", "--backlog", "1",
                             "--tenant", "acme", "--decision", "rejected"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    try:
        lines = read_lines(tail, 1)
        assert [r["reject_reason"] for r in lines] == ["unknown_number"]  # the newest matching, by insert
        service = world["service"]
        for n, (tenant, action) in enumerate([("1", "reject"), ("2", "reject"), ("1", "bridge"), ("1", "reject")]):
            start = (T0 + timedelta(days=6, minutes=n)).timestamp()
            service.record(agi_call(f"tail-{n}", called=X1, caller=AGENT, action=action, reason="blocked",
                                        destination="+8613800000001", tenant=tenant,
                                        start=f"{start:.3f}", end=f"{start + 1:.3f}"))
        assert [r["call_id"] for r in read_lines(tail, 2)] == ["tail-0", "tail-3"]
    finally:
        tail.terminate()
        tail.wait(10)


def read_lines(proc: subprocess.Popen, count: int, timeout: float = 15.0) -> list[dict]:
    """The next `count` JSON lines the process prints (raw reads: no buffer hides a line)."""
    fd, out, deadline = proc.stdout.fileno(), [], time.monotonic() + timeout
    pending = getattr(proc, "pending", b"")
    while len(out) < count:
        while b"\n" in pending and len(out) < count:
            line, pending = pending.split(b"\n", 1)
            out.append(json.loads(line))
        if len(out) == count:
            break
        assert time.monotonic() < deadline, f"tail printed {out}"
        if select.select([fd], [], [], 0.2)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, f"tail ended: {proc.stderr.read()}"
            pending += chunk
    proc.pending = pending
    return out


def test_list_cdrs_default_filter_is_everything(engine, world):
    assert len(list_cdrs(engine)) == 6
