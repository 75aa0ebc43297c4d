"""Bulk provisioning from CSV files: `callctl pool import FILE`, `callctl bind --bulk FILE`.

Files are read as a stream and written in set-based batches (one transaction and a few
statements per batch, not per row). Every row is checked first; a bad row never stops
the good ones: it is reported with its line number and code, and the rejected rows are
written, as they were, to a file beside the input so that nothing is lost.

pool import columns (header row required): number [, tenant]
bind --bulk columns (header row required): customer [, tenant, mode, other_party,
    reference, expires_at, ttl_seconds]
`tenant` may be left out when --tenant is given (a row's own tenant wins).
"""
from __future__ import annotations

import csv
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

import psycopg2
from sqlalchemy import and_, insert, or_, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from callctl.core.decision import Mode
from callctl.store import provision
from callctl.store.models import Binding, VirtualNumber, utcnow
from callctl.store.provision import ProvisionError

POOL_COLUMNS = ("number", "tenant")
BIND_COLUMNS = ("customer", "tenant", "mode", "other_party", "reference", "expires_at", "ttl_seconds")
# No customer column: the line number ties a binding to its input row.
BOUND_COLUMNS = ("line", "id", "tenant", "x", "extension", "mode", "reference", "expires_at")


@dataclass
class RowError:
    line: int
    code: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message} [{self.code}]"


@dataclass
class BulkResult:
    rows: int = 0
    done: int = 0
    errors: list[RowError] = field(default_factory=list)
    rejected_file: Path | None = None
    bound_file: Path | None = None


class _Rejects:
    """Rejected rows, as they were in the input plus line and error, in FILE.rejected.csv
    (0600: the rows hold real numbers, like the input)."""

    def __init__(self, source: Path, header: list[str]):
        self.path = source.with_name(source.stem + ".rejected.csv")
        self.header = header
        self.file = None

    def add(self, line: int, raw: dict, error: ProvisionError | RowError, result: BulkResult) -> None:
        result.errors.append(error if isinstance(error, RowError) else RowError(line, error.code, str(error)))
        if self.file is None:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            self.file = open(fd, "w", newline="")
            self.writer = csv.writer(self.file)
            self.writer.writerow(["line", "error", *self.header])
            result.rejected_file = self.path
        last = result.errors[-1]
        self.writer.writerow([line, f"{last.code}: {last.message}", *(raw.get(c, "") for c in self.header)])

    def close(self) -> None:
        if self.file:
            self.file.close()


