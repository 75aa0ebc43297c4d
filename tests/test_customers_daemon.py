"""Issue #16 through the real processes, on SQLite and PostgreSQL:

- expiry: one X, a 2-second binding, no command in between, the default configuration
  (a 30-day cooldown after unbind): the daemon's housekeeping releases it, X rests as
  long as the binding lived (2 seconds) and a new bind succeeds; the old binding reads
  `expired` on the CLI and the API;
- webhooks: refused and ended calls reported by a fake Asterisk over FastAGI to the real
  daemon reach a real local HTTP receiver through `callctl webhook deliver`, signed
  (verified with the snippet of docs/webhooks.md), and with the receiver down for a
  while every event arrives once it is back, none twice.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from callctl.store import pool
from callctl.store.db import make_engine
from lab import harness
from tests import leaks, realnumbers
from tests.pg import empty_database_url
from tests.test_cdr_durability import agi_session
from tests.test_cli import CALLCTL, run

X = "+8617100018101"
AGENT, HOTLINE = realnumbers.tenant_line("+8613900000181", "+861058000181")
CUSTOMER, CUSTOMER_2 = "+8613800000181", "+8613800000182"
SECRET = "whsec-test-0123456789abcdef"


@pytest.fixture(params=["sqlite", "postgresql"])
def box(request, tmp_path):
    """A database set up through the CLI (one tenant, one X) and the daemon on a free
    port, releasing expired bindings every second (cooldowns as configured by default)."""
    url = empty_database_url(request, tmp_path)
    env = {"PATH": "/usr/bin:/bin", "CALLCTL_DATABASE_URL": url, "CALLCTL_SPOOL_DIR": str(tmp_path / "spool")}
    cli = lambda *args, **more: run(*args, env={**env, **more}, cwd=tmp_path)  # noqa: E731
    for args in (["db", "upgrade"],
                 ["tenant", "add", "acme", "--hotline", HOTLINE, "--caller", AGENT, "--hours", "00:00-24:00"],
                 ["pool", "add", "--tenant", "acme", X]):
        done = cli(*args)
        assert done.returncode == 0, done.stderr
    port = harness.free_port()
    daemon = harness.callctl_daemon(url, tmp_path, port=port, extra_env={
        "CALLCTL_HOUSEKEEPING_SECONDS": "1"})
    daemon.start()
    engine = make_engine(url)
    try:
        yield {"cli": cli, "url": url, "port": port, "daemon": daemon, "engine": engine, "dir": tmp_path}
    finally:
        daemon.stop()
        engine.dispose()


def _until(check, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, "not within the deadline"
        time.sleep(0.2)
    return found


def test_expired_binding_frees_the_only_x_by_the_daemons_housekeeping(box):
    cli = box["cli"]
    old = json.loads(cli("bind", "--tenant", "acme", "--customer", CUSTOMER, "--ttl", "2").stdout)
    # Nobody acts: the daemon's housekeeping puts X in quarantine, for the 2 seconds the
    # binding lived (not the 30 days an unbound X rests); then a bind takes X again.
    _until(lambda: pool.pool_status(box["engine"], "acme")["quarantined"] == 1)
    new = _until(lambda: (done := cli("bind", "--tenant", "acme", "--customer", CUSTOMER_2)).returncode == 0 and done)
    assert json.loads(new.stdout)["x"] == X
    assert json.loads(cli("binding", "get", str(old["id"])).stdout)["status"] == "expired"
    listed = cli("binding", "list", "--status", "expired", "--json")
    assert [b["id"] for b in json.loads(listed.stdout)["items"]] == [old["id"]]
    token = json.loads(cli("token", "create", "--tenant", "acme", "--name", "acme policies").stdout)["token"]
    with harness.ApiServer(box["url"], box["dir"]) as server, httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {token}"}) as api:
        got = api.get(f"/v1/bindings/{old['id']}")
        expired = api.get("/v1/bindings", params={"status": "expired"})
        leaks.record("api", "bindings", got.text + expired.text)
    assert got.json()["status"] == "expired"
    assert [b["id"] for b in expired.json()["items"]] == [old["id"]]
    assert "expired bindings released" in box["daemon"].output()


# --- webhooks -------------------------------------------------------------------------------

class Receiver:
    """An insurer's endpoint: records every POST (headers, body); stop() and start()
    again on the same port to be down for a while."""

    def __init__(self):
        self.port = harness.free_port()
        self.url = f"http://127.0.0.1:{self.port}/callctl-events"
        self.got: list[tuple[dict, bytes]] = []
        self.server = None

    def start(self) -> None:
        got = self.got

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def verify(secret: str, headers: dict, body: bytes) -> bool:
    """docs/webhooks.md's five lines, as an insurer writes them."""
    stamp, signature = headers["callctl-timestamp"], headers["callctl-signature"]
    expected = "v1=" + hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    fresh = abs(time.time() - int(stamp)) < 300
    return fresh and hmac.compare_digest(expected, signature)


