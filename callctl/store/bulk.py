"""Bulk provisioning from CSV files: `callctl pool import FILE`, `callctl bind --bulk FILE`.

Files are read as a stream and written in set-based batches (one transaction and a few
statements per batch, not per row). Every row is checked first; a bad row never stops
the good ones. Every row of the file ends done (or, for `bind --bulk`, found bound
already) or rejected with its own line number and code, and the counts add up to the
rows of the file (blank lines are not rows); a file whose first line is not a header
of known columns is refused whole before anything is written. No input crashes a load.

- The file is read as UTF-8, line by line: a byte that is not UTF-8 spoils only its own
  row (rejected, `invalid_text`), never its neighbours, and line numbers stay true.
- Rejected rows go to FILE.rejected.csv (always mode 0600: the rows hold real numbers,
  like the input): `line,error,` then the row exactly as it was in the file, bytes and
  quoting included. The `line` and `error` columns are ignored on input, so the rejected
  file loads again as it is once its rows are fixed. It holds this run's rejected rows
  only (none: no file).
- What was committed is always in FILE.bound.csv, whatever happens later in the file.
- Idempotency (bind --bulk): one active binding per tenant, customer and reference (a
  missing reference counts as one value). A row whose binding exists already is not bound
  again: it is reported `existing` and listed in FILE.bound.csv with that binding, so
  loading a file twice, or again after fixing its rejected rows, binds nobody twice.
  An active binding of the same customer and reference with another mode or other
  party is `reference_in_use`. Two rows of one file with the same key: `duplicate_row`.

pool import columns (header row required): number [, tenant]
bind --bulk columns (header row required): customer [, tenant, mode, other_party,
    reference, expires_at, ttl_seconds]
`tenant` may be left out when --tenant is given (a row's own tenant wins).
"""
from __future__ import annotations

import csv
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import psycopg2
from sqlalchemy import and_, insert, or_, select, text, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, SQLAlchemyError

from callctl.core.decision import Mode
from callctl.errors import Conflict, NotFound, ProvisionError, Unavailable
from callctl.store.allocation import ALLOCATION_ROUNDS, LOCK_WAIT_SECONDS, bound_columns
from callctl.store.bindings import bind
from callctl.store.inputs import binding_parties, expiry_from, parse_number, parse_reference
from callctl.store.tenants import tenant_id_of
from callctl.store.crypto import number_hash
from callctl.store.models import Binding, VirtualNumber, utcnow

POOL_COLUMNS = ("number", "tenant")
BIND_COLUMNS = ("customer", "tenant", "mode", "other_party", "reference", "expires_at", "ttl_seconds")
IGNORED_COLUMNS = ("line", "error")  # the rejected file's own columns: it loads again as it is
# No customer column: the line number ties a binding to its input row.
BOUND_COLUMNS = ("line", "id", "tenant", "x", "extension", "mode", "reference", "expires_at")
_LONG_DIGITS = re.compile(r"\d{5}")
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, kept by surrogateescape


@dataclass
class RowError:
    line: int
    code: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message} [{self.code}]"


@dataclass
class BulkResult:
    rows: int = 0  # rows of the file (blank lines are not rows) = done + existing + rejected
    done: int = 0
    existing: int = 0  # bind --bulk: bound already by an earlier load (see the idempotency rule)
    errors: list[RowError] = field(default_factory=list)
    rejected_file: Path | None = None
    bound_file: Path | None = None


@dataclass
class _Record:
    """One row of the file: where it starts, its text as it was, and its values."""
    line: int
    raw: str
    values: dict | None = None  # column -> value (stripped); None for a bad row
    error: RowError | None = None


class _Lines:
    """The file's physical lines, each decoded on its own (an undecodable byte is kept
    as a surrogate escape and spoils only its row); `taken` are the lines of the record
    the CSV reader is reading."""

    def __init__(self, handle: BinaryIO):
        self.handle, self.count, self.taken = handle, 0, []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = self.handle.readline()
        if not line:
            raise StopIteration
        self.count += 1
        text = line.decode("utf-8", "surrogateescape")
        if self.count == 1:
            text = text.removeprefix("\ufeff")  # a byte order mark, as spreadsheets write
        self.taken.append(text)
        return text


