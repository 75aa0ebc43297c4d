"""The FreeSWITCH backend's protocol edges against a fake FreeSWITCH over TCP (tests/
fakefs.py): the real `callctl serve freeswitch` (gevent, a subprocess) on SQLite and on
PostgreSQL (psycopg2 made cooperative). Bytes framing split anywhere, URL-decoded
headers that cannot make headers of their own, replies vs events vs disconnect-notice,
a caller hanging up mid-decision, peers that send garbage, stall or vanish mid-message:
each ends its own session only; the good call beside them is served and recorded."""
from __future__ import annotations

import socket
import threading
import time

import pytest
from sqlalchemy import select

from callctl.freeswitch import esl
from callctl.freeswitch.esl import EslProtocolError, parse_headers
from callctl.freeswitch.fallback import kept_headers
from callctl.freeswitch.server import finished_call, hangup_by
from callctl.store import bindings, pool, tenants
from callctl.store.db import make_engine, upgrade
from callctl.store.models import Cdr
from lab import harness
from tests.fakefs import FakeCall
from tests.pg import TestDatabase

A, AGENT, HOTLINE = "+8613800000031", "+8613900000032", "+861058000033"
X, UNKNOWN_X = "+8617100000031", "+8617199999931"
SOUNDS = "/fake/sounds"


def test_headers_are_url_decoded_one_by_one_after_the_split():
    headers = parse_headers(b"Caller-Caller-ID-Name: %E5%BC%A0%0Avariable_x%3A%20y\nEmpty: \nA: b%3Ac")
    assert headers == {"Caller-Caller-ID-Name": "\u5f20\nvariable_x: y", "Empty": "", "A": "b:c"}
    for garbage in (b"no colon here", b": no name", b"Bad Name: x"):
        with pytest.raises(EslProtocolError):
            parse_headers(garbage)


@pytest.mark.parametrize("disposition, bridged, other_leg, who", [
    ("recv_bye", True, "NORMAL_CLEARING", "caller"), ("recv_cancel", False, "", "caller"),
    ("send_bye", True, "NORMAL_CLEARING", "callee"), ("send_bye", True, "ALLOTTED_TIMEOUT", "pbx"),
    ("send_bye", False, "", "pbx"), ("send_refuse", False, "", "pbx"), ("", True, "NORMAL_CLEARING", ""),
])
def test_who_hung_up_from_the_callers_leg(disposition, bridged, other_leg, who):
    assert hangup_by(disposition, bridged, other_leg) == who


