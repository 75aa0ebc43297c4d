"""FastAGI protocol layer against a fake Asterisk over real sockets.

Every test starts FastAgiServer on 127.0.0.1:0 and speaks the res_agi wire protocol to
it with asyncio streams. Each test also checks the event loop saw no unhandled error
and that no session task is left behind.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import time

import pytest

from callctl.asterisk.fastagi import (
    AgiConnectionClosed,
    _Lines,
    AgiProtocolError,
    AgiTimeout,
    FastAgiServer,
    parse_result_line,
    quote_value,
)

CALLER = "13800138000"       # real numbers: must never show up in a log event
CALLED = "+8657100000001"
DNID = "8657100000001"
SECRET_DEST = "+8613900139000"

IO = 2.0  # seconds any single fake-Asterisk read may take before the test fails


# -- helpers --------------------------------------------------------------------------

def aio(fn):
    """Run an async test with asyncio.run, a global bound, and loop-error checking."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        async def main():
            errors = []
            asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
            await asyncio.wait_for(fn(*args, **kwargs), 10)
            await asyncio.sleep(0)
            assert errors == [], errors
            leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            assert leftover == [], leftover

        asyncio.run(main())

    return wrapper


class CaptureLog:
    """A structlog-shaped logger that records (level, event, fields)."""

    def __init__(self):
        self.events: list[tuple[str, str, dict]] = []

    def _record(level):
        def log(self, event, **kw):
            self.events.append((level, event, kw))
        return log

    debug = _record("debug")
    info = _record("info")
    warning = _record("warning")
    error = _record("error")
    exception = _record("exception")

    def named(self, event):
        return [(level, kw) for level, ev, kw in self.events if ev == event]

    def text(self):
        return repr(self.events)


def env_lines(script="route", uniqueid="1700000000.1", args=(), eol=b"\n", extra=(), skip=()):
    pairs = [
        ("agi_network", "yes"),
        ("agi_network_script", script),
        ("agi_request", f"agi://127.0.0.1:4573/{script}"),
        ("agi_channel", "PJSIP/carrier-00000001"),
        ("agi_language", "en"),
        ("agi_type", "PJSIP"),
        ("agi_uniqueid", uniqueid),
        ("agi_version", "20.5.0"),
        ("agi_callerid", CALLER),
        ("agi_calleridname", "unknown"),
        ("agi_callingpres", "0"),
        ("agi_callingani2", "0"),
        ("agi_callington", "0"),
        ("agi_callingtns", "0"),
        ("agi_dnid", DNID),
        ("agi_rdnis", "unknown"),
        ("agi_context", "callctl-inbound"),
        ("agi_extension", CALLED),
        ("agi_priority", "3"),
        ("agi_enhanced", "0.0"),
        ("agi_accountcode", ""),
        ("agi_threadid", "140234"),
        *extra,
    ]
    pairs += [(f"agi_arg_{i}", a) for i, a in enumerate(args, 1)]
    return [f"{k}: {v}".encode() + eol for k, v in pairs if k not in skip]


def env_block(**kw):
    eol = kw.get("eol", b"\n")
    return b"".join(env_lines(**kw)) + eol


class FakeAsterisk:
    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes):
        self.writer.write(data)
        await self.writer.drain()

    async def command(self) -> bytes:
        """The next command line the daemon sent (with its newline)."""
        return await asyncio.wait_for(self.reader.readline(), IO)

    async def answer(self, *lines: bytes):
        await self.send(b"".join(lines))

    async def closed_after(self) -> float:
        """Read until the daemon closes; return how long that took."""
        start = time.monotonic()
        try:
            rest = await asyncio.wait_for(self.reader.read(), IO)
        except ConnectionError:  # RST (our bytes unread) or our own write hit the closed socket
            rest = b""
        assert rest == b"", rest
        return time.monotonic() - start

    def close(self):
        self.writer.close()


@contextlib.asynccontextmanager
async def serving(routes, **kw):
    log = CaptureLog()
    server = FastAgiServer(routes, "127.0.0.1", 0, log=log, **kw)
    await server.start()
    assert server.port > 0
    try:
        yield server, log
    finally:
        await server.close()
    assert server.active_sessions == 0


async def settle(server, within=IO):
    """Wait until the server has no session left."""
    deadline = time.monotonic() + within
    while server.active_sessions:
        assert time.monotonic() < deadline, "session task left running"
        await asyncio.sleep(0.005)


def recorder():
    seen = []

    async def handler(session):
        seen.append(session)

    return seen, handler