def _rows(path: Path, known: tuple[str, ...], required: str) -> tuple[list[str], Iterator[tuple[int, dict]]]:
    """The header and (line number, row) pairs of a CSV file, after checking the header."""
    try:
        handle = open(path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise ProvisionError("invalid_file", f"{path}: {exc.strerror}") from None
    reader = csv.reader(handle)
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        handle.close()
        raise ProvisionError("invalid_file", f"{path}: empty file; the first line names the columns") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        handle.close()
        raise ProvisionError("invalid_file", f"{path}: line 1 is not CSV text ({type(exc).__name__})") from None
    unknown = [h for h in header if h not in known]
    if required not in header or unknown or len(set(header)) != len(header):
        handle.close()
        raise ProvisionError(
            "invalid_file",
            f"{path}: line 1 must name the columns: {required} (required), {', '.join(known[1:])} (optional)"
            + (f"; unknown: {', '.join(unknown)}" if unknown else ""),
        )

    def rows():
        with handle:
            while True:
                try:
                    values = next(reader)
                except StopIteration:
                    return
                except (UnicodeDecodeError, csv.Error) as exc:
                    yield reader.line_num, RowError(reader.line_num, "invalid_row", f"not CSV text ({type(exc).__name__})")
                    continue
                if not any(v.strip() for v in values):
                    continue  # blank line
                if len(values) != len(header):
                    yield reader.line_num, RowError(
                        reader.line_num, "invalid_row", f"{len(values)} field(s), the header names {len(header)}")
                    continue
                yield reader.line_num, {h: v.strip() for h, v in zip(header, values)}

    return header, rows()


def _batches(rows: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in rows:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Tenants:
    """Tenant name -> id, looked up once per name."""

    def __init__(self, engine: Engine, default: str | None):
        self.engine, self.default, self.ids = engine, default, {}

    def id_of(self, row: dict) -> tuple[str, int]:
        name = row.get("tenant") or self.default
        if not name:
            raise ProvisionError("missing_tenant", "no tenant: give a tenant column or --tenant")
        if name not in self.ids:
            self.ids[name] = provision.tenant_id_of(self.engine, name)
        return name, self.ids[name]


def import_pool(engine: Engine, path: str | os.PathLike, *, tenant_name: str | None = None, region: str = "CN",
                batch_size: int = 5000, progress: Callable[[int], None] | None = None) -> BulkResult:
    """Add the file's virtual numbers to their tenants' pools (state free)."""
    path = Path(path)
    header, rows = _rows(path, POOL_COLUMNS, "number")
    result, rejects, tenants = BulkResult(), _Rejects(path, header), _Tenants(engine, tenant_name)
    seen: dict[str, int] = {}
    try:
        for batch in _batches(rows, batch_size):
            valid = []  # (line, raw, e164, tenant_id)
            for line, raw in batch:
                result.rows += 1
                if isinstance(raw, RowError):
                    rejects.add(line, {}, raw, result)
                    continue
                try:
                    e164 = provision._number(raw["number"], "virtual number", region)
                    _, tenant_id = tenants.id_of(raw)
                    if e164 in seen:
                        raise ProvisionError("duplicate_row", f"{e164} is on line {seen[e164]} already")
                except ProvisionError as exc:
                    rejects.add(line, raw, exc, result)
                    continue
                seen[e164] = line
                valid.append((line, raw, e164, tenant_id))
            with engine.begin() as conn:
                taken = set(conn.scalars(select(VirtualNumber.e164).where(
                    VirtualNumber.e164.in_([v[2] for v in valid]))))
                fresh = [v for v in valid if v[2] not in taken]
                if fresh:
                    try:
                        conn.execute(insert(VirtualNumber), [{"e164": e, "tenant_id": t} for _, _, e, t in fresh])
                    except IntegrityError:
                        raise ProvisionError("conflict", f"numbers near line {fresh[0][0]} were added concurrently; "
                                             "run the file again (numbers already added are reported as such)") from None
            for line, raw, e164, _ in valid:
                if e164 in taken:
                    rejects.add(line, raw, ProvisionError("number_exists", f"{e164} is in a pool already"), result)
            result.done += len(fresh)
            if progress:
                progress(len(batch))
    finally:
        rejects.close()
    return result


def bind_bulk(engine: Engine, path: str | os.PathLike, *, tenant_name: str | None = None, region: str = "CN",
              extension_digits: int = 4, batch_size: int = 5000, now: datetime | None = None,
              out: str | os.PathLike | None = None,
              progress: Callable[[int], None] | None = None) -> BulkResult:
    """Create the file's bindings. AXN rows are bound set-based, a batch at a time (free
    X locked with SKIP LOCKED, one UPDATE, one multi-row INSERT) by a writer thread while
    this one checks the next batch; AXB and AXE rows each need their own conflict check
    on X, so they go through provision.bind one by one.
    The bindings made go to `out` (default FILE.bound.csv): line, id, X, extension, ..."""
    path = Path(path)
    header, rows = _rows(path, BIND_COLUMNS, "customer")
    result, rejects, tenants = BulkResult(), _Rejects(path, header), _Tenants(engine, tenant_name)
    result.bound_file = Path(out) if out else path.with_name(path.stem + ".bound.csv")

    def check(batch: list) -> _Batch:
        """Validate a batch; bind its AXB/AXE rows; the AXN rows wait for the writer."""
        todo = _Batch(size=len(batch), when=now or utcnow())
        for line, raw in batch:
            if isinstance(raw, RowError):
                todo.problems.append((line, {}, raw))
                continue
            try:
                name, tenant_id = tenants.id_of(raw)
                mode = (raw.get("mode") or "AXN").upper()
                expires_at, ttl = _date(raw.get("expires_at")), _int(raw.get("ttl_seconds"))
                reference, other = raw.get("reference") or None, raw.get("other_party") or None
                if mode != Mode.AXN:
                    made = provision.bind(engine, name, raw["customer"], mode=mode, other_party=other,
                                          reference=reference, expires_at=expires_at, ttl_seconds=ttl,
                                          region=region, extension_digits=extension_digits, now=todo.when)
                    todo.made.append(_bound_row(line, made))
                    continue
                party_a, _ = provision._binding_input(mode, raw["customer"], other, extension_digits, region)
                values = {
                    "tenant_id": tenant_id, "mode": mode, "party_a": party_a, "party_b": None, "extension": None,
                    "reference": provision._reference(reference),
                    "expires_at": provision._expiry_from(expires_at, ttl, todo.when),
                    "status": "active", "created_at": todo.when,
                }
            except ProvisionError as exc:
                todo.problems.append((line, raw, exc))
                continue
            todo.axn.setdefault(tenant_id, []).append((line, raw, name, values))
        return todo

    def write(todo: _Batch) -> _Batch:
        for tenant_id, wanted in todo.axn.items():
            made, exhausted = _bind_axn_batch(engine, tenant_id, wanted, todo.when)
            todo.made += made
            todo.problems += [(line, raw, ProvisionError("pool_exhausted", "no free virtual number left in the pool"))
                              for line, raw, *_ in exhausted]
        return todo

    def report(todo: _Batch) -> None:
        bound.writerows(sorted(todo.made, key=lambda r: r["line"]))
        result.rows += todo.size
        result.done += len(todo.made)
        for line, raw, problem in sorted(todo.problems, key=lambda p: p[0]):
            rejects.add(line, raw, problem, result)
        if progress:
            progress(todo.size)

    with open(result.bound_file, "w", newline="") as bound_handle, ThreadPoolExecutor(1) as writer:
        bound = csv.DictWriter(bound_handle, BOUND_COLUMNS)
        bound.writeheader()
        try:
            pending = None
            for batch in _batches(rows, batch_size):
                todo = check(batch)  # overlaps with the writer's work on the previous batch
                if pending:
                    report(pending.result())
                pending = writer.submit(write, todo)
            if pending:
                report(pending.result())
        finally:
            rejects.close()
    return result


@dataclass
class _Batch:
    size: int
    when: datetime
    axn: dict = field(default_factory=dict)  # tenant id -> [(line, raw, tenant name, binding values)]
    made: list = field(default_factory=list)  # rows for the output file
    problems: list = field(default_factory=list)  # (line, raw, error)


def _bind_axn_batch(engine: Engine, tenant_id: int, wanted: list, now: datetime) -> tuple[list[dict], list]:
    """Bind up to len(wanted) AXN rows of one tenant in one transaction; returns the
    bound rows for the output file and the rows the pool had no X for."""
    reusable = or_(VirtualNumber.state == "free",
                   and_(VirtualNumber.state == "quarantined", VirtualNumber.quarantined_until <= now))
    with engine.begin() as conn:
        numbers = _lock_free(conn, tenant_id, VirtualNumber.state == "free", len(wanted))
        if len(numbers) < len(wanted):
            numbers += _lock_free(conn, tenant_id, reusable & (VirtualNumber.state != "free"),
                                  len(wanted) - len(numbers))
        taken, exhausted = wanted[:len(numbers)], wanted[len(numbers):]
        if not taken:
            return [], exhausted
        conn.execute(
            update(VirtualNumber).where(VirtualNumber.id.in_([n for n, _ in numbers]))
            .values(state="bound", mode=Mode.AXN.value, quarantined_until=None)
        )
        values = [dict(v, number_id=n) for (_, _, _, v), (n, _) in zip(taken, numbers)]
        try:
            if conn.dialect.name == "postgresql":
                copy_rows(conn, Binding.__table__, values)
            else:
                conn.execute(insert(Binding), values)
        except IntegrityError:
            raise ProvisionError("conflict", "a virtual number was bound concurrently; run the file again "
                                 "(rows already bound are in the output file)") from None
        # One active AXN binding per X (ux_binding_axn_number): X names the new binding.
        ids = dict(conn.execute(select(Binding.number_id, Binding.id).where(
            Binding.number_id.in_([n for n, _ in numbers]), Binding.status == "active")).all())
    made = []
    for (line, raw, name, v), (number_id, x) in zip(taken, numbers):
        binding_id = ids[number_id]
        made.append({"line": line, "id": binding_id, "tenant": name, "x": x, "extension": "", "mode": "AXN",
                     "reference": v["reference"] or "",
                     "expires_at": v["expires_at"].isoformat() if v["expires_at"] else ""})
    return made, exhausted


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


def _lock_free(conn: Connection, tenant_id: int, condition, count: int) -> list[tuple[int, str]]:
    return list(conn.execute(
        select(VirtualNumber.id, VirtualNumber.e164)
        .where(VirtualNumber.tenant_id == tenant_id, condition)
        .order_by(VirtualNumber.id).limit(count)
        .with_for_update(skip_locked=True)
    ).all())


def _bound_row(line: int, made: dict) -> dict:
    return {"line": line, **{k: made.get(k) or "" for k in BOUND_COLUMNS if k != "line"}}


def _date(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise ProvisionError("invalid_expiry", "expires_at must be an ISO date-time with zone") from None


def _int(text: str | None) -> int | None:
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ProvisionError("invalid_expiry", "ttl_seconds must be a whole number") from None
