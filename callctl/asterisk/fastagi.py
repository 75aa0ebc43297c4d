"""FastAGI server: the wire protocol between Asterisk's res_agi and callctl.

Routes are keyed by ``agi_network_script``, one handler coroutine per connection;
connections are a small ``asyncio.Protocol`` that splits input into lines in one pass.
Why this is not panoramisk's ``fast_agi``, and the protocol as res_agi speaks it:
docs/agi.md, "The FastAGI server".

Privacy: events carry script, peer and uniqueid only. Environment values that can hold
phone numbers (caller id, extension, dnid, rdnis, arguments) and command arguments
(SET VARIABLE values) are never logged.
"""
from __future__ import annotations

import asyncio
import inspect
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping
from urllib.parse import urlsplit

import structlog

from callctl.netacl import AllowList
from callctl.metrics import SESSIONS, Protocol

__all__ = [
    "AgiError",
    "AgiProtocolError",
    "AgiConnectionClosed",
    "AgiTimeout",
    "AgiResult",
    "AgiSession",
    "FastAgiServer",
    "parse_result_line",
    "quote_value",
]

Handler = Callable[["AgiSession"], Awaitable[None]]

_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-(),]*\Z")
_FORBIDDEN_IN_LINE = ("\n", "\r", "\0")
# MSet splits on ',' and '|', strips quotes and substitutes nothing: plain tokens only.
_MSET_NAME = re.compile(r"_{0,2}[A-Za-z][A-Za-z0-9_]*\Z")
_MSET_VALUE = re.compile(r"[A-Za-z0-9+_.:@-]*\Z")
_MAX_LOGGED = 64  # longest script / uniqueid written to a log event
_LOGGABLE_SCRIPT = re.compile(r"[A-Za-z0-9_./\-]{1,64}\Z")
_DIGIT_RUN = re.compile(r"\d{5}")
_SESSIONS = SESSIONS.labels(Protocol.AGI)


def _loggable_script(script: str) -> str:
    """An unknown script name as it may appear in a log: never anything number-like."""
    if _LOGGABLE_SCRIPT.match(script) and not _DIGIT_RUN.search(script):
        return script
    return "<redacted>"


class AgiError(Exception):
    """Base of everything this module raises about the AGI conversation."""


class AgiProtocolError(AgiError):
    """The peer sent something that is not AGI."""


class AgiConnectionClosed(AgiError):
    """The peer closed (or reset) the connection."""


class AgiTimeout(AgiError):
    """The peer did not answer within the configured time."""


@dataclass(slots=True, frozen=True)
class AgiResult:
    """One command's final answer.

    ``code`` is the status (200, 510, 511, 520, ...); ``result`` the value after
    ``result=`` ('' when absent or empty); ``data`` the parenthesised part or None;
    ``extra`` trailing ``key=value`` pairs (``endpos=...``); ``lines`` the raw lines of the
    final answer (all of them for a multi-line 520 block).
    """

    code: int
    result: str = ""
    data: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    lines: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """The command was accepted and ran (status 200). Check ``result`` for its outcome."""
        return self.code == 200


def parse_result_line(line: str, lines: tuple[str, ...] | None = None) -> AgiResult:
    """Parse a final answer line such as ``200 result=1 (data) endpos=5``.

    Raises AgiProtocolError when the line does not start with a three-digit status.
    """
    if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3] not in " -"):
        raise AgiProtocolError("answer without a status code")
    code = int(line[:3])
    rest = line[4:]
    result = ""
    data = None
    extra: dict[str, str] = {}
    if rest.startswith("result="):
        result, _, tail = rest[7:].partition(" ")
        tail = tail.lstrip(" ")
        if tail.startswith("("):
            close = tail.rfind(")")
            if close > 0:
                data = tail[1:close]
                tail = tail[close + 1:]
        for token in tail.split():
            key, sep, val = token.partition("=")
            if sep:
                extra[key] = val
    return AgiResult(code, result, data, extra, lines if lines is not None else (line,))


def quote_value(value: str) -> str:
    """Quote one AGI command argument the way res_agi's parse_args() reads it back."""
    if not isinstance(value, str):
        raise TypeError("AGI values are strings")
    for bad in _FORBIDDEN_IN_LINE:
        if bad in value:
            raise ValueError("AGI value contains a line break or NUL")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _strip_eol(raw: bytes) -> bytes:
    if raw.endswith(b"\r\n"):
        return raw[:-2]
    return raw[:-1]  # caller checked raw ends with b"\n"


def _verb(line: str) -> str:
    """The command's words without its arguments, safe to log (e.g. 'SET VARIABLE')."""
    words = []
    for word in line.split(None, 3)[:3]:
        if not word.isalpha():
            break
        words.append(word)
    return " ".join(words) or "?"