async def normal_session_works(server, seen):
    """A well-behaved route session after whatever came before."""
    before = len(seen)
    agi = await FakeAsterisk.connect(server.port)
    await agi.send(env_block(uniqueid="1700000099.9"))
    await agi.closed_after()
    agi.close()
    assert len(seen) == before + 1
    assert seen[-1].uniqueid == "1700000099.9"


# -- environment ----------------------------------------------------------------------

@aio
async def test_environment_parsed_and_connection_closed_after_handler():
    seen, handler = recorder()
    async with serving({"route": handler}) as (server, log):
        agi = await FakeAsterisk.connect(server.port)
        await agi.send(env_block(args=["called=+8657100000001", "", "note: a: b"]))
        await agi.closed_after()
        agi.close()
    (s,) = seen
    assert s.script == "route"
    assert s.env["agi_callerid"] == CALLER
    assert s.env["agi_extension"] == CALLED
    assert s.env["agi_accountcode"] == ""
    assert s.env["agi_network"] == "yes"
    assert s.args == ["called=+8657100000001", "", "note: a: b"]
    assert s.env["agi_arg_3"] == "note: a: b"
    assert s.hungup is False
    assert s.uniqueid == "1700000000.1"
    assert log.events == []


@aio
async def test_environment_edge_cases_crlf_empty_values_colons_arg_order():
    seen, handler = recorder()
    body = [
        b"agi_network: yes\r\n",
        b"agi_network_script: /hangup?x=1&y=2\r\n",
        b"agi_uniqueid: 1700000000.2\r\n",
        b"agi_callerid: \r\n",           # empty, with the space
        b"agi_calleridname:\r\n",        # empty, no space
        b"agi_rdnis:  two spaces\r\n",   # only the one separator space is dropped
        b"agi_channel: Local/a@b-0001;1: odd: value\r\n",
    ]
    # eleven arguments sent out of order: args follow the number, not the line order
    args = {n: f"k{n}=v{n}" for n in range(1, 12)}
    for n in (10, 2, 11, 1, 3, 9, 4, 8, 5, 7, 6):
        body.append(f"agi_arg_{n}: {args[n]}\r\n".encode())
    body.append(b"\r\n")
    async with serving({"hangup": handler}) as (server, log):
        agi = await FakeAsterisk.connect(server.port)
        await agi.send(b"".join(body))
        await agi.closed_after()
        agi.close()
    (s,) = seen
    assert s.script == "hangup"
    assert s.env["agi_callerid"] == ""
    assert s.env["agi_calleridname"] == ""
    assert s.env["agi_rdnis"] == " two spaces"
    assert s.env["agi_channel"] == "Local/a@b-0001;1: odd: value"
    assert s.args == [args[n] for n in range(1, 12)]
    assert log.events == []


@aio
async def test_script_from_agi_request_when_network_script_missing():
    seen, handler = recorder()
    async with serving({"route": handler}) as (server, _):
        agi = await FakeAsterisk.connect(server.port)
        block = b"".join(env_lines(skip={"agi_network_script"}, extra=[
            ("agi_request", "agi://10.0.0.1:4573/route?a=b")])) + b"\n"
        await agi.send(block)
        await agi.closed_after()
        agi.close()
    assert [s.script for s in seen] == ["route"]


@aio
async def test_hangup_inside_and_right_after_environment_is_tolerated():
    seen = []

    async def handler(session):
        seen.append(session)
        result = await session.set_variable("CALLCTL_ACTION", "reject")
        seen.append(result)

    async with serving({"route": handler}) as (server, log):
        # HANGUP before the environment is complete
        lines = env_lines()
        agi = await FakeAsterisk.connect(server.port)
        await agi.send(b"".join(lines[:5]) + b"HANGUP\n" + b"".join(lines[5:]) + b"\n")
        assert await agi.command() == b'SET VARIABLE CALLCTL_ACTION "reject"\n'
        await agi.answer(b"511 Command Not Permitted on a dead channel or intercept routine\n")
        await agi.closed_after()
        agi.close()
        # HANGUP right after the blank line, before any command
        agi = await FakeAsterisk.connect(server.port)
        await agi.send(env_block() + b"HANGUP\n")
        assert await agi.command() == b'SET VARIABLE CALLCTL_ACTION "reject"\n'
        await agi.answer(b"200 result=1\n")
        await agi.closed_after()
        agi.close()
    s1, r1, s2, r2 = seen
    assert s1.hungup and r1.code == 511 and s1.env["agi_extension"] == CALLED
    assert s2.hungup and r2.code == 200 and r2.result == "1"
    assert [ev for _, ev, _ in log.events] == ["agi channel gone"]


