"""Who is asking: `Authorization: Bearer <token>` (`callctl token create`) and its role.
A route admits roles by depending on one of the names below, e.g. `Depends(tenant)`."""
from __future__ import annotations

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.engine import Engine

from callctl.api.deps import engine
from callctl.errors import Forbidden, Unauthorized
from callctl.store.tokens import Principal, authenticate

_bearer = HTTPBearer(auto_error=False)


def principal(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
              db: Engine = Depends(engine)) -> Principal:
    checked = getattr(request.state, "principal", None)  # by BodyGuard (limits.py), before the body
    if checked is not None:
        return checked
    if credentials is None:
        raise Unauthorized("unauthorized", "send Authorization: Bearer <token>")
    found = authenticate(db, credentials.credentials)
    if found is None:
        raise Unauthorized("unauthorized", "unknown or revoked token")
    return found


def role(*roles: str):
    """A dependency admitting only these token roles (new roles add their own endpoints)."""

    def check(who: Principal = Depends(principal)) -> Principal:
        if who.role not in roles:
            raise Forbidden("forbidden", f"this needs a {' or '.join(roles)} token")
        return who

    return check


tenant = role("tenant")
platform = role("platform")
regulator = role("regulator")


def person(who: Principal = Depends(platform)) -> str:
    """The person a platform token was issued to (`callctl token create --role platform
    --name NAME`), never a name typed into the request, so the second-person rule of
    reveals holds."""
    if not who.name or who.name == "platform token":
        raise Forbidden("unnamed_token", "reveals need a platform token issued to a named person")
    return who.name
