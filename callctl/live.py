"""Live calls for people: `callctl calls` and `block add --cut-active` (Asterisk, over AMI).

Parties are shown masked; tenants by name. A command that cannot reach the PBX raises
AmiError with what to fix.
"""
from __future__ import annotations

import asyncio

from sqlalchemy import select

from callctl.asterisk.ami import AmiError, AmiLink, cut_active


def _link(cfg) -> AmiLink:
    if not cfg.ami.username:
        raise AmiError("ami.username is not set in the config: live calls are read over AMI (README: Running in production)")
    return AmiLink(cfg.ami.host, cfg.ami.port, cfg.ami.username, cfg.ami.secret, cfg.ami.action_timeout)


def _tenant_names(engine) -> dict[int, str]:
    from callctl.store.models import Tenant

    with engine.connect() as conn:
        return dict(conn.execute(select(Tenant.id, Tenant.name)).all())


async def _with_link(cfg, work):
    link = _link(cfg)
    await link.connect(cfg.ami.action_timeout + 3)
    try:
        return await work(link)
    finally:
        link.close()


def calls(cfg, engine) -> list[dict]:
    """Bridged callctl calls now up: tenant, X, masked parties, seconds."""
    live = asyncio.run(_with_link(cfg, lambda link: link.bridged_calls()))
    names = _tenant_names(engine)
    return [{**call.shown(), "tenant": names.get(call.tenant_id, "")} for call in live]


def cut(cfg, engine, region: str) -> list[dict]:
    """Hang up the live calls the blocks now in force refuse (see ami.cut_active)."""
    from callctl.service import CallService

    service = CallService(engine, spool=None, region=region, node=cfg.node)
    done = asyncio.run(_with_link(cfg, lambda link: cut_active(link, service)))
    names = _tenant_names(engine)
    return [{**call.shown(), "tenant": names.get(call.tenant_id, "")} for call in done]
