"""A stub PBX backend for tests/test_daemon.py: one line per request over TCP.

    route CALL_ID CALLED CALLER        -> the decision's variables, "k=v k=v ..."
    end CALL_ID CALLED CALLER ACTION REASON TENANT START -> the CDR outcome ("written", ...)

It proves a backend is only a translation: the daemon owns the store, spool and timeouts.
"""
from __future__ import annotations

import asyncio
import os
from callctl.daemon import AsyncBackend
from callctl.service import FinishedCall, decision_variables, parse_epoch, parse_int


class StubBackend(AsyncBackend):
    name = "stub"

    async def start(self) -> dict:
        host, _, port = os.environ["CALLCTL_STUB_LISTEN"].rpartition(":")
        self.server = await asyncio.start_server(self.session, host, int(port))
        return {"listen": os.environ["CALLCTL_STUB_LISTEN"]}

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        words = (await reader.readline()).decode().split()
        if words[:1] == ["route"] and len(words) == 4:
            _, decision = await self.daemon.route(words[2], words[3], None, words[1])
            answer = " ".join(f"{k}={v}" for k, v in decision_variables(decision).items())
        elif words[:1] == ["end"] and len(words) == 8:
            answer = await self.daemon.record(FinishedCall(
                words[1], called=words[2], caller=words[3], action=words[4], reason=words[5],
                tenant=parse_int(words[6]), start=parse_epoch(words[7])))
        else:
            answer = "error"
        writer.write(answer.encode() + b"\n")
        await writer.drain()
        writer.close()
