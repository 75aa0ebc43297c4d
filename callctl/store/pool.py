"""A tenant's pool of virtual numbers (X): add numbers, count them by state."""
from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from callctl.errors import Conflict
from callctl.store.inputs import parse_number
from callctl.store.models import VirtualNumber
from callctl.store.tenants import tenant_row


def add_numbers(engine: Engine, tenant_name: str, numbers: list[str], region: str = "CN") -> int:
    """Add virtual numbers to a tenant's pool. Numbers already in a pool are an error."""
    wanted = sorted({parse_number(n, "virtual number", region) for n in numbers})
    with Session(engine) as session, session.begin():
        tenant = tenant_row(session, tenant_name)
        taken = session.scalars(select(VirtualNumber.e164).where(VirtualNumber.e164.in_(wanted))).all()
        if taken:
            raise Conflict(
                "number_exists", f"{len(taken)} number(s) already in a pool, e.g. {sorted(taken)[0]}"
            )
        session.add_all(VirtualNumber(e164=n, tenant_id=tenant.id) for n in wanted)
    return len(wanted)


def pool_status(engine: Engine, tenant_name: str) -> dict:
    with Session(engine) as session:
        tenant = tenant_row(session, tenant_name)
        counts = dict(
            session.execute(
                select(VirtualNumber.state, func.count())
                .where(VirtualNumber.tenant_id == tenant.id)
                .group_by(VirtualNumber.state)
            ).all()
        )
    return {s: counts.get(s, 0) for s in ("free", "bound", "quarantined", "disabled")}