def test_kept_lines_of_both_versions_read():
    """Version 2 adds who hung up before the caller; version 1 lines (kept before it) still read."""
    head = "1733300000000000|1733300009000000|1733300002000000|16|SUCCESS|bridge||7|1|to_customer|+8617100000001|+8613800000031|lab"
    old = kept_headers("u1", f"1|{head}|%2B8613900000031")
    new = kept_headers("u2", f"2|{head}|recv_bye|NORMAL_CLEARING|service|%2B8613900000031")
    assert old["variable_callctl_caller"] == new["variable_callctl_caller"] == "+8613900000031"
    assert finished_call(old).hangup_by == "" and finished_call(new).hangup_by == "caller"
    assert (finished_call(old).purpose, finished_call(new).purpose) == ("", "service")
    assert finished_call(new).talk_seconds == 7.0 and finished_call(new).action == "bridge"
    assert kept_headers("u3", f"2|{head}|%2B8613900000031") is None  # a field short
    assert kept_headers("u4", f"3|{head}|recv_bye|NORMAL_CLEARING|service|%2B8613900000031") is None


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def daemon(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(f"esl-{request.param}")
    database = TestDatabase() if request.param == "postgresql" else None
    url = database.url if database else f"sqlite:///{workdir}/callctl.db"
    engine = make_engine(url)
    upgrade(engine)
    tenants.add_tenant(engine, "acme", HOTLINE, callers=[AGENT], hours="00:00-24:00")
    pool.add_numbers(engine, "acme", [X])
    bindings.bind(engine, "acme", A)
    proc = harness.callctl_daemon(url, workdir, port=harness.free_port(), pbx="freeswitch",
                                  extra_env={"CALLCTL_DB_TIMEOUT": "2"})
    with proc:
        proc.engine = engine
        yield proc
    engine.dispose()
    if database:
        database.drop()


def cdr(daemon, call_id: str, wait: float = 10.0) -> dict | None:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        with daemon.engine.connect() as conn:
            row = conn.execute(select(Cdr).where(Cdr.call_id == call_id)).mappings().first()
        if row:
            return dict(row)
        time.sleep(0.05)
    return None


def call(daemon, called: str, caller: str = AGENT, **run) -> FakeCall:
    fake = FakeCall(daemon.port, {"callctl_called": called, "callctl_caller": caller, "callctl_sounds": SOUNDS,
                                  "callctl_outbound": "sofia/gateway/phones"}, chunk=run.pop("chunk", None))
    fake.run(**run)
    return fake


def test_rejected_call_ends_with_the_tables_cause_and_its_cdr_is_acknowledged(daemon):
    fake = call(daemon, UNKNOWN_X)
    # This channel's events, only the three a session waits for, then linger.
    assert fake.commands[:6] == ["connect", "myevents", *(f"filter Event-Name {name}" for name in esl.EVENTS),
                                 "linger 60"]
    assert fake.apps == [("multiset", "callctl_reason=unknown_number callctl_action=reject"), ("pre_answer", ""),
                         ("playback", f"{SOUNDS}/unknown_number.wav"), ("hangup", "1")]
    row = cdr(daemon, fake.uuid)
    assert (row["decision"], row["reject_reason"], row["hangup_cause"]) == ("rejected", "unknown_number", 1)
    assert row["caller_masked"] == "+86139****0032" and row["node"] == "fake"
    assert fake.acked  # the PBX was told to drop its own copy, after the write


def test_bridge_presents_x_then_ends_with_the_dial_outcome(daemon):
    fake = call(daemon, X, dial_status="NOANSWER")
    names = [name for name, _ in fake.apps]
    assert names == ["multiset", "multiset", "bridge", "hangup"]
    assert fake.apps[1] == ("multiset", "sip_cid_type=none ignore_display_updates=true hangup_after_bridge=true"
                                        " sip_copy_custom_headers=false sip_copy_multipart=false")
    assert fake.apps[2][1] == (f"{{origination_caller_id_number={X},origination_caller_id_name={X},sip_cid_type=none,"
                               f"originate_timeout=31,"
                               f"execute_on_answer='sched_hangup +3601 ALLOTTED_TIMEOUT'}}sofia/gateway/phones/{A}")
    assert fake.apps[3] == ("hangup", "19")  # NOANSWER, as Asterisk's callctl-dialstatus
    row = cdr(daemon, fake.uuid)
    assert (row["decision"], row["dial_status"], row["callee_masked"]) == ("bridged", "NOANSWER", "+86138****0031")


def test_every_message_split_into_single_bytes(daemon):
    fake = call(daemon, UNKNOWN_X, chunk=1)
    assert fake.apps[-1] == ("hangup", "1") and cdr(daemon, fake.uuid)["reject_reason"] == "unknown_number"


def test_a_header_smuggled_in_a_value_stays_in_it(daemon):
    """The caller name carries '\\nvariable_callctl_called: X' (URL-encoded on the wire):
    decoded after the split it is one odd name, not a bound X."""
    fake = FakeCall(daemon.port, {"callctl_called": UNKNOWN_X, "callctl_caller": AGENT, "callctl_sounds": SOUNDS})
    real = fake.channel_headers
    fake.channel_headers = lambda: {**real(), "Caller-Caller-ID-Name": f"x\nvariable_callctl_called: {X}"}
    fake.run()
    assert cdr(daemon, fake.uuid)["reject_reason"] == "unknown_number"


@pytest.mark.parametrize("moment, reason", [("route", "unavailable"), ("playback", "unknown_number")])
def test_caller_hanging_up_mid_call_still_gets_its_cdr(daemon, moment, reason):
    fake = call(daemon, UNKNOWN_X, hang_up_at=moment)
    row = cdr(daemon, fake.uuid)
    assert (row["decision"], row["reject_reason"], row["hangup_cause"]) == ("rejected", reason, 16)
    assert ("hangup", "1") not in fake.apps and fake.acked


def bad_peer(port: int, send: bytes | None, results: dict, name: str) -> None:
    """Connects as FreeSWITCH would, answers `connect` with `send` (None: never), then
    waits until the daemon hangs up on it."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        first = sock.recv(4096)
        if send is not None:
            sock.sendall(send)
        if name == "vanishes":
            sock.shutdown(socket.SHUT_WR)
        while sock.recv(4096):
            pass
        results[name] = first


BAD_PEERS = {
    "garbage": b"HTTP/1.1 400 Bad Request\r\n\r\n",
    "bad length": b"Content-Type: command/reply\nContent-Length: lots\n\n",
    "reply out of turn": b"Content-Type: api/response\nContent-Length: 3\n\n+OK"
                         b"Content-Type: command/reply\nReply-Text: +OK\n\n",
    "vanishes": b"Content-Type: command/reply\nContent-Length: 100\n\nonly part of it",
    "stalls": None,
}


def test_bad_peers_end_their_own_session_only(daemon):
    results: dict = {}
    peers = [threading.Thread(target=bad_peer, args=(daemon.port, send, results, name))
             for name, send in BAD_PEERS.items()]
    for peer in peers:
        peer.start()
    good = call(daemon, UNKNOWN_X)  # served while the bad ones are open
    assert cdr(daemon, good.uuid)["reject_reason"] == "unknown_number"
    for peer in peers:
        peer.join(30)
    assert set(results) == set(BAD_PEERS) and all(first == b"connect\n\n" for first in results.values())
    events = harness.json_events(daemon.output())
    failed = [e for e in events if e["event"] in ("esl session failed", "esl peer closed")]
    assert {e["error"] for e in failed if "error" in e} >= {"EslProtocolError", "EslTimeout"}
    assert not [e for e in events if e["event"] == "esl session crashed"]
    assert daemon.proc.poll() is None