# -- command results ------------------------------------------------------------------

RESULT_CASES = [
    # (answer bytes, code, result, data, extra, hungup)
    (b"200 result=1\n", 200, "1", None, {}, False),
    (b"200 result=\n", 200, "", None, {}, False),
    (b"200 result=0 (timeout)\n", 200, "0", "timeout", {}, False),
    (b"200 result= (timeout)\n", 200, "", "timeout", {}, False),
    (b"200 result=1 (some data with spaces)\n", 200, "1", "some data with spaces", {}, False),
    (b"200 result=1 (nested (parens) ok)\r\n", 200, "1", "nested (parens) ok", {}, False),
    (b"200 result=0 endpos=8000\n", 200, "0", None, {"endpos": "8000"}, False),
    (b"200 result=-1 (hangup) endpos=0\n", 200, "-1", "hangup", {"endpos": "0"}, True),
    (b"200 result=-1\n", 200, "-1", None, {}, False),
    (b"100 result=0 Trying...\n200 result=1\n", 200, "1", None, {}, False),
    (b"510 Invalid or unknown command\n", 510, "", None, {}, False),
    (b"511 Command Not Permitted on a dead channel or intercept routine\n", 511, "", None, {}, True),
    (b"HANGUP\n200 result=1\n", 200, "1", None, {}, True),
    (b"HANGUP\n100 result=0 Trying...\nHANGUP\n511 Command Not Permitted\n", 511, "", None, {}, True),
]


@pytest.mark.parametrize("answer,code,result,data,extra,hungup", RESULT_CASES)
@aio
async def test_command_results(answer, code, result, data, extra, hungup):
    got = {}

    async def handler(session):
        got["first"] = await session.command("EXEC Noop x")
        got["hungup"] = session.hungup
        got["second"] = await session.command("NOOP again")  # still in step with the peer

    async with serving({"route": handler}) as (server, _):
        agi = await FakeAsterisk.connect(server.port)
        await agi.send(env_block())
        assert await agi.command() == b"EXEC Noop x\n"
        # answer in two TCP writes to make sure lines are reassembled
        await agi.send(answer[:7])
        await asyncio.sleep(0.01)
        await agi.send(answer[7:])
        assert await agi.command() == b"NOOP again\n"
        await agi.answer(b"200 result=0\n")
        await agi.closed_after()
        agi.close()
    first = got["first"]
    assert (first.code, first.result, first.data, first.extra) == (code, result, data, extra)
    assert got["hungup"] is hungup
    assert first.ok is (code == 200)
    assert got["second"].code == 200 and got["second"].result == "0"


@aio
async def test_multiline_520_is_read_to_its_end():
    usage = [
        b"520-Invalid command syntax.  Proper usage follows:\n",
        b" Usage: SET VARIABLE <variablename> <value>\n",
        b"\n",
        b"200 result=1 this looks like a result but is usage text\n",
        b"520 End of proper usage.\n",
    ]
    got = {}

    async def handler(session):
        got["bad"] = await session.command("SET VARIABLE")
        got["next"] = await session.set_variable("CALLCTL_ACTION", "bridge")

    async with serving({"route": handler}) as (server, log):
        agi = await FakeAsterisk.connect(server.port)
        await agi.send(env_block())
        assert await agi.command() == b"SET VARIABLE\n"
        await agi.answer(*usage)
        assert await agi.command() == b'SET VARIABLE CALLCTL_ACTION "bridge"\n'
        await agi.answer(b"200 result=1\n")
        await agi.closed_after()
        agi.close()
    bad = got["bad"]
    assert bad.code == 520
    assert bad.lines == tuple(u.decode().rstrip("\n") for u in usage)
    assert got["next"].code == 200 and got["next"].result == "1"
    assert log.named("agi command refused") == [
        ("warning", {"script": "route", "peer": log.events[0][2]["peer"],
                     "uniqueid": "1700000000.1", "command": "SET VARIABLE", "code": 520})]


def test_parse_result_line_rejects_non_agi():
    with pytest.raises(AgiProtocolError):
        parse_result_line("hello")
    with pytest.raises(AgiProtocolError):
        parse_result_line("2000 result=1")
    assert parse_result_line("520 Invalid command syntax.  Proper usage not available.").code == 520


# -- quoting ----------------------------------------------------------------------------

