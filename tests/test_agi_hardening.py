"""FastAGI input the PBX (or anyone on its port) may send, through the real adapter on a
real socket, on SQLite and PostgreSQL: numbers that are not ours stay masked, logged
identifiers are short, hangup values are validated and clamped (the CDR is kept), and a
call has one CDR whatever its other fields say (issue 15, items 12-14)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import select

from callctl.core.numbers import call_identifier
from callctl.store import bindings, pool, tenants
from callctl.store.db import make_engine, upgrade
from callctl.store.calls import write_cdr
from callctl.store.models import Cdr
from tests import leaks, realnumbers
from tests.agidaemon import env_bytes, running, set_variables

X = "+8617100000101"
AGENT, HOTLINE = realnumbers.tenant_line("+8613900000101", "+861058000101")
CUSTOMER, UNKNOWN_X = realnumbers.person("+8613800000101", "+8613800000177")
ALL_DAY = "00:00-24:00"
EPOCH = int(datetime.now(timezone.utc).timestamp()) - 60


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def provisioned(request, tmp_path_factory):
    """One database of each kind for the whole module: every test uses its own call ids."""
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('agi')}/callctl.db")
    else:
        engine = make_engine(request.getfixturevalue("pg_url"))
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    upgrade(engine)
    tenants.add_tenant(engine, "acme", HOTLINE, callers=[AGENT], hours=ALL_DAY)
    pool.add_numbers(engine, "acme", [X])
    bindings.bind(engine, "acme", CUSTOMER)
    yield engine
    leaks.record_tables(engine, request.node.nodeid)
    engine.dispose()


@pytest.fixture(scope="module")
def daemon(provisioned, request, tmp_path_factory):
    url = request.getfixturevalue("pg_url") if provisioned.dialect.name == "postgresql" else None
    with running(provisioned, url, tmp_path_factory.mktemp("spool")) as d:
        yield d


def cdrs(engine, call_id=None) -> list[dict]:
    query = select(Cdr.__table__).order_by(Cdr.id)
    if call_id is not None:
        query = query.where(Cdr.call_id == call_id)
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


def hangup_args(**values) -> list[str]:
    base = {"called": X, "caller": AGENT, "dest": CUSTOMER, "action": "bridge", "reason": "",
            "binding": "", "tenant": "", "direction": "to_customer", "start": f"{EPOCH}.250",
            "end": f"{EPOCH + 30}.500", "dialstatus": "ANSWER", "dialedtime": "20000",
            "answeredtime": "15000", "hangupcause": "16", "node": "lab"}
    base.update(values)
    return [f"{k}={v}" for k, v in base.items()]


def hangup(daemon, uniqueid, **values) -> str | None:
    commands = daemon.session(env_bytes("hangup", uniqueid, hangup_args(**values)))
    return set_variables(commands).get("CALLCTL_CDR")


def national_forms(number: str) -> list[str]:
    return [number.lstrip("+"), number[3:]]


# --- item 12 ------------------------------------------------------------------------

def test_unknown_x_that_looks_like_a_real_number_is_masked_in_log_and_cdr(daemon, provisioned):
    commands = daemon.session(env_bytes("route", f"lab-{EPOCH}.1", extra={"agi_extension": UNKNOWN_X,
                                                                          "agi_callerid": AGENT}))
    assert set_variables(commands)["CALLCTL_REASON"] == "unknown_number"
    assert hangup(daemon, f"lab-{EPOCH}.1", called=UNKNOWN_X, action="reject", reason="unknown_number",
                  dest="", dialstatus="", dialedtime="", answeredtime="") == "written"
    # A known X is logged and stored as it is: it is ours and public.
    daemon.session(env_bytes("route", f"lab-{EPOCH}.2", extra={"agi_extension": X, "agi_callerid": AGENT}))
    assert hangup(daemon, f"lab-{EPOCH}.2") == "written"

    logged = daemon.log_text()
    for form in national_forms(UNKNOWN_X):
        assert form not in logged
    assert "+86138****0177" in logged
    assert X in logged
    (unknown,) = cdrs(provisioned, f"lab-{EPOCH}.1")
    assert unknown["virtual_number"] == "+86138****0177"
    assert cdrs(provisioned, f"lab-{EPOCH}.2")[0]["virtual_number"] == X


def test_logged_identifiers_are_capped(daemon, provisioned):
    uniqueid = "lab-" + "9" * 60_000 + f"{EPOCH}.3"
    before = len(cdrs(provisioned))
    commands = daemon.session(env_bytes("route", uniqueid, extra={"agi_extension": X, "agi_callerid": AGENT}))
    assert set_variables(commands)["CALLCTL_ACTION"] == "bridge"
    assert hangup(daemon, uniqueid) == "written"
    lines = daemon.log_text().splitlines()
    assert lines and max(len(line) for line in lines) < 1000
    assert len(cdrs(provisioned)) == before + 1


# --- item 13 ------------------------------------------------------------------------

def test_hangup_values_are_validated_and_clamped_and_the_cdr_kept(daemon, provisioned):
    outcome = hangup(daemon, f"lab-{EPOCH}.4", answeredtime="99999999999", dialedtime="99999999999",
                     hangupcause="99999999999", dialstatus="ANS\x01WER" + "X" * 40)
    assert outcome == "written"  # not spooled: the database took it
    (cdr,) = cdrs(provisioned, f"lab-{EPOCH}.4")
    duration = (cdr["ended_at"] - cdr["started_at"]).total_seconds()
    assert duration == pytest.approx(30.25)
    assert 0 <= cdr["talk_seconds"] <= duration
    assert 0 <= cdr["ring_seconds"] <= duration
    assert cdr["started_at"] <= cdr["answered_at"] <= cdr["ended_at"]
    assert cdr["hangup_cause"] is None
    assert cdr["dial_status"] is None
    assert daemon.spool.pending() == 0


def test_an_end_before_the_start_is_clamped(daemon, provisioned):
    assert hangup(daemon, f"lab-{EPOCH}.5", end=f"{EPOCH - 5000}", answeredtime="5000", dialedtime="") == "written"
    (cdr,) = cdrs(provisioned, f"lab-{EPOCH}.5")
    assert cdr["ended_at"] >= cdr["started_at"]
    assert cdr["talk_seconds"] == 0 and cdr["ring_seconds"] == 0


# --- item 14 ------------------------------------------------------------------------

def test_one_cdr_per_call_whatever_the_start_says(daemon, provisioned):
    for n, start in enumerate(["", f"{EPOCH}", f"{EPOCH + 3}.999", "1000000001", "garbage",
                               f"{EPOCH + 86400 * 30}", f"{EPOCH - 86400}"]):
        uniqueid = f"lab-{EPOCH}.6{n}"
        assert hangup(daemon, uniqueid) == "written"
        assert hangup(daemon, uniqueid, start=start, end="", dialstatus="BUSY", answeredtime="") == "duplicate", start
        assert len(cdrs(provisioned, uniqueid)) == 1


def test_one_cdr_per_call_without_an_epoch_in_the_uniqueid(daemon, provisioned):
    uniqueid = "7f6c5e1a-2b3c-4d5e-8f90-a1b2c3d4e5f6"
    assert hangup(daemon, uniqueid) == "written"
    assert hangup(daemon, uniqueid, start="") == "duplicate"
    assert hangup(daemon, uniqueid, start=f"{EPOCH + 7}") == "duplicate"
    assert len(cdrs(provisioned, uniqueid)) == 1


def test_the_same_uniqueid_on_another_node_is_another_call(daemon, provisioned):
    uniqueid = f"{EPOCH}.8"  # no systemname: the uniqueid alone does not tell the boxes apart
    assert hangup(daemon, uniqueid, node="pbx1") == "written"
    assert hangup(daemon, uniqueid, node="pbx2", start=f"{EPOCH}.900") == "written"
    assert hangup(daemon, uniqueid, node="pbx2", start="") == "duplicate"
    assert sorted(c["node"] for c in cdrs(provisioned, uniqueid)) == ["pbx1", "pbx2"]


def test_replayed_and_imported_rows_are_one_cdr_per_call_too(provisioned):
    """The SQLAlchemy path (spool replay, `cdr import-pbx`) keeps the same rule."""
    started = datetime.fromtimestamp(EPOCH, timezone.utc)
    row = {"call_id": f"lab-{EPOCH}.9", "decision": "rejected", "reject_reason": "unknown_caller",
           "started_at": started, "ended_at": started + timedelta(seconds=3), "node": "lab",
           "virtual_number": X, "caller_masked": "anonymous"}
    assert write_cdr(provisioned, row) is True
    assert write_cdr(provisioned, {**row, "started_at": started + timedelta(seconds=1)}) is False
    assert len(cdrs(provisioned, row["call_id"])) == 1


# --- fuzzing: the environment, the arguments and the answers to the daemon's commands ---
# Run longer with `--hypothesis-profile fuzz-long`; replay with `--hypothesis-seed N`.

PEOPLE_HERE = (CUSTOMER, UNKNOWN_X)
_numbers = st.sampled_from([X, AGENT, CUSTOMER, UNKNOWN_X, CUSTOMER[3:], "0086" + UNKNOWN_X[1:], "anonymous", ""])
_garbage = st.one_of(
    st.text(max_size=40).map(lambda t: t.replace("\n", "")),
    st.integers(min_value=-(10 ** 20), max_value=10 ** 20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["²", "٣٣", "1e20", "99999999999", "\x00", "nan", "-1", "16\x00"]),
)
_value = st.one_of(_numbers, _garbage)
_epochish = st.one_of(st.integers(min_value=EPOCH - 10, max_value=EPOCH + 10).map(str), _garbage)
_uniqueid = st.one_of(
    st.integers(min_value=0, max_value=10 ** 6).map(lambda n: f"lab-{EPOCH}.{n}"),
    st.text(min_size=1, max_size=200).map(lambda t: t.replace("\n", "").replace("\r", "")).filter(str.strip),
    st.sampled_from([UNKNOWN_X, "lab-" + "7" * 5000 + f"{EPOCH}.1"]),
)
_HANGUP_KEYS = ("called", "caller", "dest", "action", "reason", "binding", "tenant", "direction", "start", "end",
                "dialstatus", "dialedtime", "answeredtime", "hangupcause", "node")
_hangup_values = st.fixed_dictionaries(
    {key: st.one_of(_epochish if key in ("start", "end") else _value,
                    st.sampled_from(["bridge", "reject", "extension", "unknown_number", "to_customer", "ANSWER",
                                     "1", "16", "lab"]))
     for key in _HANGUP_KEYS})
_ANSWERS = [b"200 result=1\n", b"200 result=0\n", b"510 Invalid or unknown command\n", b"511 Command Not Permitted\n",
            b"520-Invalid command syntax.\nUsage: x\n520 End of proper usage.\n", b"HANGUP\n200 result=1\n",
            b"100 result=0 Trying...\n200 result=1\n", b"garbage\n", b"\xff\xfe\n", None]


@st.composite
def agi_sessions(draw):
    """(script, uniqueid, the bytes sent, the answer to each command)."""
    script = draw(st.sampled_from(["route", "hangup", "hangup", "other"]))
    uniqueid = draw(_uniqueid)
    extra = {"agi_extension": draw(_value), "agi_callerid": draw(_value)}
    if script == "route":
        args = [f"{k}={draw(_value)}" for k in draw(st.lists(st.sampled_from(["called", "caller", "extension"]),
                                                              max_size=3, unique=True))]
    else:
        values = draw(_hangup_values)
        args = [f"{k}={values[k]}" for k in draw(st.permutations(_HANGUP_KEYS))[:draw(st.integers(0, 15))]]
    args += draw(st.lists(st.text(max_size=30).map(lambda t: t.replace("\n", "")), max_size=2))
    data = env_bytes(script, uniqueid, args, extra)
    mangle = draw(st.sampled_from(["none", "none", "none", "bytes", "cut", "binary"]))
    if mangle == "bytes":  # invalid UTF-8, NUL and CR inside values
        data = data.replace(b"=", draw(st.sampled_from([b"=\xe9", b"=\x00", b"=\r", b"=\xff\xfe"])), 1)
    elif mangle == "cut":
        data = data[:draw(st.integers(0, max(len(data) - 1, 0)))]
    elif mangle == "binary":
        data = draw(st.binary(max_size=300))
    answer = draw(st.sampled_from(_ANSWERS))
    return script, uniqueid, data, mangle, answer


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(sessions=st.lists(agi_sessions(), min_size=1, max_size=4))
def test_fuzz_agi_sessions_never_crash_lose_or_leak(daemon, provisioned, sessions):
    for script, uniqueid, data, mangle, answer in sessions:
        commands = daemon.session(data, lambda line: answer, half_close=mangle in ("cut", "binary"))
        variables = set_variables(commands)
        if mangle != "none":
            continue
        if script == "route":
            assert commands, "a routed call always gets its variables"
            if answer == b"200 result=1\n":
                assert variables.get("CALLCTL_ACTION") in ("bridge", "reject", "extension")
        elif script == "hangup":
            # The CDR is written before the acknowledgement is sent: whatever the answer.
            assert commands and commands[-1].startswith(b"SET VARIABLE CALLCTL_CDR ")
            assert variables["CALLCTL_CDR"] in ("written", "duplicate")  # never refused by the database
            stored = call_identifier(uniqueid, 150)
            assert len(cdrs(provisioned, stored)) >= 1
        else:
            assert not commands
    logged = daemon.log_text()
    for failure in ("handler failed", "session failed", "Traceback", "spooled"):
        assert failure not in logged
    assert daemon.spool.pending() == 0
    rows = repr(cdrs(provisioned))
    for number in PEOPLE_HERE:
        for form in national_forms(number):
            assert form not in logged and form not in rows