def _read(lines: _Lines, reader) -> _Record | None:
    """The next record (values as a list), or None at the end of the file."""
    lines.taken = []
    start = lines.count + 1
    try:
        values = next(reader)
    except StopIteration:
        return None
    except csv.Error as exc:  # e.g. a field over csv.field_size_limit(): that row only
        return _Record(start, "".join(lines.taken), error=RowError(start, "invalid_row", f"not CSV text: {exc}"))
    raw = "".join(lines.taken)
    if _NOT_UTF8.search(raw):
        return _Record(start, raw, error=RowError(start, "invalid_text", "not UTF-8 text (a byte that is not)"))
    if "\0" in raw:
        return _Record(start, raw, error=RowError(start, "invalid_text", "a NUL character"))
    return _Record(start, raw, values=values)


def _rows(path: Path, known: tuple[str, ...], required: str) -> tuple[str, Iterator[_Record]]:
    """The header line and the records of a CSV file, after checking the header."""
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise ProvisionError("invalid_file", f"{path}: {exc.strerror}") from None
    lines = _Lines(handle)
    reader = csv.reader(lines)
    try:
        first = _read(lines, reader)
        while first is not None and first.values == []:  # blank lines before the header
            first = _read(lines, reader)
    except OSError as exc:
        handle.close()
        raise ProvisionError("invalid_file", f"{path}: {exc.strerror}") from None
    if first is None or first.values is None:
        handle.close()
        raise ProvisionError("invalid_file", f"{path}: " + (
            "empty file; the first line names the columns" if first is None else
            f"line {first.line} is not a header of CSV text ({first.error.message})"))
    header = [h.strip().lower() for h in first.values]
    named = [h for h in header if h not in IGNORED_COLUMNS]
    unknown = [h for h in named if h not in known]
    if required not in named or unknown or len(set(named)) != len(named):
        handle.close()
        raise ProvisionError(
            "invalid_file",
            f"{path}: line {first.line} must name the columns: {required} (required), "
            f"{', '.join(known[1:])} (optional)"
            + (f"; unknown: {', '.join(unknown)[:200]}" if unknown else ""),
        )

    def records():
        with handle:
            while (record := _read(lines, reader)) is not None:
                if record.values is not None:
                    if not any(v.strip() for v in record.values):
                        continue  # a blank line is not a row
                    if len(record.values) != len(header):
                        record.error = RowError(record.line, "invalid_row", f"{len(record.values)} field(s), "
                                                f"the header names {len(header)}")
                        record.values = None
                    else:
                        record.values = {h: v.strip() for h, v in zip(header, record.values)
                                         if h not in IGNORED_COLUMNS}
                yield record

    return first.raw, records()


class _Rejects:
    """FILE.rejected.csv: `line,error,` and each rejected row as it was in the file.
    Opened before anything is written (a file that cannot be made stops the load before
    it starts), mode 0600 also when it exists already; removed when nothing is rejected."""

    def __init__(self, source: Path, header: str, result: BulkResult):
        self.path = source.with_name(source.stem + ".rejected.csv")
        self.result = result
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)  # O_CREAT's mode applies to a new file only
        except OSError as exc:
            raise ProvisionError("invalid_file", f"{self.path}: {exc.strerror}") from None
        # surrogateescape writes bytes that were not UTF-8 back as they were
        self.file = open(fd, "w", encoding="utf-8", errors="surrogateescape", newline="")
        self.header = header

    def add(self, record: _Record, error: ProvisionError | RowError) -> None:
        if not isinstance(error, RowError):
            error = RowError(record.line, error.code, str(error))
        if not self.result.errors:
            self.file.write(_fields("line", "error") + _line(self.header))
            self.result.rejected_file = self.path
        self.result.errors.append(error)
        self.file.write(_fields(record.line, f"{error.code}: {error.message}") + _line(record.raw))

    def close(self) -> None:
        self.file.close()
        if not self.result.errors:
            self.path.unlink(missing_ok=True)