def _call(port: int, call_id: str, caller: str, action: str, reason: str = "") -> dict:
    """A call as Asterisk reports it: the route AGI, then the hangup AGI with its outcome."""
    async def both():
        routed = await agi_session(port, "route", call_id, env={"agi_extension": X, "agi_callerid": caller})
        start = time.time() - 5
        args = [f"called={X}", f"caller={caller}", f"dest={CUSTOMER if action == 'bridge' else ''}",
                f"action={action}", f"reason={reason}", f"binding={routed.get('CALLCTL_BINDING', '')}",
                f"tenant={routed.get('CALLCTL_TENANT', '')}", f"direction={routed.get('CALLCTL_DIRECTION', '')}",
                f"start={start:.3f}", f"end={start + 4:.3f}", "dialstatus=ANSWER" if action == "bridge" else "dialstatus=",
                "dialedtime=4000", "answeredtime=3000" if action == "bridge" else "answeredtime=",
                "hangupcause=16" if action == "bridge" else "hangupcause=21", "node=t"]
        acked = await agi_session(port, "hangup", call_id, args)
        return {**routed, "CDR": (acked or {}).get("CALLCTL_CDR")}
    return asyncio.run(both())


def test_webhooks_signed_and_every_event_arrives_once_after_the_endpoint_was_down(box):
    cli, port = box["cli"], box["port"]
    receiver = Receiver()
    receiver.start()
    assert cli("webhook", "add", "--tenant", "acme", "--url", receiver.url, "--secret", SECRET).returncode == 0
    cli("bind", "--tenant", "acme", "--customer", CUSTOMER)
    assert cli("customer", "set", "--tenant", "acme", "--customer", CUSTOMER, "--calls", "none",
               "--channel", "app").returncode == 0
    refused = _call(port, "wh-1700000001.1", AGENT, "reject", "opted_out")
    assert refused["CALLCTL_REASON"] == "opted_out" and refused["CDR"] == "written"
    delivered = cli("webhook", "deliver")
    assert delivered.returncode == 0, delivered.stderr
    assert json.loads(delivered.stdout)["sent"] == 2  # the preference change, the refused call
    kinds = {json.loads(body)["type"]: (headers, body) for headers, body in receiver.got}
    headers, body = kinds["call.refused"]
    assert verify(SECRET, headers, body) and not verify("another-secret-0123456789", headers, body)
    event = json.loads(body)
    assert event["data"]["reject_reason"] == "opted_out" and event["suggestion"]["channel"] == "app"
    assert headers["callctl-event-id"] == event["id"]
    assert CUSTOMER[3:] not in body.decode() and event["data"]["callee_masked"] is None

    # The endpoint goes down; calls go on and their events wait.
    receiver.stop()
    follower = subprocess.Popen([str(CALLCTL), "webhook", "deliver", "--follow", "--interval", "0.2"],
                                env={"PATH": "/usr/bin:/bin", "CALLCTL_DATABASE_URL": box["url"],
                                     "CALLCTL_KEYS": __import__("os").environ["CALLCTL_KEYS"],
                                     "CALLCTL_WEBHOOK_RETRY_SECONDS": "0.2", "CALLCTL_WEBHOOK_MAX_RETRY_SECONDS": "1"},
                                cwd=box["dir"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert cli("customer", "set", "--tenant", "acme", "--customer", CUSTOMER, "--calls", "allowed").returncode == 0
        for n in range(4):
            routed = _call(port, f"wh-1700000002.{n}", AGENT, "bridge")
            assert routed["CALLCTL_ACTION"] == "bridge" and routed["CDR"] == "written"
        _until(lambda: json.loads(cli("webhook", "list", "--json").stdout)[0]["failing"] > 0)
        receiver.start()
        _until(lambda: len(receiver.got) >= 2 + 5)
        _until(lambda: json.loads(cli("webhook", "list", "--json").stdout)[0]["pending"] == 0)
    finally:
        follower.terminate()
        out, _ = follower.communicate(timeout=30)
        receiver.stop()
    ids = [json.loads(body)["id"] for _, body in receiver.got]
    assert len(ids) == len(set(ids)) == 7, ids
    assert all(verify(SECRET, h, b) for h, b in receiver.got)
    assert sorted(json.loads(b)["type"] for _, b in receiver.got).count("call.ended") == 4
    status = json.loads(cli("webhook", "list", "--json").stdout)[0]
    assert status["delivered"] == 7 and status["pending"] == 0
    leaks.record("api", "webhook bodies", "\n".join(b.decode() for _, b in receiver.got))
    leaks.record("log", "webhook deliverer", out)
