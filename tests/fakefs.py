"""A fake FreeSWITCH for the ESL protocol tests: it connects to `callctl serve freeswitch`
as the socket application does (outbound, async full) and speaks mod_event_socket's side
of the protocol over a real TCP socket: channel data on `connect`, +OK replies, events
(URL-encoded, Content-Length in bytes), a lingering disconnect-notice and
CHANNEL_HANGUP_COMPLETE when the call ends, api/response for `api`.

`write` can be replaced to split everything into odd pieces (one byte at a time).
"""
from __future__ import annotations

import socket
import time
import uuid as uuidlib
from urllib.parse import quote


def encode(headers: dict[str, str]) -> bytes:
    return "".join(f"{k}: {quote(str(v), safe='')}\n" for k, v in headers.items()).encode()


class FakeCall:
    """One call's socket. `variables` are the channel's (callctl_called, callctl_caller...)."""

    def __init__(self, port: int, variables: dict[str, str], *, chunk: int | None = None, timeout: float = 20):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.uuid = str(uuidlib.uuid4())
        self.vars = {"uuid": self.uuid, "start_uepoch": str(int(time.time() * 1e6)), **variables}
        self.chunk = chunk
        self.commands: list[str] = []
        self.apps: list[tuple[str, str]] = []
        self.acked = False
        self.hung_up = False
        self._buf = b""

    # -- wire --------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.chunk:
            self.sock.sendall(data)
            return
        for i in range(0, len(data), self.chunk):
            self.sock.sendall(data[i:i + self.chunk])
            time.sleep(0.001)

    def read_command(self) -> str | None:
        while b"\n\n" not in self._buf:
            data = self.sock.recv(65536)
            if not data:
                return None
            self._buf += data
        text, _, self._buf = self._buf.partition(b"\n\n")
        self.commands.append(text.decode())
        return text.decode()

    def reply(self, text: str = "+OK", extra: dict[str, str] | None = None) -> None:
        head = f"Content-Type: command/reply\nReply-Text: {text}\n".encode()
        self.write(head + (encode(extra) if extra else b"") + b"\n")

    def api_response(self, body: str) -> None:
        data = body.encode()
        self.write(f"Content-Type: api/response\nContent-Length: {len(data)}\n\n".encode() + data)

    def channel_headers(self) -> dict[str, str]:
        return {"Unique-ID": self.uuid, "Channel-State": "CS_EXECUTE", "Answer-State": "ringing",
                "FreeSWITCH-Switchname": "fake", "Caller-Caller-ID-Name": "\u5f20\u4e09%0A",
                **{f"variable_{k}": v for k, v in self.vars.items()}}

    def event(self, name: str, **extra: str) -> None:
        body = encode({"Event-Name": name, **self.channel_headers(), **extra}) + b"\n"
        self.write(f"Content-Type: text/event-plain\nContent-Length: {len(body)}\n\n".encode() + body)

    # -- a call --------------------------------------------------------------------------------

    def hangup(self, cause: int) -> None:
        """The channel ends: hangup, lingering disconnect-notice, CHANNEL_HANGUP_COMPLETE."""
        self.hung_up = True
        self.vars.update(hangup_cause_q850=str(cause), end_uepoch=str(int(time.time() * 1e6)))
        self.event("CHANNEL_HANGUP")
        notice = b"Disconnected, goodbye.\n"
        self.write(b"Content-Type: text/disconnect-notice\nContent-Disposition: linger\n"
                   + f"Content-Length: {len(notice)}\n\n".encode() + notice)
        self.event("CHANNEL_HANGUP_COMPLETE")

    def run(self, hang_up_at: str | None = None, dial_status: str = "NOANSWER") -> None:
        """Answer the daemon until it closes. hang_up_at: the caller hangs up when the
        daemon asks for this application (or "route": right after `linger`)."""
        while (command := self.read_command()) is not None:
            first, *rest = command.split("\n")
            headers = dict(line.split(": ", 1) for line in rest if ": " in line)
            if first == "connect":
                self.reply("+OK", self.channel_headers())
            elif first == "myevents" or first.startswith(("linger", "filter Event-Name ")):
                self.reply("+OK")
                if first.startswith("linger") and hang_up_at == "route":
                    self.hangup(16)
            elif first.startswith("api db delete/"):
                self.acked = True
                self.api_response("+OK")
            elif first.startswith("api "):
                self.api_response("-ERR no such command\n")
            elif first == "sendmsg":
                self.app(headers, hang_up_at, dial_status)
            else:
                self.reply("-ERR command not found")
        self.sock.close()

    def app(self, headers: dict[str, str], hang_up_at: str | None, dial_status: str) -> None:
        name, arg = headers.get("execute-app-name", ""), headers.get("execute-app-arg", "")
        if self.hung_up:
            self.reply("-ERR invalid session id")
            return
        self.reply("+OK")
        self.apps.append((name, arg))
        if name == hang_up_at:
            self.hangup(16)
            return
        if name == "multiset":
            self.vars.update(pair.split("=", 1) for pair in arg.split())
        elif name == "bridge":
            self.vars["DIALSTATUS"] = dial_status
        if name in ("hangup", "respond"):
            self.hangup(int(arg) if arg.isdigit() and name == "hangup" else 21)
            return
        self.event("CHANNEL_EXECUTE_COMPLETE", **{"Application": name,
                                                 "Application-UUID": headers.get("Event-UUID", "")})