def asterisk_parse_args(line: str) -> list[str]:
    """Python transcription of res_agi.c parse_args(): how Asterisk splits a command."""
    words: list[list[str]] = []
    quoted = escaped = False
    whitespace = True
    for ch in line:
        if ch == '"' and not escaped:
            quoted = not quoted
            if quoted and whitespace:
                words.append([])
                whitespace = False
            escaped = False
            continue
        if ch in " \t" and not quoted and not escaped:
            whitespace = True
            continue
        if ch == "\\" and not escaped:
            escaped = True
            continue
        if whitespace:
            words.append([])
            whitespace = False
        words[-1].append(ch)
        escaped = False
    return ["".join(w) for w in words]


@pytest.mark.parametrize("value", [
    "plain", "", "two words", 'say "hi"', "back\\slash", "trailing\\", '\\"', '"',
    "  padded  ", "tab\there", "ünïcødé 号码", "${EVIL}", "a;b|c,d",
])
def test_quote_value_round_trips_through_asterisk_parser(value):
    line = f"SET VARIABLE CALLCTL_X {quote_value(value)}"
    assert asterisk_parse_args(line) == ["SET", "VARIABLE", "CALLCTL_X", value]


@aio
async def test_set_variable_bytes_on_the_wire_and_injection_refused():
    got = {}

    async def handler(session):
        got["r1"] = await session.set_variable("CALLCTL_DEST", 'a "b" c\\d')
        got["r2"] = await session.set_variable("CALLCTL_REASON", "")
        for bad in ("x\nSET VARIABLE CALLCTL_ACTION bridge", "x\r", "x\0"):
            with pytest.raises(ValueError):
                await session.set_variable("CALLCTL_DEST", bad)
        for bad_name in ("", "A B", 'A"', "A\nB", "1X"):
            with pytest.raises(ValueError):
                await session.set_variable(bad_name, "v")
        with pytest.raises(ValueError):
            await session.command("NOOP\nHANGUP")
        got["batch"] = [await session.set_variable(name, value) for name, value in
                        (("CALLCTL_DEST", SECRET_DEST), ("__CALLCTL_TENANT", "7"), ("CALLERID(num)", CALLED))]

    async with serving({"route": handler}) as (server, log):
        agi = await FakeAsterisk.connect(server.port)
        await agi.send(env_block())
        sent = []
        for _ in range(5):
            sent.append(await agi.command())
            await agi.answer(b"200 result=1\n")
        await agi.closed_after()
        agi.close()
    assert sent == [
        b'SET VARIABLE CALLCTL_DEST "a \\"b\\" c\\\\d"\n',
        b'SET VARIABLE CALLCTL_REASON ""\n',
        f'SET VARIABLE CALLCTL_DEST "{SECRET_DEST}"\n'.encode(),
        b'SET VARIABLE __CALLCTL_TENANT "7"\n',
        f'SET VARIABLE CALLERID(num) "{CALLED}"\n'.encode(),
    ]
    assert got["r1"].ok and got["r2"].ok
    assert [r.code for r in got["batch"]] == [200, 200, 200]
    assert log.events == []


@aio
async def test_a_dead_channel_answer_marks_the_session_hung_up():
    got = {}

    async def handler(session):
        got["results"] = [await session.set_variable("A", "1"), await session.set_variable("B", "2")]
        got["hungup"] = session.hungup

    async with serving({"route": handler}) as (server, _):
        agi = await FakeAsterisk.connect(server.port)
        await agi.send(env_block())
        assert await agi.command() == b'SET VARIABLE A "1"\n'
        await agi.answer(b"200 result=1\n")
        assert await agi.command() == b'SET VARIABLE B "2"\n'
        await agi.answer(b"511 Command Not Permitted on a dead channel or intercept routine\n")
        await agi.closed_after()
        agi.close()
    assert [r.code for r in got["results"]] == [200, 511]
    assert got["hungup"] is True


@aio
async def test_input_arriving_while_the_handler_works_is_read_in_order():
    """Lines that come while the handler is busy (HANGUP notices, an early answer) wait
    for it, in order; a flood meanwhile ends that session only."""
    got = []
    busy = asyncio.Event()

    async def handler(session):
        await busy.wait()  # e.g. a slow database
        got.append((await session.command("ANSWER"), session.hungup))

    async with serving({"route": handler}, max_env_bytes=4096) as (server, log):
        agi = await FakeAsterisk.connect(server.port)
        await agi.send(env_block() + b"HANGUP\n" * 3 + b"200 result=0 (early)\n")
        await asyncio.sleep(0.05)
        busy.set()
        assert await agi.command() == b"ANSWER\n"
        await agi.closed_after()
        agi.close()
        busy.clear()
        agi = await FakeAsterisk.connect(server.port)
        await agi.send(env_block() + b"HANGUP\n" * 3000)  # 21,000 bytes: five limits
        await asyncio.sleep(0.05)
        busy.set()
        await agi.command()
        await agi.closed_after()
        agi.close()
    ((result, hungup),) = got
    assert result.code == 200 and result.data == "early" and hungup
    assert [kw["error"] for _, kw in log.named("agi bad answer")] == ["answer too large"]


