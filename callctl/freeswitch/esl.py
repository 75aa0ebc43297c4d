"""Event Socket (ESL) outbound sessions on gevent: the wire protocol between
FreeSWITCH's `socket` application and callctl (docs/esl.md).

In the shape of greenswitch's OutboundSession and OutboundESLServer (connect, myevents,
linger, sendmsg execute, events by name), written out here because greenswitch 0.0.19
cannot be used as is (README, "FreeSWITCH backend"): it URL-decodes an event's whole
text before splitting it into headers (a %0A in a caller name makes a header of its
own), waits for every reply without a bound, loops forever when the peer closes in the
middle of a body, dies on a missing or bad Content-Length, logs the caller's number at
INFO, and polls its listening socket every 100 ms.

Protocol, as mod_event_socket speaks it:

* A message is a block of ``Name: value`` lines ended by an empty line; with
  ``Content-Length``, that many *bytes* of body follow.
* ``command/reply`` (``Reply-Text: +OK ...`` or ``-ERR ...``) answers each command
  but ``api``, which gets ``api/response`` with a body. Replies come in order.
* ``text/event-plain``: an event; its body is itself a header block (values
  URL-encoded), possibly followed by a body of its own (its own Content-Length).
* ``text/disconnect-notice``: the channel is gone. ``Content-Disposition: linger``:
  events still come until we close; otherwise the socket closes next.
* In outbound mode, ``connect`` is answered by a command/reply whose headers are the
  channel's data (URL-encoded), and the session may then subscribe (``myevents``).

Every wait is bounded (gevent.Timeout); anything that is not ESL ends the session with
EslProtocolError. Privacy: nothing here logs header values (they hold numbers).
"""
from __future__ import annotations

import uuid
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

import gevent

__all__ = ["EslError", "EslProtocolError", "EslClosed", "EslTimeout", "Message", "EslSession", "parse_headers"]

_NAME_OK = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
_REPLIES = ("command/reply", "api/response")


class EslError(Exception):
    """Base of everything this module raises about the ESL conversation."""


class EslProtocolError(EslError):
    """The peer sent something that is not ESL."""


class EslClosed(EslError):
    """The peer closed the connection (or said it would: disconnect-notice)."""


class EslTimeout(EslError):
    """The peer did not answer within the session's bound."""


# The events a call's session waits for: an application's end, the hangup and its
# completion (the CDR's variables).
EVENTS = ("CHANNEL_EXECUTE_COMPLETE", "CHANNEL_HANGUP", "CHANNEL_HANGUP_COMPLETE")


def parse_headers(block: bytes) -> dict[str, str]:
    """``Name: value`` lines (values URL-decoded one by one, after the split)."""
    headers: dict[str, str] = {}
    for line in block.split(b"\n"):
        line = line.removesuffix(b"\r")
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name or not set(name) <= _NAME_OK:
            raise EslProtocolError("malformed header line")
        value = value.removeprefix(b" ")
        # Most values carry no escape: decoding only those that do halves the parse.
        headers[name.decode("ascii")] = (unquote_to_bytes(value) if b"%" in value else value).decode("utf-8", "replace")
    return headers


@dataclass(slots=True)
class Message:
    headers: dict[str, str]
    body: bytes = b""
    event: dict[str, str] = field(default_factory=dict)  # text/event-plain: the event's headers
    event_body: bytes = b""

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")

    @property
    def reply_text(self) -> str:
        return self.headers.get("Reply-Text", "")

    @property
    def ok(self) -> bool:
        """A command/reply that says +OK (api/response: a body that does not start with -ERR)."""
        if self.content_type == "api/response":
            return not self.body.startswith(b"-ERR")
        return self.reply_text.startswith("+OK")

    @property
    def name(self) -> str:
        return self.event.get("Event-Name", "")


