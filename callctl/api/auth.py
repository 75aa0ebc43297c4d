"""Who is asking: `Authorization: Bearer <token>` (`callctl token create`) and its role.
A route admits roles by depending on one of the names below, e.g. `Depends(tenant)`.

A token the database accepted is remembered for `api.token_cache_seconds` (Tokens), so
a busy client costs one lookup per that many seconds, not one per request. The bound
this puts on revocation: a revoked token is refused at most that many seconds after
`callctl token revoke` (default 5; 0 looks every token up on every request). Unknown
and revoked tokens are never remembered: a guess costs a lookup and fills nothing."""
from __future__ import annotations

import threading
import time

from cachetools import TTLCache
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

from callctl.errors import Forbidden, Unauthorized
from callctl.store.tokens import Principal, authenticate, token_hash

_bearer = HTTPBearer(auto_error=False)
MAX_REMEMBERED = 10_000  # tokens; the least recently added go first


class Tokens:
    """The principal of a token: from memory while its entry is younger than `seconds`,
    else from the database (store/tokens.authenticate)."""

    def __init__(self, engine: Engine, seconds: float, timer=time.monotonic):
        self.engine = engine
        self.accepted = TTLCache(MAX_REMEMBERED, seconds, timer=timer) if seconds > 0 else None
        self.lock = threading.Lock()  # TTLCache is not thread-safe; lookups run in threads

    def remembered(self, token: str) -> Principal | None:
        """Without touching the database: the principal, if accepted less than `seconds` ago."""
        if self.accepted is None:
            return None
        with self.lock:
            return self.accepted.get(token_hash(token))

    def __call__(self, token: str) -> Principal | None:
        """The principal, or None for an unknown or revoked token (may ask the database)."""
        found = self.remembered(token)
        if found is None:
            found = authenticate(self.engine, token)
            if found is not None and self.accepted is not None:
                with self.lock:
                    self.accepted[token_hash(token)] = found
        return found

    async def check(self, token: str) -> Principal | None:
        """The same from the event loop: the database, when asked, from a thread."""
        return self.remembered(token) or await run_in_threadpool(self, token)


async def principal(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Principal:
    checked = getattr(request.state, "principal", None)  # by BodyGuard (limits.py), before the body
    if checked is not None:
        return checked
    if credentials is None:
        raise Unauthorized("unauthorized", "send Authorization: Bearer <token>")
    found = await request.app.state.tokens.check(credentials.credentials)
    if found is None:
        raise Unauthorized("unauthorized", "unknown or revoked token")
    return found


def role(*roles: str):
    """A dependency admitting only these token roles (new roles add their own endpoints)."""

    async def check(who: Principal = Depends(principal)) -> Principal:
        if who.role not in roles:
            raise Forbidden("forbidden", f"this needs a {' or '.join(roles)} token")
        return who

    return check


tenant = role("tenant")
platform = role("platform")
regulator = role("regulator")


async def person(who: Principal = Depends(platform)) -> str:
    """The person a platform token was issued to (`callctl token create --role platform
    --name NAME`), never a name typed into the request, so the second-person rule of
    reveals holds."""
    if not who.name or who.name == "platform token":
        raise Forbidden("unnamed_token", "reveals need a platform token issued to a named person")
    return who.name