def _peer(peername) -> str:
    return f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername)


class _Lines(asyncio.Protocol):
    """One connection's bytes as lines, for the session coroutine that reads them.

    ``readline()`` has StreamReader.readline's contract: a line with its newline, or at
    end of input the unterminated rest (b"" when none); ValueError for a line longer than
    ``limit``. Reading pauses while more than two limits' worth waits unread.
    """

    def __init__(self, limit: int, on_connect: Callable[["_Lines"], None]):
        self.limit = limit
        self._on_connect = on_connect
        self.transport: asyncio.Transport | None = None
        self.received_any = False
        self._lines: deque[bytes] = deque()
        self._partial = b""
        self._buffered = 0
        self._paused = False
        self._eof = False
        self._waiter: asyncio.Future | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._on_connect(self)

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        self._buffered += len(data)
        if self._partial:
            data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        self._lines.extend(line + b"\n" for line in complete)
        if self._buffered > 2 * self.limit and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        # Keep the transport: the session task closes it (cleanly or by abort) when it
        # ends. Commands are refused from now on (write): no answer could come back.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._wake()

    @property
    def closed(self) -> bool:
        return self._eof or self.transport.is_closing()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def readline(self) -> bytes:
        while not self._lines:
            if len(self._partial) > self.limit:
                raise ValueError("line longer than the limit")
            if self._eof:
                rest, self._partial = self._partial, b""
                return rest
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        line = self._lines.popleft()
        self._buffered -= len(line)
        if self._paused and self._buffered <= self.limit:
            self._paused = False
            self.transport.resume_reading()
        if len(line) > self.limit + 1:
            raise ValueError("line longer than the limit")
        return line

    def write(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionResetError("peer closed the connection")
        self.transport.write(data)


class AgiSession:
    """One FastAGI connection, handed to the route handler after the environment is read."""

    __slots__ = (
        "env", "args", "script", "hungup", "peer",
        "_conn", "_timeout", "_max_bytes", "_log", "_busy", "_broken",
    )

    def __init__(self, conn: _Lines, *, peer: str, command_timeout: float, max_bytes: int, log: Any):
        self.env: dict[str, str] = {}
        self.args: list[str] = []
        self.script: str = ""
        self.hungup = False
        self.peer = peer
        self._conn = conn
        self._timeout = command_timeout
        self._max_bytes = max_bytes
        self._log = log
        self._busy = False
        self._broken = False

    @property
    def uniqueid(self) -> str:
        return self.env.get("agi_uniqueid", "")[:_MAX_LOGGED]

    # -- commands ---------------------------------------------------------------------

    async def command(self, line: str) -> AgiResult:
        """Send one AGI command and return its final answer.

        Raises ValueError for a line holding a line break (it would inject commands),
        AgiTimeout when no answer comes within ``command_timeout``, AgiConnectionClosed
        when the peer goes away, AgiProtocolError on a non-AGI answer. After any of
        those the session is unusable (the server closes it when the handler returns).
        """
        for bad in _FORBIDDEN_IN_LINE:
            if bad in line:
                raise ValueError("AGI command contains a line break or NUL")
        if self._broken:
            raise AgiConnectionClosed("AGI session is closed")
        if self._busy:
            raise RuntimeError("another AGI command is in progress on this session")
        self._busy = True
        answered = False
        try:
            async with asyncio.timeout(self._timeout):
                self._conn.write(line.encode() + b"\n")  # a line: far below any high-water mark
                result = await self._read_answer()
            answered = True
        except TimeoutError:
            raise AgiTimeout(f"no answer to {_verb(line)} within {self._timeout}s") from None
        except ConnectionError as exc:
            raise AgiConnectionClosed("peer closed the connection") from exc
        except ValueError as exc:  # line limit overrun
            raise AgiProtocolError("answer line too long") from exc
        finally:
            self._busy = False
            if not answered:  # out of step with the peer (error, timeout or cancelled)
                self._broken = True
        if result.code >= 500:
            if result.code == 511:
                self.hungup = True
                self._log.info("agi channel gone", script=self.script, peer=self.peer,
                               uniqueid=self.uniqueid, command=_verb(line))
            else:
                self._log.warning("agi command refused", script=self.script, peer=self.peer,
                                  uniqueid=self.uniqueid, command=_verb(line), code=result.code)
        elif result.data == "hangup":
            self.hungup = True
        return result

    async def _read_answer(self) -> AgiResult:
        reader = self._conn
        budget = self._max_bytes
        block: list[str] | None = None  # lines of a multi-line answer ("520-...")
        block_end = ""
        while True:
            raw = await reader.readline()
            if not raw.endswith(b"\n"):
                raise AgiConnectionClosed("peer closed the connection before answering")
            budget -= len(raw)
            if budget < 0:
                raise AgiProtocolError("answer too large")
            line = _strip_eol(raw).decode("utf-8", "replace")
            if block is not None:
                block.append(line)
                if line.startswith(block_end):
                    return parse_result_line(line, tuple(block))
                continue
            if line == "HANGUP":
                self.hungup = True
                continue
            if len(line) >= 4 and line[:3].isdigit() and line[3] == "-":
                block = [line]
                block_end = line[:3] + " "
                continue
            if line.startswith("100 ") or line == "100":
                continue  # "100 result=0 Trying...": the real answer follows
            return parse_result_line(line)

    async def set_variable(self, name: str, value: str) -> AgiResult:
        """SET VARIABLE name "value" (value quoted; line breaks refused with ValueError)."""
        if not isinstance(name, str) or not _VAR_NAME.match(name):
            raise ValueError("invalid channel variable name")
        return await self.command(f"SET VARIABLE {name} {quote_value(value)}")

    async def set_variables_at_once(self, values: Mapping[str, str]) -> AgiResult:
        """Set several variables in ONE command: ``EXEC MSet "A=1,B=2"``.

        Each AGI command is a round trip that costs Asterisk a channel-thread wake-up,
        and the channel sits in AGI meanwhile; one command instead of eight is most of
        the per-call cost a decision adds. MSet splits on commas and strips quotes, so
        values are restricted to plain tokens (numbers, ids, words): ValueError otherwise.
        """
        pairs = []
        for name, value in values.items():
            if not isinstance(name, str) or not _MSET_NAME.match(name):
                raise ValueError("invalid channel variable name for MSet")
            if not isinstance(value, str) or not _MSET_VALUE.match(value):
                raise ValueError("value not allowed in MSet (plain tokens only)")
            pairs.append(f"{name}={value}")
        if not pairs:
            raise ValueError("no variables to set")
        return await self.command(f"EXEC MSet {quote_value(','.join(pairs))}")

    async def get_variable(self, name: str) -> str | None:
        """GET VARIABLE name: the value, or None when unset."""
        if not isinstance(name, str) or not _VAR_NAME.match(name):
            raise ValueError("invalid channel variable name")
        result = await self.command(f"GET VARIABLE {name}")
        if result.code == 200 and result.result == "1":
            return result.data or ""
        return None


class _EnvError(Exception):
    def __init__(self, event: str, level: str = "warning", **kw: Any):
        super().__init__(event)
        self.event = event
        self.level = level
        self.kw = kw


class FastAgiServer:
    """Asyncio FastAGI listener dispatching on ``agi_network_script``.

    ``routes`` maps a script name ("route", "hangup") to ``async def handler(session)``.
    The connection is closed when the handler returns (or raises).
    """

    def __init__(self, routes: Mapping[str, Handler], host: str = "127.0.0.1", port: int = 4573, *,
                 env_timeout: float = 5.0, command_timeout: float = 5.0,
                 max_env_bytes: int = 64 * 1024, shutdown_timeout: float = 10.0,
                 backlog: int = 1024, log: Any = None, allow: AllowList | None = None):
        self.routes: dict[str, Handler] = {}
        for name, handler in routes.items():
            if not callable(handler):
                raise TypeError(f"route {name!r} is not callable")
            self.routes[name.strip("/")] = handler
        self.host = host
        self.port = port
        self.env_timeout = env_timeout
        self.command_timeout = command_timeout
        self.max_env_bytes = max_env_bytes
        self.shutdown_timeout = shutdown_timeout
        self.backlog = backlog
        self.allow = allow  # peers that may connect (callctl.netacl); None: anyone
        self.log = log if log is not None else structlog.get_logger("callctl.agi")
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def active_sessions(self) -> int:
        """Connections being served right now (reading the environment or in a handler)."""
        return len(self._tasks)

    async def start(self) -> None:
        self._server = await asyncio.get_running_loop().create_server(
            self._connection, self.host, self.port, backlog=self.backlog)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop accepting; wait up to shutdown_timeout for running sessions, then cancel them."""
        if self._server is None:
            return
        self._server.close()
        await asyncio.sleep(0)  # let connections accepted just now start their task
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.shutdown_timeout)
            for task in pending:
                task.cancel()
            if pending:
                self.log.warning("agi sessions cancelled at shutdown", count=len(pending))
                await asyncio.gather(*pending, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> "FastAgiServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # -- one connection ---------------------------------------------------------------

    def _connection(self) -> _Lines:
        return _Lines(max(self.max_env_bytes, 1024), self._start_session)

    def _start_session(self, conn: _Lines) -> None:
        """A connection is made: one task serves it (close() waits for these). A peer
        outside the allow-list is dropped first, before a byte is read or written."""
        peername = conn.transport.get_extra_info("peername")
        if self.allow is not None and not self.allow.allows_peername(peername):
            conn.transport.abort()
            self.log.warning("agi peer refused", peer=_peer(peername))
            return
        _SESSIONS.inc()
        task = asyncio.get_running_loop().create_task(self._serve(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: _Lines) -> None:
        task = asyncio.current_task()
        peer = _peer(conn.transport.get_extra_info("peername"))
        session = AgiSession(conn, peer=peer, command_timeout=self.command_timeout,
                             max_bytes=self.max_env_bytes, log=self.log)
        clean = False
        try:
            clean = await self._run(session)
        except asyncio.CancelledError:
            # Only close() cancels these tasks: end normally, the log line says it.
            if task is not None:
                task.uncancel()
            self.log.info("agi session cancelled", script=session.script or None, peer=peer,
                          uniqueid=session.uniqueid)
        except Exception:  # never let anything reach the loop's exception handler
            self.log.exception("agi session failed", script=session.script or None, peer=peer,
                               uniqueid=session.uniqueid)
        finally:
            if clean:
                conn.transport.close()
            else:
                conn.transport.abort()

    async def _run(self, session: AgiSession) -> bool:
        """Read the environment, dispatch, run the handler. True when it ended cleanly."""
        log = self.log
        try:
            async with asyncio.timeout(self.env_timeout):
                await self._read_env(session)
        except TimeoutError:
            log.warning("agi environment timeout", peer=session.peer, uniqueid=session.uniqueid,
                        seconds=self.env_timeout, lines=len(session.env))
            return False
        except _EnvError as err:
            getattr(log, err.level)(err.event, peer=session.peer, uniqueid=session.uniqueid, **err.kw)
            return False

        env = session.env
        script = env.get("agi_network_script")
        if script is None and "agi_request" in env:
            script = urlsplit(env["agi_request"]).path
        if not script:
            log.warning("agi request without script", peer=session.peer, uniqueid=session.uniqueid)
            return False
        script = script.partition("?")[0].strip("/")
        session.script = script
        handler = self.routes.get(script)
        if handler is None:
            log.warning("agi unknown script", script=_loggable_script(script), peer=session.peer,
                        uniqueid=session.uniqueid)
            return False

        try:
            outcome = handler(session)
            if inspect.isawaitable(outcome):
                await outcome
        except asyncio.CancelledError:
            raise
        except AgiTimeout:
            log.warning("agi command timeout", script=script, peer=session.peer,
                        uniqueid=session.uniqueid, seconds=self.command_timeout)
            return False
        except AgiConnectionClosed:
            log.info("agi peer closed during command", script=script, peer=session.peer,
                     uniqueid=session.uniqueid, hungup=session.hungup)
            return False
        except AgiProtocolError as exc:
            log.warning("agi bad answer", script=script, peer=session.peer,
                        uniqueid=session.uniqueid, error=str(exc))
            return False
        except Exception as exc:
            log.exception("agi handler failed", script=script, peer=session.peer,
                          uniqueid=session.uniqueid, error=type(exc).__name__)
            return False
        return True

    async def _read_env(self, session: AgiSession) -> None:
        reader = session._conn
        env = session.env
        budget = self.max_env_bytes
        numbered: dict[int, str] = {}
        line_no = 0
        while True:
            try:
                raw = await reader.readline()
            except ValueError:  # one line longer than the stream limit
                raise _EnvError("agi environment too large", limit=self.max_env_bytes) from None
            line_no += 1
            if not raw.endswith(b"\n"):
                # Connect-and-close without a byte is a health check (load balancer,
                # monitoring): not worth a line at info level.
                raise _EnvError("agi peer closed before environment end",
                                level="info" if reader.received_any else "debug", lines=len(env))
            budget -= len(raw)
            if budget < 0:
                raise _EnvError("agi environment too large", limit=self.max_env_bytes)
            raw = _strip_eol(raw)
            if not raw:
                break
            if raw == b"HANGUP":
                session.hungup = True
                continue
            key_b, sep, value_b = raw.partition(b":")
            if (not sep or not key_b.startswith(b"agi_") or not key_b.isascii()
                    or not key_b.replace(b"_", b"").isalnum()):
                raise _EnvError("agi malformed environment", line=line_no, length=len(raw))
            key = key_b.decode("ascii")
            if value_b.startswith(b" "):
                value_b = value_b[1:]
            value = value_b.decode("utf-8", "replace")
            env[key] = value
            if key.startswith("agi_arg_"):
                number = key[8:]
                if number.isdigit():
                    numbered[int(number)] = value
        if numbered:
            session.args = [numbered[n] for n in sorted(numbered)]