def test_connection_stops_reading_while_too_much_waits_unread():
    """The memory guard: past two limits unread, reading pauses until the reader is
    back under one; a line longer than the limit is refused."""
    class Transport:
        paused = False

        def pause_reading(self):
            self.paused = True

        def resume_reading(self):
            self.paused = False

        def is_closing(self):
            return False

    conn = _Lines(1024, lambda _: None)
    conn.connection_made(transport := Transport())
    conn.data_received(b"x" * 100 + b"\n" + b"y" * 500)
    assert not transport.paused
    conn.data_received(b"y" * 500 + b"\n" + b"HANGUP\n" * 200)
    assert transport.paused  # 2,502 bytes unread

    async def read(count):
        return [await conn.readline() for _ in range(count)]

    lines = asyncio.run(read(2))
    assert lines == [b"x" * 100 + b"\n", b"y" * 1000 + b"\n"]
    assert transport.paused  # 1,400 bytes still unread
    assert asyncio.run(read(54)) == [b"HANGUP\n"] * 54
    assert not transport.paused  # 1,022
    conn.data_received(b"z" * 1100)
    assert len(asyncio.run(read(146))) == 146
    with pytest.raises(ValueError):
        asyncio.run(read(1))


@aio
async def test_set_variables_at_once_is_one_mset_command():
    got = {}

    async def handler(session):
        for bad in ("a,b", 'a"b', "a b", "${X}", "a|b", "a\nb", 7):
            with pytest.raises(ValueError):  # MSet would split, strip or mangle these
                await session.set_variables_at_once({"CALLCTL_DEST": bad})
        for bad_name in ("CALLERID(num)", "A B", "1X", "A=B", ""):
            with pytest.raises(ValueError):
                await session.set_variables_at_once({bad_name: "v"})
        with pytest.raises(ValueError):
            await session.set_variables_at_once({})
        got["result"] = await session.set_variables_at_once(
            {"CALLCTL_DEST": SECRET_DEST, "__CALLCTL_TENANT": "7", "CALLCTL_REASON": "", "CALLCTL_ACTION": "bridge"})

    async with serving({"route": handler}) as (server, log):
        agi = await FakeAsterisk.connect(server.port)
        await agi.send(env_block())
        assert await agi.command() == (
            f'EXEC MSet "CALLCTL_DEST={SECRET_DEST},__CALLCTL_TENANT=7,CALLCTL_REASON=,CALLCTL_ACTION=bridge"\n'
        ).encode()
        await agi.answer(b"200 result=0\n")
        await agi.closed_after()  # nothing else was sent
        agi.close()
    assert got["result"].ok
    assert log.events == []


@aio
async def test_get_variable():
    got = {}

    async def handler(session):
        got["set"] = await session.get_variable("CALLCTL_START")
        got["unset"] = await session.get_variable("NOPE")

    async with serving({"route": handler}) as (server, _):
        agi = await FakeAsterisk.connect(server.port)
        await agi.send(env_block())
        assert await agi.command() == b"GET VARIABLE CALLCTL_START\n"
        await agi.answer(b"200 result=1 (1700000000.123)\n")
        assert await agi.command() == b"GET VARIABLE NOPE\n"
        await agi.answer(b"200 result=0\n")
        await agi.closed_after()
        agi.close()
    assert got == {"set": "1700000000.123", "unset": None}


# -- bad peers ------------------------------------------------------------------------

