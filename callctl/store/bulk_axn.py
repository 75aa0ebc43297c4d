"""Set-based AXN binds for `bind --bulk` (store/bulk.py): free X locked a batch at a
time, one UPDATE, one multi-row INSERT (PostgreSQL: COPY)."""
from __future__ import annotations

import io
from datetime import datetime

import psycopg2
from sqlalchemy import and_, insert, or_, select, text, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from callctl.core.enums import BindingStatus, NumberState
from callctl.core.decision import Mode
from callctl.errors import Conflict, Unavailable
from callctl.store.allocation import ALLOCATION_ROUNDS, LOCK_WAIT_SECONDS, bound_columns
from callctl.store.models import Binding, VirtualNumber


def bind_axn_batch(engine: Engine, tenant_id: int, wanted: list, now: datetime) -> tuple[list[dict], list]:
    """Bind the AXN rows of one tenant, in one transaction when the pool has room: returns
    the bound rows for the output file and the rows left, with their error.
    Free X are locked with SKIP LOCKED (parallel loads take different X); X that others
    hold are waited for one at a time, in a new transaction holding no other X (as in
    allocation.allocate: no deadlock), so rows are `pool_exhausted` only when no X is left."""
    reusable = or_(VirtualNumber.state == NumberState.FREE,
                   and_(VirtualNumber.state == NumberState.QUARANTINED, VirtualNumber.quarantined_until <= now))
    made, rest, wait = [], list(wanted), False
    for _ in range(ALLOCATION_ROUNDS):
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text(f"SET LOCAL lock_timeout = '{LOCK_WAIT_SECONDS}s'"))
            try:
                numbers = _lock_free(conn, tenant_id, reusable, 1, wait=True) if wait else []
            except OperationalError as exc:
                if getattr(exc.orig, "pgcode", None) != "55P03":  # lock_not_available
                    raise
                return made, [(r, Unavailable("pool_busy", "the pool is busy; load the rejected rows again"))
                              for r, _, _ in rest]
            numbers += _lock_free(conn, tenant_id, VirtualNumber.state == NumberState.FREE, len(rest) - len(numbers),
                                  [n for n, _ in numbers])
            numbers += _lock_free(conn, tenant_id, reusable & (VirtualNumber.state != NumberState.FREE),
                                  len(rest) - len(numbers), [n for n, _ in numbers])
            taken, rest = rest[:len(numbers)], rest[len(numbers):]
            if taken:
                made += _bind_numbers(conn, taken, numbers)
            # Others hold the X still reusable (if any): wait for one, holding none.
            wait = bool(rest) and conn.scalar(
                select(VirtualNumber.id).where(VirtualNumber.tenant_id == tenant_id, reusable).limit(1)) is not None
        if not wait:
            break
    exhausted = Conflict("pool_exhausted", "no free virtual number left in the pool")
    return made, [(record, exhausted) for record, _, _ in rest]


def _bind_numbers(conn: Connection, taken: list, numbers: list[tuple[int, str]]) -> list[dict]:
    """Bind the locked X to the rows, in order; the rows for the output file."""
    conn.execute(
        update(VirtualNumber).where(VirtualNumber.id.in_([n for n, _ in numbers]))
        .values(**bound_columns(Mode.AXN))
    )
    values = [dict(v, number_id=n) for (_, _, v), (n, _) in zip(taken, numbers)]
    if conn.dialect.name == "postgresql":
        copy_rows(conn, Binding.__table__, values)
    else:
        conn.execute(insert(Binding), values)
    # One active AXN binding per X (ux_binding_axn_number): X names the new binding.
    ids = dict(conn.execute(select(Binding.number_id, Binding.id).where(
        Binding.number_id.in_([n for n, _ in numbers]), Binding.status == BindingStatus.ACTIVE)).all())
    return [{"line": record.line, "id": ids[number_id], "tenant": name, "x": x, "extension": "", "mode": "AXN",
             "reference": v["reference"] or "", "expires_at": iso(v["expires_at"])}
            for (record, name, v), (number_id, x) in zip(taken, numbers)]


def _lock_free(conn: Connection, tenant_id: int, condition, count: int, exclude: list[int] = (),
               wait: bool = False) -> list[tuple[int, str]]:
    if count <= 0:
        return []
    query = select(VirtualNumber.id, VirtualNumber.e164).where(VirtualNumber.tenant_id == tenant_id, condition)
    if exclude:
        query = query.where(VirtualNumber.id.not_in(exclude))
    return list(conn.execute(query.order_by(VirtualNumber.id).limit(count).with_for_update(skip_locked=not wait)).all())


def iso(when: datetime | None) -> str:
    return when.isoformat() if when else ""


class _RowContext:
    """What a Python-side column default (e.g. a lookup hash of another column) sees."""

    def __init__(self, row: dict):
        self.row = row

    def get_current_parameters(self, isolate_multiinsert_groups=True) -> dict:
        return self.row


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_rows(conn: Connection, table, rows: list[dict]) -> None:
    """INSERT rows with PostgreSQL's COPY: the fastest way in, for large batches. Values
    go through the columns' own types (e.g. encryption) and Python-side defaults, as an
    INSERT would; integrity errors surface as sqlalchemy IntegrityError."""
    columns = list(rows[0])
    columns += [c.name for c in table.columns if c.name not in rows[0] and c.default is not None]
    dialect = conn.dialect
    processors = [table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in columns]
    defaults = {c.name: c.default for c in table.columns if c.name in columns and c.default is not None}
    lines = []
    for row in rows:
        fields = []
        for name, processor in zip(columns, processors):
            if name in row:
                value = row[name]
            else:
                default = defaults[name]
                value = default.arg(_RowContext(row)) if default.is_callable else default.arg
            if value is not None and processor is not None:
                value = processor(value)
            fields.append("\\N" if value is None else
                          (value.isoformat() if isinstance(value, datetime) else str(value)).translate(_COPY_ESCAPES))
        lines.append("\t".join(fields))
    data = io.StringIO("\n".join(lines) + "\n")
    statement = f"COPY {table.name} ({', '.join(columns)}) FROM STDIN"
    try:
        conn.connection.dbapi_connection.cursor().copy_expert(statement, data)
    except psycopg2.Error as exc:  # as SQLAlchemy's own exceptions, like any other statement
        raise DBAPIError.instance(statement, None, exc, psycopg2.Error) from None
