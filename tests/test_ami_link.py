"""The AMI link's checked ping, against a minimal AMI server speaking plain-text AMI as
Asterisk does (banner, Login, Ping, each answer carrying its ActionID): an edge the real
Asterisk cannot easily produce, a connection that stays up while nothing answers on it.
The link must notice (no Pong within action_timeout), drop it and log in again on a new
one by itself. (Asterisk going away and coming back for real: test_live_calls.)"""
from __future__ import annotations

import asyncio
import time

from prometheus_client import REGISTRY

from callctl.asterisk.ami import AmiLink


class FakeAmi:
    def __init__(self):
        self.connections = 0
        self.logins = 0
        self.mute = 0  # the connection (1, 2...) that stops answering; new ones answer

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        mine = self.connections
        writer.write(b"Asterisk Call Manager/9.0.0\r\n")
        pending = b""
        try:
            while data := await reader.read(4096):
                pending += data
                while b"\r\n\r\n" in pending:
                    block, pending = pending.split(b"\r\n\r\n", 1)
                    action = dict(line.split(": ", 1) for line in block.decode().split("\r\n") if ": " in line)
                    if mine == self.mute:
                        continue
                    writer.write(self.answer(action).encode())
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def answer(self, action: dict) -> str:
        head = f"Response: Success\r\nActionID: {action.get('ActionID', '')}\r\n"
        if action.get("Action") == "Login":
            self.logins += 1
            return head + "Message: Authentication accepted\r\n\r\n"
        if action.get("Action") == "Ping":
            return head + "Ping: Pong\r\nTimestamp: 1700000000.000000\r\n\r\n"
        return f"Response: Error\r\nActionID: {action.get('ActionID', '')}\r\nMessage: Invalid/unknown command\r\n\r\n"


async def until(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


def test_a_link_that_stops_answering_is_dropped_and_made_again():
    async def scenario():
        fake = FakeAmi()
        port = await fake.start()
        link = AmiLink("127.0.0.1", port, "callctl", "secret", action_timeout=0.5, ping_every=0.3)
        connected = lambda: REGISTRY.get_sample_value("callctl_ami_connected")  # noqa: E731
        reconnects = lambda: REGISTRY.get_sample_value("callctl_ami_reconnects_total")  # noqa: E731
        stop = asyncio.Event()
        link.start()
        keeper = asyncio.create_task(link.keepalive(stop))
        try:
            await until(lambda: connected() == 1 and fake.logins == 1, "no login")
            before = reconnects()
            await link.ping()  # answered
            fake.mute = 1  # the connection stays up; nothing answers on it any more
            await until(lambda: fake.connections == 2 and fake.logins == 2 and connected() == 1,
                        "the silent link was not dropped and made again")
            assert reconnects() == before + 1
            await link.ping()  # answered, on the new connection
        finally:
            stop.set()
            await keeper
            link.close()
            fake.server.close()

    asyncio.run(scenario())