@aio
async def test_silent_peer_closed_by_env_timeout():
    seen, handler = recorder()
    async with serving({"route": handler}, env_timeout=0.3) as (server, log):
        agi = await FakeAsterisk.connect(server.port)
        took = await agi.closed_after()
        agi.close()
        assert 0.2 < took < 1.5
        # a slow trickle is bounded by the same deadline (it is for the whole block)
        agi = await FakeAsterisk.connect(server.port)
        start = time.monotonic()
        for line in env_lines()[:6]:
            with contextlib.suppress(ConnectionError):
                await agi.send(line)
            await asyncio.sleep(0.08)
        await agi.closed_after()
        agi.close()
        assert time.monotonic() - start < 1.5
        await settle(server)
        await normal_session_works(server, seen)
    assert [level for level, _ in log.named("agi environment timeout")] == ["warning", "warning"]
    assert len(seen) == 1


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n\n",   # a TLS ClientHello-ish blob
    b"\x00\xff\xfe\xfd\n",
    b"agi_network yes\n\n",                                    # no colon
    b"agi network: yes\n\n",                                   # bad key
    b"agi_network: yes\nnot_agi: 1\n\n",                       # foreign key
])
@aio
async def test_garbage_closed_with_clear_log_line(garbage):
    seen, handler = recorder()
    async with serving({"route": handler}) as (server, log):
        agi = await FakeAsterisk.connect(server.port)
        await agi.send(garbage)
        took = await agi.closed_after()
        agi.close()
        assert took < 1.0
        await settle(server)
        await normal_session_works(server, seen)
    ((level, kw),) = log.named("agi malformed environment")
    assert level == "warning" and set(kw) == {"peer", "uniqueid", "line", "length"}
    assert len(seen) == 1


@aio
async def test_huge_environment_refused():
    seen, handler = recorder()
    async with serving({"route": handler}, max_env_bytes=4096) as (server, log):
        # many normal lines
        agi = await FakeAsterisk.connect(server.port)
        flood = b"".join(f"agi_x{i}: {'y' * 50}\n".encode() for i in range(200))
        with contextlib.suppress(ConnectionError):
            await agi.send(env_lines()[0] + flood + b"\n")
        with contextlib.suppress(ConnectionError):
            await agi.closed_after()
        agi.close()
        # one endless line with no newline
        agi = await FakeAsterisk.connect(server.port)
        with contextlib.suppress(ConnectionError):
            await agi.send(b"agi_network: " + b"z" * 20000)
        with contextlib.suppress(ConnectionError):
            await agi.closed_after()
        agi.close()
        await settle(server)
        await normal_session_works(server, seen)
    assert len(log.named("agi environment too large")) == 2
    assert len(seen) == 1


@aio
async def test_disconnect_mid_environment():
    seen, handler = recorder()
    async with serving({"route": handler}) as (server, log):
        for partial in (b"", b"agi_network: yes\nagi_netw", b"".join(env_lines())):
            agi = await FakeAsterisk.connect(server.port)
            await agi.send(partial)
            agi.writer.write_eof()
            await agi.closed_after()
            agi.close()
        # reset instead of FIN
        agi = await FakeAsterisk.connect(server.port)
        await agi.send(env_lines()[0])
        agi.writer.transport.abort()
        await settle(server)
        await normal_session_works(server, seen)
    assert len(seen) == 1
    assert len(log.named("agi peer closed before environment end")) == 4


@aio
async def test_disconnect_mid_command():
    got = []

    async def handler(session):
        try:
            await session.set_variable("CALLCTL_DEST", SECRET_DEST)
        except AgiConnectionClosed as exc:
            got.append(exc)
            raise

    async with serving({"route": handler}) as (server, log):
        agi = await FakeAsterisk.connect(server.port)
        await agi.send(env_block())
        await agi.command()
        await agi.send(b"200 res")  # half an answer, then gone
        agi.close()
        await settle(server)
        # and a peer that vanishes after the env without reading anything
        agi = await FakeAsterisk.connect(server.port)
        await agi.send(env_block())
        await agi.command()
        agi.writer.transport.abort()
        await settle(server)
    assert len(got) == 2
    assert len(log.named("agi peer closed during command")) == 2
    assert SECRET_DEST not in log.text()


@aio
async def test_command_never_answered_times_out():
    got = []

    async def handler(session):
        try:
            await session.set_variable("CALLCTL_ACTION", "bridge")
        except AgiTimeout:
            got.append(time.monotonic())
            raise

    seen, ok_handler = recorder()
    async with serving({"route": handler, "ok": ok_handler}, command_timeout=0.3) as (server, log):
        agi = await FakeAsterisk.connect(server.port)
        await agi.send(env_block())
        await agi.command()
        start = time.monotonic()
        took = await agi.closed_after()
        agi.close()
        assert 0.15 < took < 1.5
        # a 100 Trying that never turns into a result is bounded too
        agi = await FakeAsterisk.connect(server.port)
        await agi.send(env_block())
        await agi.command()
        await agi.answer(b"100 result=0 Trying...\n")
        await agi.closed_after()
        agi.close()
        agi = await FakeAsterisk.connect(server.port)
        await agi.send(env_block(script="ok"))
        await agi.closed_after()
        agi.close()
    assert len(got) == 2 and got[0] - start < 1.5
    assert len(log.named("agi command timeout")) == 2
    assert len(seen) == 1


