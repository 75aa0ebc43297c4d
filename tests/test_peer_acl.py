"""Only the PBX may talk to the FastAGI (and ESL) port: the real daemon drops a peer outside
`agi.allow` at connect, before it reads a byte, so a stranger gets neither a route
answer (which carries a real number) nor a CDR written (issue #15, item 8)."""
from __future__ import annotations

import socket
import time

import pytest
from sqlalchemy import func, select

from callctl import config, netacl
from callctl.store import bindings, pool, tenants
from callctl.store.db import make_engine, upgrade
from callctl.store.models import Cdr
from lab import harness
from tests import realnumbers

X = "+8617100000001"
AGENT, HOTLINE = realnumbers.tenant_line("+8613900000001", "+861058000000")
CUSTOMER = realnumbers.person("+8613800000001")


def agi(port: int, source: str, script: str, uniqueid: str, env: dict, args: list[str] = ()) -> tuple[bytes, bool]:
    """One FastAGI session from `source`, answering every command with success. Returns
    what the daemon wrote and whether it closed without a word."""
    lines = {"agi_network_script": script, "agi_request": f"agi://127.0.0.1:{port}/{script}",
             "agi_channel": "PJSIP/carrier-00000001", "agi_uniqueid": uniqueid, **env}
    lines.update({f"agi_arg_{n}": arg for n, arg in enumerate(args, 1)})
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=15, source_address=(source, 0)) as sock:
        try:
            sock.sendall(b"".join(f"{k}: {v}\n".encode() for k, v in lines.items()) + b"\n")
            while chunk := sock.recv(65536):
                received += chunk
                sock.sendall(b"200 result=1\n" * chunk.count(b"\n"))
        except (ConnectionResetError, BrokenPipeError):
            pass
    return received, received == b""


def bound_database(tmp_path):
    """A SQLite database with acme, its agent, X and X bound to the customer: its URL and engine."""
    url = f"sqlite:///{tmp_path}/callctl.db"
    engine = make_engine(url)
    upgrade(engine)
    tenants.add_tenant(engine, "acme", HOTLINE, callers=[AGENT], hours="00:00-24:00")
    pool.add_numbers(engine, "acme", [X])
    bindings.bind(engine, "acme", CUSTOMER)
    return url, engine


@pytest.fixture
def daemon(tmp_path):
    url, engine = bound_database(tmp_path)
    port = harness.free_port()
    proc = harness.callctl_daemon(url, tmp_path, port=port, extra_env={"CALLCTL_AGI_ALLOW": "127.0.0.1/32"})
    with proc:
        yield engine, port, proc
    engine.dispose()


def cdrs(engine) -> int:
    with engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(Cdr))


def test_a_peer_outside_the_allow_list_is_dropped_at_connect(daemon):
    engine, port, proc = daemon
    call = {"agi_extension": X, "agi_callerid": AGENT}
    said, dropped = agi(port, "127.0.0.2", "route", "stranger.1", call)
    assert dropped and CUSTOMER.encode() not in said
    said, dropped = agi(port, "127.0.0.2", "hangup", "stranger.2", {}, [
        f"called={X}", f"caller={AGENT}", "action=bridge", "tenant=1", "start=1700000000", "end=1700000060",
        "dialstatus=ANSWER", "answeredtime=50", "hangupcause=16"])
    assert dropped and cdrs(engine) == 0  # no CDR for a call never routed, from a stranger
    said, dropped = agi(port, "127.0.0.1", "route", "pbx.1", call)  # the PBX still gets its answer
    assert not dropped and CUSTOMER.encode() in said
    proc.stop()
    events = [e for e in harness.json_events(proc.output()) if e.get("event") == "agi peer refused"]
    assert [e["peer"].rsplit(":", 1)[0] for e in events] == ["127.0.0.2", "127.0.0.2"]


def test_allow_list_config_and_matching():
    assert config.load(environ={}).agi.allow == ["127.0.0.1/32", "::1/128"]
    cfg = config.load(environ={"CALLCTL_AGI_ALLOW": "10.0.0.0/24, 192.0.2.7"})
    assert cfg.agi.allow == ["10.0.0.0/24", "192.0.2.7/32"]
    with pytest.raises(config.ConfigError, match="'10.0.0.300' is not an IP address or CIDR"):
        config.load(environ={"CALLCTL_AGI_ALLOW": "10.0.0.300"})
    allow = netacl.AllowList.of(cfg.agi.allow)
    assert allow.allows("10.0.0.99") and allow.allows("::ffff:192.0.2.7") and allow.allows_peername(("192.0.2.7", 5))
    assert not allow.allows("10.0.1.1") and not allow.allows("127.0.0.1") and not allow.allows("not-an-ip")
    assert not allow.allows_peername("/run/agi.sock")


def test_an_esl_peer_outside_the_allow_list_is_dropped_at_connect(tmp_path):
    """The FreeSWITCH backend's outbound-socket server: a peer outside freeswitch.allow
    is closed before the daemon says a word (no `connect`, no decision, no CDR); the
    PBX's own call is served."""
    from tests.fakefs import FakeCall
    from tests.test_reload import esl_first_bytes

    url, engine = bound_database(tmp_path)
    port = harness.free_port()
    proc = harness.callctl_daemon(url, tmp_path, port=port, pbx="freeswitch",
                                  extra_env={"CALLCTL_FREESWITCH_ALLOW": "127.0.0.1/32"})
    with proc:
        assert esl_first_bytes(port, "127.0.0.2") == b""  # a stranger: closed at once
        fake = FakeCall(port, {"callctl_called": X, "callctl_caller": AGENT, "callctl_sounds": "/fake/sounds",
                               "callctl_outbound": "sofia/gateway/phones"})  # the PBX, from 127.0.0.1
        fake.run()
        deadline = time.monotonic() + 10
        while cdrs(engine) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert fake.commands[0] == "connect" and ("bridge" in [name for name, _ in fake.apps])
    assert cdrs(engine) == 1  # the PBX's call only
    refused = [e for e in harness.json_events(proc.output()) if e.get("event") == "esl peer refused"]
    assert [e["peer"].rsplit(":", 1)[0] for e in refused] == ["127.0.0.2"]
    engine.dispose()