def _fields(*values) -> str:
    """Leading CSV fields, each followed by a comma."""
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow([*values, ""])
    return out.getvalue()


def _line(raw: str) -> str:
    return raw if raw.endswith(("\n", "\r")) else raw + "\n"


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
        if len(name) > 100:
            raise NotFound("tenant_not_found", "no such tenant (a tenant name has 1-100 characters)")
        if name not in self.ids:
            try:
                self.ids[name] = tenant_id_of(self.engine, name)
            except ProvisionError as exc:
                if _LONG_DIGITS.search(name):  # a customer's number in the wrong column is not printed
                    raise type(exc)(exc.code, "no tenant of that name (it looks like a phone number)") from None
                raise
        return name, self.ids[name]


def _unexpected(exc: Exception) -> ProvisionError:
    """A row the checks did not foresee, or a database error on its batch: that row (or
    batch) is rejected, with the kind of error, and the load goes on (fail closed: what
    was not committed is not reported done)."""
    if isinstance(exc, ProvisionError):
        return exc
    if isinstance(exc, IntegrityError):
        return Conflict("conflict", "changed concurrently by another writer; load the rejected rows again")
    if isinstance(exc, SQLAlchemyError):
        return ProvisionError("database_error", f"the database could not take it ({type(exc).__name__}); "
                              "load the rejected rows again")
    return ProvisionError("invalid_row", f"the row cannot be read ({type(exc).__name__})")


def import_pool(engine: Engine, path: str | os.PathLike, *, tenant_name: str | None = None, region: str = "CN",
                batch_size: int = 5000, progress: Callable[[int], None] | None = None) -> BulkResult:
    """Add the file's virtual numbers to their tenants' pools (state free)."""
    path = Path(path)
    header, records = _rows(path, POOL_COLUMNS, "number")
    result, tenants = BulkResult(), _Tenants(engine, tenant_name)
    rejects = _Rejects(path, header, result)
    seen: dict[str, int] = {}
    try:
        for batch in _batches(records, batch_size):
            result.rows += len(batch)
            valid = []  # (record, e164, tenant_id)
            for record in batch:
                if record.error:
                    rejects.add(record, record.error)
                    continue
                try:
                    e164 = parse_number(record.values["number"], "virtual number", region)
                    _, tenant_id = tenants.id_of(record.values)
                    if e164 in seen:
                        raise ProvisionError("duplicate_row", f"{e164} is on line {seen[e164]} already")
                except Exception as exc:  # noqa: BLE001 - no input stops the load (see _unexpected)
                    rejects.add(record, _unexpected(exc))
                    continue
                seen[e164] = record.line
                valid.append((record, e164, tenant_id))
            try:
                with engine.begin() as conn:
                    taken = set(conn.scalars(select(VirtualNumber.e164).where(
                        VirtualNumber.e164.in_([e for _, e, _ in valid]))))
                    fresh = [v for v in valid if v[1] not in taken]
                    if fresh:
                        conn.execute(insert(VirtualNumber), [{"e164": e, "tenant_id": t} for _, e, t in fresh])
            except Exception as exc:  # noqa: BLE001 - the batch is not written: its rows are rejected
                for record, _, _ in valid:
                    rejects.add(record, _unexpected(exc))
            else:
                for record, e164, _ in valid:
                    if e164 in taken:
                        rejects.add(record, Conflict("number_exists", f"{e164} is in a pool already"))
                result.done += len(fresh)
            if progress:
                progress(len(batch))
    finally:
        rejects.close()
    return result


@dataclass
class _Batch:
    size: int
    when: datetime
    axn: dict = field(default_factory=dict)  # tenant id -> [(record, tenant name, binding values)]
    made: list = field(default_factory=list)  # rows for the output file
    existing: list = field(default_factory=list)  # rows for the output file: bound by an earlier load
    problems: list = field(default_factory=list)  # (record, error)