@aio
async def test_garbage_answer_to_a_command():
    got = []

    async def handler(session):
        try:
            await session.command("ANSWER")
        except AgiProtocolError as exc:
            got.append(exc)
            raise

    async with serving({"route": handler}) as (server, log):
        agi = await FakeAsterisk.connect(server.port)
        await agi.send(env_block())
        await agi.command()
        await agi.answer(b"\x00\x01 what\n")
        await agi.closed_after()
        agi.close()
    assert len(got) == 1
    assert len(log.named("agi bad answer")) == 1


@aio
async def test_unknown_or_missing_script_logged_and_closed():
    seen, handler = recorder()
    async with serving({"route": handler}) as (server, log):
        agi = await FakeAsterisk.connect(server.port)
        await agi.send(env_block(script="nosuch"))
        await agi.closed_after()
        agi.close()
        agi = await FakeAsterisk.connect(server.port)
        await agi.send(env_block(skip={"agi_network_script", "agi_request"}))
        await agi.closed_after()
        agi.close()
        agi = await FakeAsterisk.connect(server.port)
        await agi.send(b"\n")
        await agi.closed_after()
        agi.close()
        await normal_session_works(server, seen)
    assert [kw["script"] for _, kw in log.named("agi unknown script")] == ["nosuch"]
    assert len(log.named("agi request without script")) == 2
    assert len(seen) == 1


@aio
async def test_handler_exception_is_logged_and_isolated():
    release = asyncio.Event()
    results = {}

    async def boom(session):
        raise RuntimeError("handler bug")

    async def slow(session):
        await release.wait()
        results["slow"] = await session.set_variable("CALLCTL_ACTION", "bridge")

    async with serving({"boom": boom, "slow": slow}) as (server, log):
        other = await FakeAsterisk.connect(server.port)
        await other.send(env_block(script="slow", uniqueid="2.2"))
        await asyncio.sleep(0.02)
        for _ in range(3):
            agi = await FakeAsterisk.connect(server.port)
            await agi.send(env_block(script="boom", uniqueid="1.1"))
            await agi.closed_after()
            agi.close()
        release.set()
        assert await other.command() == b'SET VARIABLE CALLCTL_ACTION "bridge"\n'
        await other.answer(b"200 result=1\n")
        await other.closed_after()
        other.close()
    assert results["slow"].ok
    failures = log.named("agi handler failed")
    assert [(level, kw["script"], kw["uniqueid"], kw["error"]) for level, kw in failures] == [
        ("exception", "boom", "1.1", "RuntimeError")] * 3


@aio
async def test_concurrent_sessions_do_not_interfere():
    n = 60
    started = asyncio.Event()
    count = 0

    async def handler(session):
        nonlocal count
        count += 1
        if count == n:
            started.set()
        await started.wait()  # every session is in its handler at the same time
        mine = session.env["agi_uniqueid"]
        r = await session.set_variable("CALLCTL_BINDING", mine)
        assert r.result == mine.split(".")[1]
        await session.set_variable("CALLCTL_ARGS", ",".join(session.args))

    async def call(i, port):
        agi = await FakeAsterisk.connect(port)
        await agi.send(env_block(uniqueid=f"1700000000.{i}", args=[f"n={i}", f"m={i * 2}"]))
        line = await agi.command()
        assert line == f'SET VARIABLE CALLCTL_BINDING "1700000000.{i}"\n'.encode()
        await asyncio.sleep(0.001 * (i % 7))
        await agi.answer(f"200 result={i}\n".encode())
        assert await agi.command() == f'SET VARIABLE CALLCTL_ARGS "n={i},m={i * 2}"\n'.encode()
        await agi.answer(b"200 result=1\n")
        await agi.closed_after()
        agi.close()

    async with serving({"route": handler}) as (server, log):
        # plus a stuck session that never answers: it must not hold anyone up
        stuck = await FakeAsterisk.connect(server.port)
        await stuck.send(env_block(script="route", uniqueid="9.9"))
        await asyncio.gather(*(call(i, server.port) for i in range(n - 1)))
        line = await stuck.command()
        assert line == b'SET VARIABLE CALLCTL_BINDING "9.9"\n'
        await stuck.answer(b"200 result=9\n")
        await stuck.command()
        await stuck.answer(b"200 result=1\n")
        await stuck.closed_after()
        stuck.close()
    assert log.events == []


# -- shutdown -------------------------------------------------------------------------

