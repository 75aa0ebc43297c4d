"""The PBX-neutral daemon's backend registry is a real extension point: a stub backend
registered by name runs on the daemon (a real subprocess, real sockets, SQLite and
PostgreSQL) and gets decisions and durable CDRs through the daemon's call path alone."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
from sqlalchemy import select

from callctl import daemon
from callctl.store import bindings, pool, tenants
from callctl.store.models import Cdr
from lab import harness

A, AGENT, HOTLINE, X = "+8613800000001", "+8613900000001", "+861058000000", "+8617100000001"

_RUN_STUB = ("from callctl import config, daemon, logs; cfg = config.load(); logs.setup(cfg.log.format, cfg.log.level);"
             " daemon.register('stub', 'tests.stubpbx:StubBackend');"
             " daemon.serve('stub', cfg)")


def ask(port: int, line: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(line.encode() + b"\n")
        return sock.makefile().readline().strip()


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(daemon.BackendError, match="no PBX backend named 'nope'"):
        daemon.load_backend("nope")
    assert daemon.load_backend("asterisk").name == "FastAGI"


def test_stub_backend_drives_the_call_path(engine, tmp_path):
    tenants.add_tenant(engine, "acme", HOTLINE, callers=[AGENT], hours="00:00-24:00")
    pool.add_numbers(engine, "acme", [X])
    bindings.bind(engine, "acme", A)
    port = harness.free_port()
    proc = harness.Process([sys.executable, "-c", _RUN_STUB], tmp_path / "stub.log", port=port, env={
        "CALLCTL_CONFIG": str(harness.REPO / "conf" / "callctl.yaml"),
        "CALLCTL_DATABASE_URL": engine.url.render_as_string(hide_password=False),
        "CALLCTL_SPOOL_DIR": str(tmp_path / "spool"), "CALLCTL_LOG_FORMAT": "json",
        "CALLCTL_STUB_LISTEN": f"127.0.0.1:{port}", "PYTHONPATH": str(harness.REPO)})
    with proc:
        assert ask(port, f"route stub-1 {X} {AGENT}").split() == [
            f"dest={A}", f"clid={X}", "ring_timeout=30", "max_seconds=3600", "binding=1", "tenant=1",
            "direction=to_customer", "purpose=service", "action=bridge"]
        assert ask(port, f"route stub-2 {X} +8613700000000").endswith("action=reject")
        assert ask(port, f"end stub-2 {X} +8613700000000 reject unknown_caller 1 1795887084") == "written"
        assert ask(port, f"end stub-2 {X} +8613700000000 reject unknown_caller 1 1795887084") == "duplicate"
        assert proc.stop() == 0
    events = harness.json_events(proc.output())
    assert [e["action"] for e in events if e["event"] == "call routed"] == ["bridge", "reject"]
    assert any(e["event"] == "serving stub" for e in events) and events[-1]["event"] == "stopped"
    with engine.connect() as conn:
        rows = conn.execute(select(Cdr.call_id, Cdr.reject_reason, Cdr.caller_masked)).all()
    assert [tuple(r) for r in rows] == [("stub-2", "unknown_caller", "+86137****0000")]
