"""SIGHUP reloads what can change while running, in the real processes an administrator
runs: the daemon reads the protection profiles' hours from the anomaly rules file again
(the next call is decided by them), the FreeSWITCH daemon takes a new ESL allow-list
(applied, not named as needing a restart, and the server lets the new peer in), and
`callctl anomaly run --follow` and `callctl webhook deliver --follow` survive SIGHUP,
read their settings again and log what changed."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from callctl.store import bindings, calls, pool, tenants
from callctl.store.db import make_engine, upgrade
from lab import harness
from lab.agiclient import agi_session
from tests import leaks
from tests.test_customers import _cdr, _tenants
from tests.test_customers_daemon import Receiver

REPO = Path(__file__).resolve().parent.parent
X, AGENT, CUSTOMER, HOTLINE = "+8617100000061", "+8613900000061", "+8613800000061", "+861058000061"
ELDERLY_HOURS = '    hours: "09:00-18:00"\n'  # conf/anomaly.yaml's elderly profile


def wait_for(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return value


def event(text: str, name: str) -> dict | None:
    return next((e for e in harness.json_events(text) if e.get("event") == name), None)


def rules_with_elderly_hours(path: Path, hours: str) -> None:
    text = (REPO / "conf" / "anomaly.yaml").read_text()
    assert text.count(ELDERLY_HOURS) == 1
    path.write_text(text.replace(ELDERLY_HOURS, f'    hours: "{hours}"\n'))


def hours_without_now() -> str:
    """An hour of the day that is not now in the tenant's zone (Asia/Shanghai)."""
    return "20:00-21:00" if datetime.now(ZoneInfo("Asia/Shanghai")).hour < 12 else "08:00-09:00"


def test_sighup_reloads_the_protection_profiles_hours(tmp_path):
    url = f"sqlite:///{tmp_path}/callctl.db"
    engine = make_engine(url)
    upgrade(engine)
    tenants.add_tenant(engine, "acme", HOTLINE, callers=[AGENT], hours="00:00-24:00")
    pool.add_numbers(engine, "acme", [X])
    bindings.bind(engine, "acme", CUSTOMER, profile="elderly")
    engine.dispose()
    rules = tmp_path / "anomaly.yaml"
    rules_with_elderly_hours(rules, "00:00-24:00")
    port = harness.free_port()
    daemon = harness.callctl_daemon(url, tmp_path, port=port, extra_env={"CALLCTL_ANOMALY_RULES": str(rules)})

    def route(call_id: str) -> dict:
        return asyncio.run(agi_session(port, "route", call_id, env={"agi_extension": X, "agi_callerid": AGENT}))

    with daemon:
        assert route("p-1")["CALLCTL_ACTION"] == "bridge"
        rules_with_elderly_hours(rules, hours_without_now())
        daemon.proc.send_signal(signal.SIGHUP)
        reloaded = wait_for(lambda: event(daemon.output(), "configuration reloaded"), "no reload logged")
        assert reloaded["applied"] == ["profile hours"] and reloaded["needs_restart"] == []
        refused = route("p-2")
        assert (refused["CALLCTL_ACTION"], refused["CALLCTL_REASON"]) == ("reject", "outside_hours")

        rules.write_text("profiles: [not, a, mapping\n")  # broken: the hours in force are kept
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: event(daemon.output(), "protection profiles' hours not reloaded: rules file not valid, "
                                                "hours kept"), "bad rules file not refused")
        assert route("p-3")["CALLCTL_REASON"] == "outside_hours"
    assert daemon.proc.returncode == 0 and "Traceback" not in daemon.output()