@aio
async def test_close_lets_running_sessions_finish_and_stops_accepting():
    done = []

    async def handler(session):
        await asyncio.sleep(0.1)
        done.append(await session.set_variable("CALLCTL_ACTION", "reject"))

    log = CaptureLog()
    server = FastAgiServer({"route": handler}, "127.0.0.1", 0, log=log)
    await server.start()
    agi = await FakeAsterisk.connect(server.port)
    await agi.send(env_block())
    await asyncio.sleep(0.02)

    async def peer():
        assert await agi.command() == b'SET VARIABLE CALLCTL_ACTION "reject"\n'
        await agi.answer(b"200 result=1\n")
        await agi.closed_after()

    peer_task = asyncio.create_task(peer())
    await server.close()
    assert [r.code for r in done] == [200]
    await peer_task
    agi.close()
    with pytest.raises(OSError):
        await FakeAsterisk.connect(server.port)
    assert server.active_sessions == 0 and log.events == []


@aio
async def test_close_is_bounded_when_a_session_hangs():
    async def handler(session):
        await asyncio.Event().wait()  # a handler that never returns

    log = CaptureLog()
    server = FastAgiServer({"route": handler}, "127.0.0.1", 0, log=log, shutdown_timeout=0.2)
    await server.start()
    agi = await FakeAsterisk.connect(server.port)
    await agi.send(env_block())
    await asyncio.sleep(0.02)
    start = time.monotonic()
    await server.close()
    assert time.monotonic() - start < 1.0
    await agi.closed_after()
    agi.close()
    assert server.active_sessions == 0
    assert log.named("agi sessions cancelled at shutdown") == [("warning", {"count": 1})]
    assert [kw["script"] for _, kw in log.named("agi session cancelled")] == ["route"]


# -- privacy --------------------------------------------------------------------------

@aio
async def test_logs_never_carry_numbers_or_variable_values():
    async def boom(session):
        await session.set_variable("CALLCTL_DEST", SECRET_DEST)
        raise RuntimeError("boom")

    async def stuck(session):
        await session.set_variable("CALLCTL_DEST", SECRET_DEST)

    routes = {"boom": boom, "stuck": stuck}
    async with serving(routes, command_timeout=0.2, env_timeout=0.3) as (server, log):
        # handler failure after a refused command
        agi = await FakeAsterisk.connect(server.port)
        await agi.send(env_block(script="boom", args=[f"caller={CALLER}"]))
        await agi.command()
        await agi.answer(b"510 Invalid or unknown command\n")
        await agi.closed_after()
        agi.close()
        # command timeout
        agi = await FakeAsterisk.connect(server.port)
        await agi.send(env_block(script="stuck"))
        await agi.command()
        await agi.closed_after()
        agi.close()
        # unknown script, env timeout, malformed line holding a number
        for data in (env_block(script="x" + CALLER), b"".join(env_lines()), b"agi_callerid " + CALLER.encode() + b"\n"):
            agi = await FakeAsterisk.connect(server.port)
            await agi.send(data)
            await agi.closed_after()
            agi.close()
    text = log.text()
    assert len(log.events) == 6
    assert log.named("agi unknown script")[0][1]["script"] == "<redacted>"
    for secret in (CALLER, CALLED, DNID, SECRET_DEST):
        assert secret not in text


@aio
async def test_default_structlog_logger_is_used():
    from structlog.testing import capture_logs

    seen, handler = recorder()
    with capture_logs() as logs:
        server = FastAgiServer({"route": handler}, "127.0.0.1", 0)
        await server.start()
        agi = await FakeAsterisk.connect(server.port)
        await agi.send(b"agi_callerid " + CALLER.encode() + b"\n")
        await agi.closed_after()
        agi.close()
        await settle(server)
        await server.close()
    (event,) = logs
    assert event["event"] == "agi malformed environment" and event["log_level"] == "warning"
    assert CALLER not in repr(logs)


@aio
async def test_session_unusable_after_timeout_and_one_command_at_a_time():
    got = {}

    async def handler(session):
        first = asyncio.create_task(session.command("ANSWER"))
        await asyncio.sleep(0.01)
        with pytest.raises(RuntimeError):
            await session.command("NOOP")
        with pytest.raises(AgiTimeout):
            await first
        with pytest.raises(AgiConnectionClosed):
            await session.command("NOOP")
        got["ok"] = True

    async with serving({"route": handler}, command_timeout=0.2) as (server, log):
        agi = await FakeAsterisk.connect(server.port)
        await agi.send(env_block())
        assert await agi.command() == b"ANSWER\n"
        rest = await asyncio.wait_for(agi.reader.read(), IO)  # nothing else was sent
        agi.close()
    assert rest == b"" and got == {"ok": True}
