"""Operating the daemon: /metrics counts what it did (checked against the CDRs it
wrote), /healthz is ready only while the database answers, SIGHUP reloads what can be
reloaded and names what needs a restart. The real daemon (`callctl serve asterisk`)
on a private PostgreSQL cluster this test stops and starts; FastAGI sessions over a
real socket as Asterisk sends them (tests/test_cdr_durability.py's fake Asterisk)."""
from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from lab import harness
from tests import leaks
from tests.test_cdr_durability import AGENT, X, agi_session, cluster, free_port, hangup, setup  # noqa: F401 (fixtures)

UNKNOWN_X = "+8617100000099"


def scrape(port: int) -> dict[tuple, float]:
    """/metrics as {(sample name, sorted labels...): value}."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    leaks.record("metrics", "scrape", body)
    return {(s.name, *sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def healthz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def wait_for(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, what
        time.sleep(0.2)
    return value


def test_metrics_match_the_cdrs_and_health_follows_the_database(setup, cluster):
    engine, daemon, port, spool = setup
    mport = free_port()
    daemon.env["CALLCTL_METRICS_LISTEN"] = f"127.0.0.1:{mport}"
    daemon.start()
    try:
        assert healthz(mport) == (200, {"status": "ready", "database": "ok", "spool": "ok"})

        async def calls():
            routed = []
            for n in range(6):
                env = {"agi_extension": X if n % 2 else UNKNOWN_X, "agi_callerid": AGENT}
                routed.append(await agi_session(port, "route", f"m-{n}", env=env))
            acks = [await hangup(port, f"1700000000.{n}", time.time()) for n in range(4)]
            return routed, acks

        before = scrape(mport)[("callctl_sessions_total", ("protocol", "agi"))]  # the harness's port probe
        routed, acks = asyncio.run(calls())
        assert [v["CALLCTL_ACTION"] for v in routed] == ["reject", "bridge"] * 3
        assert acks == ["written"] * 4
        m = scrape(mport)
        with engine.connect() as conn:
            cdrs = conn.execute(text("SELECT count(*) FROM cdrs")).scalar()
        assert m[("callctl_cdrs_total", ("outcome", "written"))] == cdrs == 4
        assert m[("callctl_decisions_total", ("outcome", "bridge"), ("reason", ""))] == 3
        assert m[("callctl_decisions_total", ("outcome", "reject"), ("reason", "unknown_number"))] == 3
        assert m[("callctl_decision_seconds_count",)] == 6
        assert m[("callctl_sessions_total", ("protocol", "agi"))] - before == 10
        assert m[("callctl_sessions_open", ("protocol", "agi"))] == 0
        assert m[("callctl_spool_depth",)] == 0

        cluster.stop("immediate")  # the database goes away
        status, body = healthz(mport)
        assert status == 503 and body["database"].startswith("not answering") and body["spool"] == "ok"
        ack = asyncio.run(hangup(port, "1700000000.99", time.time()))
        down = asyncio.run(agi_session(port, "route", "m-down", env={"agi_extension": X, "agi_callerid": AGENT}))
        assert ack == "spooled" and down["CALLCTL_REASON"] == "unavailable"
        m = scrape(mport)
        assert m[("callctl_spool_depth",)] == 1 and m[("callctl_cdrs_total", ("outcome", "spooled"))] == 1
        assert m[("callctl_decisions_total", ("outcome", "reject"), ("reason", "unavailable"))] == 1
        assert m[("callctl_db_errors_total", ("path", "route"))] >= 1
        assert m[("callctl_db_errors_total", ("path", "cdr"))] >= 1

        cluster.start()  # back: replayed once, ready again, no restart
        wait_for(lambda: scrape(mport)[("callctl_spool_depth",)] == 0, "spool not replayed")
        wait_for(lambda: healthz(mport)[0] == 200, "not ready again")
        m = scrape(mport)
        assert m[("callctl_spool_replayed_total",)] == 1
        assert m[("callctl_db_reconnects_total",)] >= 1
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM cdrs")).scalar() == 5
    finally:
        daemon.stop()
        engine.dispose()
    assert "Traceback" not in daemon.output()


def test_sighup_reloads_the_log_level_and_names_what_needs_a_restart(setup, tmp_path):
    engine, daemon, port, _ = setup
    conf = tmp_path / "callctl.yaml"
    conf.write_text("log:\n  level: warning\n")
    daemon.env.update({"CALLCTL_CONFIG": str(conf), "CALLCTL_METRICS_LISTEN": f"127.0.0.1:{free_port()}"})
    daemon.env.pop("CALLCTL_LOG_FORMAT")  # the file's format: console, then json after the reload
    daemon.start()
    try:
        conf.write_text("log:\n  level: info\n  format: json\nquarantine_days: 7\nagi:\n  command_timeout: 9\n")
        daemon.proc.send_signal(signal.SIGHUP)
        event = wait_for(lambda: next((e for e in harness.json_events(daemon.output())
                                       if e.get("event") == "configuration reloaded"), None), "no reload")
        assert event["applied"] == ["agi.command_timeout", "log.format", "log.level"]
        assert event["needs_restart"] == ["quarantine_days"]
        # now at info level: a routed call is logged
        asyncio.run(agi_session(port, "route", "h-1", env={"agi_extension": X, "agi_callerid": AGENT}))
        wait_for(lambda: any(e.get("event") == "call routed" for e in harness.json_events(daemon.output())),
                 "info level not applied")

        conf.write_text("log: [not, a, mapping\n")  # broken: refused, nothing changes
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: any(e.get("event") == "reload refused: configuration not valid, nothing changed"
                             for e in harness.json_events(daemon.output())), "bad file not refused")
        assert daemon.proc.poll() is None
        assert asyncio.run(hangup(port, "1700000001.1", time.time())) == "written"
    finally:
        assert daemon.stop() == 0
    engine.dispose()
    assert "Traceback" not in daemon.output()


def test_the_api_process_serves_its_own_health_and_metrics(setup, cluster, tmp_path):
    engine, _, _, _ = setup  # a migrated database on a cluster this test can stop
    mport = free_port()
    url = engine.url.render_as_string(hide_password=False)
    with harness.ApiServer(url, tmp_path, {"CALLCTL_API_METRICS_LISTEN": f"127.0.0.1:{mport}"}):
        assert healthz(mport) == (200, {"status": "ready", "database": "ok"})
        metrics = scrape(mport)
        assert ("process_cpu_seconds_total",) in metrics
        assert metrics[("callctl_webhook_outbox_depth",)] == 0
        cluster.stop("immediate")
        status, body = healthz(mport)
        assert status == 503 and body["database"].startswith("not answering")
    engine.dispose()


def test_the_sample_dashboard_reads_only_metrics_the_daemon_exports():
    import re
    from pathlib import Path

    from prometheus_client import REGISTRY

    import callctl.metrics  # noqa: F401 (registers them)

    exported = {sample.name for family in REGISTRY.collect() for sample in family.samples}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    exported |= {family.name + suffix for family in REGISTRY.collect() for suffix in suffixes.get(family.type, ())}
    dashboard = json.loads((Path(__file__).parent.parent / "conf/grafana/callctl-dashboard.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"callctl_\w+", target["expr"])}
    assert used and used <= exported, used - exported


def test_a_taken_metrics_address_stops_the_daemon_with_a_clear_error(setup):
    engine, daemon, port, _ = setup
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        daemon.env["CALLCTL_METRICS_LISTEN"] = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(harness.LabError):
            daemon.start(timeout=20)
        assert daemon.proc.wait(10) == 2
    out = daemon.output()
    assert "config error: metrics listen address" in out and "Traceback" not in out
    engine.dispose()
