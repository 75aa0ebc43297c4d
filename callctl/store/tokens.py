"""API tokens: made once and shown once, stored as SHA-256, looked up per request.

A token is 32 random bytes (URL-safe text), so a plain SHA-256 is enough to keep it
safe at rest: there is nothing to guess. Each token has a role; a 'tenant' token acts
for one tenant. New roles are new entries in ROLES plus the endpoints that accept them.
"""
from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from callctl.errors import NotFound, ProvisionError
from callctl.store.models import ApiToken, Tenant, utcnow
from callctl.store.tenants import tenant_row

ROLES = ("tenant", "regulator", "platform")  # regulator: reads the regulator export, nothing else; platform: the operator's staff (blocks)
TENANT_ROLES = ("tenant",)  # the roles that act for one tenant
PREFIX = "cc_"  # makes a leaked token easy to recognise (secret scanners)


@dataclass(frozen=True)
class Principal:
    """Who is calling the API."""

    token_id: int
    role: str
    tenant_id: int | None
    tenant_name: str | None
    name: str = ""  # whom the token was issued to: the person, for reveals


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(engine: Engine, *, role: str = "tenant", tenant_name: str | None = None, name: str = "") -> dict:
    """Make a token; the returned 'token' is the only time it is ever shown."""
    if role not in ROLES:
        raise ProvisionError("invalid_role", f"role must be one of {', '.join(ROLES)}")
    if (role in TENANT_ROLES) != (tenant_name is not None):
        raise ProvisionError("invalid_role", f"a {role} token {'needs' if role in TENANT_ROLES else 'takes no'} tenant")
    if len(name) > 100:
        raise ProvisionError("invalid_name", "token name must be at most 100 characters")
    token = PREFIX + secrets.token_urlsafe(32)
    with Session(engine) as session, session.begin():
        tenant = tenant_row(session, tenant_name) if tenant_name is not None else None
        row = ApiToken(token_hash=token_hash(token), role=role, tenant_id=tenant.id if tenant else None,
                       name=name or f"{role} token")
        session.add(row)
        session.flush()
        return {"id": row.id, "role": role, "tenant": tenant_name, "name": row.name, "token": token}


def authenticate(engine: Engine, token: str) -> Principal | None:
    """The principal for a presented token, None if it is unknown or revoked."""
    if not token.startswith(PREFIX) or len(token) > 200:
        return None
    with engine.connect() as conn:
        row = conn.execute(
            select(ApiToken.id, ApiToken.role, ApiToken.tenant_id, Tenant.name, ApiToken.name)
            .outerjoin(Tenant, Tenant.id == ApiToken.tenant_id)
            .where(ApiToken.token_hash == token_hash(token), ApiToken.revoked_at.is_(None))
        ).first()
    return Principal(*row) if row else None


def list_tokens(engine: Engine) -> list[dict]:
    with Session(engine) as session:
        rows = session.execute(
            select(ApiToken, Tenant.name).outerjoin(Tenant, Tenant.id == ApiToken.tenant_id).order_by(ApiToken.id)
        ).all()
        return [
            {"id": t.id, "role": t.role, "tenant": name, "name": t.name, "created_at": t.created_at.isoformat(),
             "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None}
            for t, name in rows
        ]


def revoke_token(engine: Engine, token_id: int) -> dict:
    with Session(engine) as session, session.begin():
        row = session.get(ApiToken, token_id, with_for_update=True)
        if row is None:
            raise NotFound("token_not_found", f"no token {token_id}")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
    return {"id": token_id, "revoked": True}