class EslSession:
    """One ESL connection, read and written by one greenlet.

    Replies are read in step with the command that asked (``command``); events that
    arrive meanwhile are queued for ``wait_event``. ``timeout`` bounds each command and
    each wait unless the call gives its own; after a timeout or a protocol error the
    session is out of step with the peer and refuses further use.
    """

    def __init__(self, sock, *, timeout: float = 5.0, max_bytes: int = 256 * 1024):
        self.sock = sock
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.events: deque[Message] = deque()
        self.lingering = False  # disconnect-notice with linger: the channel is gone
        self.closed = False  # the peer closed, or will (disconnect-notice without linger)
        self.broken = False
        self._buf = bytearray()

    # -- reading -------------------------------------------------------------------------

    def _fill(self) -> None:
        try:
            data = self.sock.recv(65536)
        except OSError as exc:
            self.closed = True
            raise EslClosed("connection reset") from exc
        if not data:
            self.closed = True
            raise EslClosed("peer closed the connection")
        self._buf += data

    def _read_exactly(self, size: int) -> bytes:
        while len(self._buf) < size:
            self._fill()
        data = bytes(self._buf[:size])
        del self._buf[:size]
        return data

    def read_message(self) -> Message:
        """The next message (unbounded in time: callers hold a gevent.Timeout)."""
        while (end := self._buf.find(b"\n\n")) < 0:
            if len(self._buf) > self.max_bytes:
                raise EslProtocolError("header block too large")
            self._fill()
        if end > self.max_bytes:
            raise EslProtocolError("header block too large")
        headers = parse_headers(bytes(self._buf[:end]))
        del self._buf[:end + 2]
        if "Content-Type" not in headers:
            raise EslProtocolError("message without Content-Type")
        message = Message(headers)
        length = headers.get("Content-Length")
        if length is not None:
            if not (length.isascii() and length.isdigit()) or int(length) > self.max_bytes:
                raise EslProtocolError("bad Content-Length")
            message.body = self._read_exactly(int(length))
        if message.content_type == "text/event-plain":
            head, _, rest = message.body.partition(b"\n\n")
            message.event = parse_headers(head)
            inner = message.event.get("Content-Length")
            if inner is not None:
                if not (inner.isascii() and inner.isdigit()) or int(inner) > len(rest):
                    raise EslProtocolError("bad event Content-Length")
                message.event_body = rest[:int(inner)]
        return message

    def _take(self, message: Message) -> None:
        """Keep an event or a notice that is not the reply being waited for."""
        kind = message.content_type
        if kind == "text/disconnect-notice":
            if message.headers.get("Content-Disposition") == "linger":
                self.lingering = True
            else:
                self.closed = True
            self.events.append(message)
        elif kind in _REPLIES:
            raise EslProtocolError(f"{kind} without a command")
        elif kind.startswith("text/event"):
            self.events.append(message)
        # log/data, auth/request and the like are not for an outbound session: dropped

    # -- writing -------------------------------------------------------------------------

    def _guard(self) -> None:
        if self.broken:
            raise EslClosed("session is out of step with the peer")

    def _bounded(self, timeout: float | None, what: str):
        return gevent.Timeout(self.timeout if timeout is None else timeout, EslTimeout(f"no {what} in time"))

    def subscribe(self) -> None:
        """This channel's events (myevents), only those a session waits for (EVENTS): in
        `async full` FreeSWITCH otherwise sends every event of the channel, each with all
        its variables, and parsing them was most of a call's CPU here."""
        self.command("myevents")
        for name in EVENTS:
            reply = self.command(f"filter Event-Name {name}")
            if not reply.ok:
                raise EslProtocolError("filter refused")

    def command(self, text: str, timeout: float | None = None) -> Message:
        """Send one command (lines without an empty one) and return its reply."""
        self._guard()
        if "\n\n" in text or "\r" in text or "\0" in text or text.endswith("\n"):
            raise ValueError("ESL command holds an empty line, CR or NUL")
        if self.closed:
            raise EslClosed("peer closed the connection")
        try:
            with self._bounded(timeout, "reply"):
                self.sock.sendall(text.encode() + b"\n\n")
                while True:
                    message = self.read_message()
                    if message.content_type in _REPLIES:
                        return message
                    self._take(message)
        except OSError as exc:
            self.broken = self.closed = True
            raise EslClosed("connection reset") from exc
        except (EslTimeout, EslProtocolError, EslClosed):
            self.broken = True
            raise

    def wait_event(self, match, timeout: float | None = None) -> Message:
        """The first queued or coming event for which match(message) is true. Raises
        EslClosed once the socket is gone without one (a lingering session still gets
        the events FreeSWITCH sends until it closes)."""
        self._guard()
        for queued in list(self.events):
            if match(queued):
                self.events.remove(queued)
                return queued
        try:
            with self._bounded(timeout, "event"):
                while True:
                    message = self.read_message()
                    if match(message):
                        return message
                    self._take(message)
        except (EslTimeout, EslProtocolError, EslClosed):
            self.broken = True
            raise

    # -- outbound-session commands ---------------------------------------------------------

    def connect(self) -> dict[str, str]:
        """The channel's data (headers of the reply to ``connect``)."""
        reply = self.command("connect")
        if not reply.ok or "Unique-ID" not in reply.headers:
            raise EslProtocolError("connect answered without channel data")
        return reply.headers

    def execute(self, app: str, arg: str = "", *, wait: bool = True, timeout: float | None = None) -> Message | None:
        """Run a dialplan application on the channel (sendmsg execute). With wait, the
        CHANNEL_EXECUTE_COMPLETE event of this very execution (Event-UUID) is returned;
        None if the channel hung up (or the socket closed) first."""
        if "\n" in arg or "\r" in arg or "\n" in app:
            raise ValueError("application or argument holds a line break")
        app_id = str(uuid.uuid4())
        lines = ["sendmsg", "call-command: execute", f"execute-app-name: {app}", f"Event-UUID: {app_id}"]
        if arg:
            lines.append(f"execute-app-arg: {arg}")
        reply = self.command("\n".join(lines))
        if not reply.ok:
            return None  # -ERR: no such channel any more
        if not wait:
            return reply
        try:
            done = self.wait_event(
                lambda m: m.name == "CHANNEL_HANGUP"
                or m.name == "CHANNEL_EXECUTE_COMPLETE" and m.event.get("Application-UUID") == app_id, timeout)
        except EslClosed:
            return None
        if done.name == "CHANNEL_HANGUP":
            self.events.appendleft(done)  # for whoever waits for the hangup next
            return None
        return done

    def api(self, command: str, timeout: float | None = None) -> Message:
        return self.command(f"api {command}", timeout)

    def hangup_complete(self, timeout: float | None = None) -> Message | None:
        """The channel's CHANNEL_HANGUP_COMPLETE (the session must linger); None if the
        socket closed without it."""
        try:
            return self.wait_event(lambda m: m.name == "CHANNEL_HANGUP_COMPLETE", timeout)
        except EslClosed:
            return None