def bind_bulk(engine: Engine, path: str | os.PathLike, *, tenant_name: str | None = None, region: str = "CN",
              extension_digits: int = 4, batch_size: int = 5000, now: datetime | None = None,
              out: str | os.PathLike | None = None,
              progress: Callable[[int], None] | None = None) -> BulkResult:
    """Create the file's bindings. AXN rows are bound set-based, a batch at a time (free
    X locked with SKIP LOCKED, one UPDATE, one multi-row INSERT) by a writer thread while
    this one checks the next batch; AXB and AXE rows each need their own conflict check
    on X, so they go through bindings.bind one by one.
    The bindings made go to `out` (default FILE.bound.csv): line, id, X, extension, ..."""
    path = Path(path)
    header, records = _rows(path, BIND_COLUMNS, "customer")
    result, tenants = BulkResult(), _Tenants(engine, tenant_name)
    result.bound_file = Path(out) if out else path.with_name(path.stem + ".bound.csv")
    seen: dict[tuple, int] = {}  # (tenant id, customer, reference) -> line

    def check(batch: list[_Record]) -> _Batch:
        """Validate a batch, set aside what is bound already, bind its AXB/AXE rows;
        the AXN rows wait for the writer."""
        todo = _Batch(size=len(batch), when=now or utcnow())
        wanted = []  # (record, tenant name, binding values)
        for record in batch:
            if record.error:
                todo.problems.append((record, record.error))
                continue
            try:
                row = record.values
                name, tenant_id = tenants.id_of(row)
                mode = (row.get("mode") or "AXN").upper()
                party_a, party_b = binding_parties(mode, row["customer"], row.get("other_party") or None,
                                                  extension_digits, region)
                values = {
                    "tenant_id": tenant_id, "mode": mode, "party_a": party_a, "party_b": party_b, "extension": None,
                    "reference": parse_reference(row.get("reference") or None),
                    "expires_at": expiry_from(_date(row.get("expires_at")), _int(row.get("ttl_seconds")),
                                               todo.when),
                    "status": "active", "created_at": todo.when,
                }
                key = (tenant_id, party_a, values["reference"])
                if key in seen:
                    raise ProvisionError("duplicate_row", f"the same customer and reference as line {seen[key]}")
                seen[key] = record.line
            except Exception as exc:  # noqa: BLE001 - no input stops the load (see _unexpected)
                todo.problems.append((record, _unexpected(exc)))
                continue
            wanted.append((record, name, values))
        try:
            bound = _bound_already(engine, [v for _, _, v in wanted])
        except SQLAlchemyError as exc:
            todo.problems += [(record, _unexpected(exc)) for record, _, _ in wanted]
            return todo
        for record, name, v in wanted:
            found = bound.get((v["tenant_id"], number_hash(v["party_a"]), v["reference"]))
            if found is not None:
                if found.mode == v["mode"] and found.party_b_hash == (v["party_b"] and number_hash(v["party_b"])):
                    todo.existing.append({"line": record.line, "id": found.id, "tenant": name, "x": found.e164,
                                          "extension": found.extension or "", "mode": found.mode,
                                          "reference": found.reference or "", "expires_at": _iso(found.expires_at)})
                else:
                    todo.problems.append((record, ProvisionError(
                        "reference_in_use", f"the customer's active binding {found.id} has this reference with "
                        "another mode or other party; end it first or use another reference")))
            elif v["mode"] == Mode.AXN:
                todo.axn.setdefault(v["tenant_id"], []).append((record, name, v))
            else:
                try:
                    made = bind(engine, name, v["party_a"], mode=v["mode"], other_party=v["party_b"],
                                 reference=v["reference"], expires_at=v["expires_at"], region=region,
                                 extension_digits=extension_digits, now=todo.when)
                except Exception as exc:  # noqa: BLE001 - see _unexpected
                    todo.problems.append((record, _unexpected(exc)))
                    continue
                todo.made.append(_bound_row(record.line, made))
        return todo

    def write(todo: _Batch) -> _Batch:
        """The AXN rows of a batch; never raises: a failed tenant batch rejects its rows."""
        for tenant_id, wanted in todo.axn.items():
            try:
                made, left = _bind_axn_batch(engine, tenant_id, wanted, todo.when)
            except Exception as exc:  # noqa: BLE001 - nothing of it was committed
                made, left = [], [(record, _unexpected(exc)) for record, _, _ in wanted]
            todo.made += made
            todo.problems += left
        return todo

    def report(todo: _Batch) -> None:
        bound.writerows(sorted(todo.made + todo.existing, key=lambda r: r["line"]))
        bound_handle.flush()
        result.rows += todo.size
        result.done += len(todo.made)
        result.existing += len(todo.existing)
        for record, problem in sorted(todo.problems, key=lambda p: p[0].line):
            rejects.add(record, problem)
        if progress:
            progress(todo.size)

    rejects = _Rejects(path, header, result)
    try:
        with open(result.bound_file, "w", newline="") as bound_handle, ThreadPoolExecutor(1) as writer:
            bound = csv.DictWriter(bound_handle, BOUND_COLUMNS)
            bound.writeheader()
            pending = None
            try:
                for batch in _batches(records, batch_size):
                    todo = check(batch)  # overlaps with the writer's work on the previous batch
                    if pending:
                        report(pending.result())
                    pending = writer.submit(write, todo)
            finally:  # what was committed is reported, whatever happened after it
                if pending:
                    report(pending.result())
    except OSError as exc:
        raise ProvisionError("invalid_file", f"{result.bound_file}: {exc.strerror}") from None
    finally:
        rejects.close()
    return result


