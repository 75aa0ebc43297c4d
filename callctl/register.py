"""The EAST contact register: for a tenant's regulatory reporting, one row per policy
reference with the virtual number X that stands for the customer's contact, as of a date
(`callctl export contacts`, GET /v1/exports/contacts). Columns and their mapping onto
EAST contact fields: docs/regulator.md. Never a real number: the customers' numbers are
not read at all.

One row per reference: of the tenant's bindings with that reference that existed at the
as-of moment, the one in force then (the newest, if several), else the newest; bindings
without a reference get a row each. Streamed: a register of millions never sits in memory.
"""
from __future__ import annotations

import csv
import io
from datetime import date, datetime, time, timedelta, timezone
from typing import Iterator
from zoneinfo import ZoneInfo

from sqlalchemy import String, and_, case, cast, func, literal, or_, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from callctl.errors import ProvisionError
from callctl.store.models import Binding, VirtualNumber
from callctl.store.tenants import tenant_row

COLUMNS = ("tenant", "policy_reference", "contact_number", "contact_extension", "contact_number_kind", "mode",
           "valid_from", "valid_until", "status_as_of", "as_of", "binding_id")
NUMBER_KIND = "virtual"  # X is a privacy (virtual) number standing for the customer's own


def as_of_moment(text: str, zone: str) -> datetime:
    """--as-of: a date (the end of that day in the tenant's time zone, as reporting
    dates are meant) or an ISO date-time with zone."""
    value = (text or "").strip()
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            return datetime.combine(day + timedelta(days=1), time(0), ZoneInfo(zone)).astimezone(timezone.utc)
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ProvisionError("invalid_as_of", "--as-of must be a date (YYYY-MM-DD) or an ISO date-time with zone") from None
    if moment.tzinfo is None:
        raise ProvisionError("invalid_as_of", "--as-of date-time needs a time zone, e.g. 2026-12-31T23:59:59+08:00")
    return moment.astimezone(timezone.utc)


def rows(engine: Engine, tenant: str, as_of: str) -> Iterator[dict]:
    """The register's rows, in policy reference order (streamed). The tenant and the
    date are checked now, before the first row is asked for."""
    with Session(engine) as session:
        owner = tenant_row(session, tenant)
        name, zone, tenant_id = owner.name, owner.time_zone, owner.id
    return _stream(engine, name, tenant_id, as_of_moment(as_of, zone))


def _stream(engine: Engine, name: str, tenant_id: int, moment: datetime) -> Iterator[dict]:
    ended = and_(Binding.ended_at.is_not(None), Binding.ended_at <= moment)
    expired = and_(Binding.expires_at.is_not(None), Binding.expires_at <= moment)
    status = case((ended, "ended"), (expired, "expired"), else_="active")
    in_force = case((or_(ended, expired), 0), else_=1)
    # NULL references each form their own group (the binding's id stands in).
    group = func.coalesce(Binding.reference, literal("#") + cast(Binding.id, String))
    ranked = (
        select(Binding.id, Binding.reference, Binding.mode, Binding.extension, Binding.created_at,
               Binding.ended_at, Binding.expires_at, VirtualNumber.e164, status.label("status"),
               func.row_number().over(partition_by=group,
                                      order_by=(in_force.desc(), Binding.created_at.desc(), Binding.id.desc()))
               .label("rank"))
        .join(VirtualNumber, VirtualNumber.id == Binding.number_id)
        .where(Binding.tenant_id == tenant_id, Binding.created_at < moment)
        .subquery()
    )
    query = (select(ranked).where(ranked.c.rank == 1)
             .order_by(ranked.c.reference.is_(None), ranked.c.reference, ranked.c.id))
    stamp = moment.isoformat()
    with engine.connect().execution_options(stream_results=True, yield_per=2000) as conn:
        for row in conn.execute(query):
            ends = [t for t in (row.ended_at, row.expires_at) if t is not None]
            yield {
                "tenant": name, "policy_reference": row.reference or "", "contact_number": row.e164,
                "contact_extension": row.extension or "", "contact_number_kind": NUMBER_KIND, "mode": row.mode,
                "valid_from": _iso(row.created_at), "valid_until": _iso(min(ends)) if ends else "",
                "status_as_of": row.status, "as_of": stamp, "binding_id": row.id,
            }


def _iso(value) -> str:
    if isinstance(value, str):  # SQLite through a subquery hands back text
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat()


def csv_lines(records: Iterator[dict]) -> Iterator[str]:
    """The header, then one CSV line per row. Free text (tenant, reference) that a
    spreadsheet would run as a formula gets a leading apostrophe, as in the regulator's
    export; numbers are ours (E.164) and stay as they are."""
    from callctl.regulator import _cell

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")

    def line(values) -> str:
        out.seek(0)
        out.truncate()
        writer.writerow(values)
        return out.getvalue()

    yield line(COLUMNS)
    for record in records:
        yield line([_cell(record[c]) if c in ("tenant", "policy_reference") else record[c] for c in COLUMNS])