def esl_first_bytes(port: int, source: str) -> bytes:
    """Connect from `source` as FreeSWITCH's socket application would: what the daemon
    says first (b"connect\\n\\n" to a peer it serves; b"" when it drops it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=15, source_address=(source, 0)) as sock:
        try:
            return sock.recv(4096)
        except ConnectionResetError:
            return b""


def test_sighup_applies_a_new_esl_allow_list(tmp_path):
    url = f"sqlite:///{tmp_path}/callctl.db"
    upgrade(make_engine(url))
    conf = tmp_path / "callctl.yaml"
    conf.write_text(f"anomaly_rules: {REPO / 'conf' / 'anomaly.yaml'}\nfreeswitch:\n  allow: [127.0.0.1/32]\n")
    port = harness.free_port()
    daemon = harness.callctl_daemon(url, tmp_path, port=port, pbx="freeswitch",
                                    extra_env={"CALLCTL_CONFIG": str(conf)})
    with daemon:
        assert esl_first_bytes(port, "127.0.0.2") == b""  # not allowed yet
        conf.write_text(conf.read_text().replace("[127.0.0.1/32]", "[127.0.0.1/32, 127.0.0.2/32]"))
        daemon.proc.send_signal(signal.SIGHUP)
        reloaded = wait_for(lambda: event(daemon.output(), "configuration reloaded"), "no reload logged")
        assert reloaded["applied"] == ["freeswitch.allow"] and reloaded["needs_restart"] == []
        assert esl_first_bytes(port, "127.0.0.2") == b"connect\n\n"  # the server reads the new list
    refused = [e for e in harness.json_events(daemon.output()) if e.get("event") == "esl peer refused"]
    assert [e["peer"].rsplit(":", 1)[0] for e in refused] == ["127.0.0.2"]
    assert daemon.proc.returncode == 0 and "Traceback" not in daemon.output()


def follow(tmp_path: Path, argv: list[str], env: dict) -> subprocess.Popen:
    callctl = Path(sys.executable).with_name("callctl")
    return subprocess.Popen([str(callctl), *argv], stdout=subprocess.PIPE, stderr=open(tmp_path / "stderr.log", "w"),
                            text=True, cwd=tmp_path, env={**os.environ, "CALLCTL_LOG_FORMAT": "json", **env})


def test_anomaly_follow_survives_sighup_and_reads_its_rules_again(tmp_path):
    url = f"sqlite:///{tmp_path}/callctl.db"
    upgrade(make_engine(url))
    rules = tmp_path / "anomaly.yaml"
    rules.write_text("interval_seconds: 3600\n")  # one pass, then a long pause
    job = follow(tmp_path, ["anomaly", "run", "--follow"],
                 {"CALLCTL_DATABASE_URL": url, "CALLCTL_ANOMALY_RULES": str(rules)})
    try:
        assert "cdrs" in json.loads(job.stdout.readline())  # the first pass
        rules.write_text("interval_seconds: 0.2\n")
        job.send_signal(signal.SIGHUP)
        for _ in range(3):  # passes again, at the new interval: the pause ended, the rules read again
            assert "cdrs" in json.loads(job.stdout.readline())
        assert job.poll() is None
    finally:
        job.send_signal(signal.SIGTERM)
        assert job.wait(30) == 0
    err = (tmp_path / "stderr.log").read_text()
    leaks.record("log", "anomaly-follow-reload", err)
    assert event(err, "anomaly rules reloaded")["changed"] == ["interval_seconds"]
    assert "Traceback" not in err


def test_webhook_deliver_follow_survives_sighup_and_reads_its_settings_again(tmp_path):
    url = f"sqlite:///{tmp_path}/callctl.db"
    engine = make_engine(url)
    upgrade(engine)
    _tenants(engine)
    receiver = Receiver()
    receiver.start()
    from callctl import webhooks

    webhooks.add_webhook(engine, "acme", receiver.url, secret="s" * 20)
    conf = tmp_path / "callctl.yaml"
    conf.write_text("webhooks:\n  timeout: 5\n")
    deliverer = follow(tmp_path, ["webhook", "deliver", "--follow", "--interval", "0.2"],
                       {"CALLCTL_DATABASE_URL": url, "CALLCTL_CONFIG": str(conf)})
    try:
        err = tmp_path / "stderr.log"
        wait_for(lambda: event(err.read_text(), "delivering webhook events until stopped"), "not started")
        conf.write_text("webhooks:\n  timeout: 7\n  retry_seconds: 9\n")
        deliverer.send_signal(signal.SIGHUP)
        reloaded = wait_for(lambda: event(err.read_text(), "webhook settings reloaded"), "no reload logged")
        assert reloaded["changed"] == ["webhooks.retry_seconds", "webhooks.timeout"]
        calls.write_cdrs(engine, [_cdr("reload-1", "bridged")])  # an event for the endpoint
        wait_for(lambda: receiver.got, "nothing delivered after the reload")
        assert deliverer.poll() is None
    finally:
        deliverer.send_signal(signal.SIGTERM)
        out, _ = deliverer.communicate(timeout=30)
        receiver.stop()
        engine.dispose()
    assert deliverer.returncode == 0 and json.loads(out)["sent"] == 1
    text = (tmp_path / "stderr.log").read_text()
    leaks.record("log", "webhook-follow-reload", text)
    assert "Traceback" not in text