def _bound_already(engine: Engine, wanted: list[dict]) -> dict:
    """The active bindings of these rows' customers, by (tenant id, customer hash, reference)."""
    if not wanted:
        return {}
    hashes = {number_hash(v["party_a"]) for v in wanted}
    tenants = {v["tenant_id"] for v in wanted}
    with engine.connect() as conn:
        rows = conn.execute(
            select(Binding.id, Binding.tenant_id, Binding.party_a_hash, Binding.party_b_hash, Binding.reference,
                   Binding.mode, Binding.extension, Binding.expires_at, VirtualNumber.e164)
            .join(VirtualNumber, VirtualNumber.id == Binding.number_id)
            .where(Binding.party_a_hash.in_(hashes), Binding.status == "active", Binding.tenant_id.in_(tenants))
        ).all()
    return {(r.tenant_id, r.party_a_hash, r.reference): r for r in rows}


def _bind_axn_batch(engine: Engine, tenant_id: int, wanted: list, now: datetime) -> tuple[list[dict], list]:
    """Bind the AXN rows of one tenant, in one transaction when the pool has room: returns
    the bound rows for the output file and the rows left, with their error.
    Free X are locked with SKIP LOCKED (parallel loads take different X); X that others
    hold are waited for one at a time, in a new transaction holding no other X (as in
    allocation.allocate: no deadlock), so rows are `pool_exhausted` only when no X is left."""
    reusable = or_(VirtualNumber.state == "free",
                   and_(VirtualNumber.state == "quarantined", VirtualNumber.quarantined_until <= now))
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
            numbers += _lock_free(conn, tenant_id, VirtualNumber.state == "free", len(rest) - len(numbers),
                                  [n for n, _ in numbers])
            numbers += _lock_free(conn, tenant_id, reusable & (VirtualNumber.state != "free"),
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
        Binding.number_id.in_([n for n, _ in numbers]), Binding.status == "active")).all())
    return [{"line": record.line, "id": ids[number_id], "tenant": name, "x": x, "extension": "", "mode": "AXN",
             "reference": v["reference"] or "", "expires_at": _iso(v["expires_at"])}
            for (record, name, v), (number_id, x) in zip(taken, numbers)]


def _iso(when: datetime | None) -> str:
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


def _lock_free(conn: Connection, tenant_id: int, condition, count: int, exclude: list[int] = (),
               wait: bool = False) -> list[tuple[int, str]]:
    if count <= 0:
        return []
    query = select(VirtualNumber.id, VirtualNumber.e164).where(VirtualNumber.tenant_id == tenant_id, condition)
    if exclude:
        query = query.where(VirtualNumber.id.not_in(exclude))
    return list(conn.execute(query.order_by(VirtualNumber.id).limit(count).with_for_update(skip_locked=not wait)).all())


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
