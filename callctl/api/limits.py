"""What the API reads of a request body, and when: a pure ASGI middleware in front of it.

FastAPI reads and parses a body before any dependency runs, the token check included,
so without this an anonymous client could make every worker hold 100 MB bodies, or
hold a connection open by sending one byte at a time. Here a request that carries a
body must first show a token that `tokens` (auth.Tokens) accepts (401, nothing read),
may carry `max_bytes` at most (413: refused from its Content-Length, or cut as soon as a chunked
body passes it) and must arrive within `timeout` seconds (408). Each refusal closes the
connection, so the rest of the body is never waited for. The accepted principal is
kept in the request state, so the route's own token check does not look it up again.
"""
from __future__ import annotations

import asyncio
import json

from sqlalchemy.exc import SQLAlchemyError
from starlette.routing import Match

MAX_BODY_BYTES = 1024 * 1024
BODY_TIMEOUT = 10.0


class BodyGuard:
    def __init__(self, app, tokens, max_bytes: int = MAX_BODY_BYTES,
                 timeout: float = BODY_TIMEOUT, routes: list | None = None):
        self.app = app
        self.routes = routes if routes is not None else []
        self.tokens = tokens  # auth.Tokens
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.lower(), value)
        length = headers.get(b"content-length", b"").strip()
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        if not chunked and length in (b"", b"0"):
            return await self.app(scope, receive, send)  # no body: the route checks the token
        if not any(route.matches(scope)[0] is Match.FULL for route in self.routes):
            return await self.app(scope, receive, send)  # no such operation: 404 or 405, the body unread
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        try:
            who = await self.tokens.check(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        except SQLAlchemyError:
            return await _refuse(send, 503, "unavailable", "the database cannot answer; retry")
        if who is None:
            return await _refuse(send, 401, "unauthorized", "send Authorization: Bearer <token> (a valid one)")
        if length and (not length.isdigit() or int(length) > self.max_bytes):
            return await _refuse(send, 413, "body_too_large", f"a request body may be {self.max_bytes} bytes at most")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client left: nothing to answer
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > self.max_bytes:
                        return await _refuse(send, 413, "body_too_large",
                                             f"a request body may be {self.max_bytes} bytes at most")
                    if not message.get("more_body"):
                        break
        except TimeoutError:
            return await _refuse(send, 408, "body_timeout",
                                 f"the request body did not arrive within {self.timeout:g} seconds")
        scope.setdefault("state", {})["principal"] = who
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # only a disconnect can come now

        await self.app(scope, replay, send)


async def _refuse(send, status: int, code: str, message: str) -> None:
    payload = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})
