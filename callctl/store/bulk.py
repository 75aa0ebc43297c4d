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
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

from sqlalchemy import insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from callctl.core.enums import BindingStatus
from callctl.core.decision import Mode
from callctl.errors import Conflict, NotFound, ProvisionError
from callctl.store.bindings import bind
from callctl.store.bulk_axn import bind_axn_batch, iso
from callctl.store.bulk_csv import BulkResult, Record, Rejects, batches, read_rows
from callctl.store.crypto import number_hash
from callctl.store.inputs import binding_parties, expiry_from, parse_number, parse_reference
from callctl.store.models import Binding, VirtualNumber, utcnow
from callctl.store.tenants import tenant_id_of

POOL_COLUMNS = ("number", "tenant")
BIND_COLUMNS = ("customer", "tenant", "mode", "other_party", "reference", "expires_at", "ttl_seconds")
# No customer column: the line number ties a binding to its input row.
BOUND_COLUMNS = ("line", "id", "tenant", "x", "extension", "mode", "reference", "expires_at")
_LONG_DIGITS = re.compile(r"\d{5}")


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
    header, records = read_rows(path, POOL_COLUMNS, "number")
    result, tenants = BulkResult(), _Tenants(engine, tenant_name)
    rejects = Rejects(path, header, result)
    seen: dict[str, int] = {}
    try:
        for batch in batches(records, batch_size):
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
    header, records = read_rows(path, BIND_COLUMNS, "customer")
    result = BulkResult()
    result.bound_file = Path(out) if out else path.with_name(path.stem + ".bound.csv")
    check = _BindCheck(engine, _Tenants(engine, tenant_name), region, extension_digits, now)
    rejects = Rejects(path, header, result)
    try:
        with open(result.bound_file, "w", newline="") as bound_handle, ThreadPoolExecutor(1) as writer:
            bound = csv.DictWriter(bound_handle, BOUND_COLUMNS)
            bound.writeheader()

            def report(todo: _Batch) -> None:
                _report(todo, bound, bound_handle, result, rejects, progress)

            pending = None
            try:
                for batch in batches(records, batch_size):
                    todo = check(batch)  # overlaps with the writer's work on the previous batch
                    if pending:
                        report(pending.result())
                    pending = writer.submit(_write_axn, engine, todo)
            finally:  # what was committed is reported, whatever happened after it
                if pending:
                    report(pending.result())
    except OSError as exc:
        raise ProvisionError("invalid_file", f"{result.bound_file}: {exc.strerror}") from None
    finally:
        rejects.close()
    return result


@dataclass
class _BindCheck:
    """Checks the batches of a bind file: sets aside what is bound already, binds the
    AXB/AXE rows; the AXN rows wait for the writer (_write_axn)."""
    engine: Engine
    tenants: _Tenants
    region: str
    extension_digits: int
    now: datetime | None
    seen: dict = field(default_factory=dict)  # (tenant id, customer, reference) -> line

    def __call__(self, batch: list[Record]) -> _Batch:
        todo = _Batch(size=len(batch), when=self.now or utcnow())
        wanted = []  # (record, tenant name, binding values)
        for record in batch:
            if record.error:
                todo.problems.append((record, record.error))
                continue
            try:
                name, values = self.values(record, todo.when)
            except Exception as exc:  # noqa: BLE001 - no input stops the load (see _unexpected)
                todo.problems.append((record, _unexpected(exc)))
                continue
            wanted.append((record, name, values))
        try:
            bound = _bound_already(self.engine, [v for _, _, v in wanted])
        except SQLAlchemyError as exc:
            todo.problems += [(record, _unexpected(exc)) for record, _, _ in wanted]
            return todo
        for record, name, v in wanted:
            found = bound.get((v["tenant_id"], number_hash(v["party_a"]), v["reference"]))
            self.sort_out(todo, record, name, v, found)
        return todo

    def values(self, record: Record, when: datetime) -> tuple[str, dict]:
        """The tenant name and the new binding's column values of a row."""
        row = record.values
        name, tenant_id = self.tenants.id_of(row)
        mode = (row.get("mode") or "AXN").upper()
        party_a, party_b = binding_parties(mode, row["customer"], row.get("other_party") or None,
                                           self.extension_digits, self.region)
        values = {
            "tenant_id": tenant_id, "mode": mode, "party_a": party_a, "party_b": party_b, "extension": None,
            "reference": parse_reference(row.get("reference") or None),
            "expires_at": expiry_from(_date(row.get("expires_at")), _int(row.get("ttl_seconds")), when),
            "status": "active", "created_at": when,
        }
        key = (tenant_id, party_a, values["reference"])
        if key in self.seen:
            raise ProvisionError("duplicate_row", f"the same customer and reference as line {self.seen[key]}")
        self.seen[key] = record.line
        return name, values

    def sort_out(self, todo: _Batch, record: Record, name: str, v: dict, found) -> None:
        """A checked row: bound already (the same binding, or a reference in use), an AXN
        row for the writer, or an AXB/AXE row bound now."""
        if found is not None:
            if found.mode == v["mode"] and found.party_b_hash == (v["party_b"] and number_hash(v["party_b"])):
                todo.existing.append({"line": record.line, "id": found.id, "tenant": name, "x": found.e164,
                                      "extension": found.extension or "", "mode": found.mode,
                                      "reference": found.reference or "", "expires_at": iso(found.expires_at)})
            else:
                todo.problems.append((record, ProvisionError(
                    "reference_in_use", f"the customer's active binding {found.id} has this reference with "
                    "another mode or other party; end it first or use another reference")))
        elif v["mode"] == Mode.AXN:
            todo.axn.setdefault(v["tenant_id"], []).append((record, name, v))
        else:
            try:
                made = bind(self.engine, name, v["party_a"], mode=v["mode"], other_party=v["party_b"],
                            reference=v["reference"], expires_at=v["expires_at"], region=self.region,
                            extension_digits=self.extension_digits, now=todo.when)
            except Exception as exc:  # noqa: BLE001 - see _unexpected
                todo.problems.append((record, _unexpected(exc)))
                return
            todo.made.append(_bound_row(record.line, made))


def _write_axn(engine: Engine, todo: _Batch) -> _Batch:
    """The AXN rows of a batch; never raises: a failed tenant batch rejects its rows."""
    for tenant_id, wanted in todo.axn.items():
        try:
            made, left = bind_axn_batch(engine, tenant_id, wanted, todo.when)
        except Exception as exc:  # noqa: BLE001 - nothing of it was committed
            made, left = [], [(record, _unexpected(exc)) for record, _, _ in wanted]
        todo.made += made
        todo.problems += left
    return todo


def _report(todo: _Batch, bound: csv.DictWriter, bound_handle, result: BulkResult, rejects: Rejects,
            progress: Callable[[int], None] | None) -> None:
    """A batch done: its bindings to the output file (flushed: committed is on disk), its
    counts, its rejected rows."""
    bound.writerows(sorted(todo.made + todo.existing, key=lambda r: r["line"]))
    bound_handle.flush()
    result.rows += todo.size
    result.done += len(todo.made)
    result.existing += len(todo.existing)
    for record, problem in sorted(todo.problems, key=lambda p: p[0].line):
        rejects.add(record, problem)
    if progress:
        progress(todo.size)


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
            .where(Binding.party_a_hash.in_(hashes), Binding.status == BindingStatus.ACTIVE, Binding.tenant_id.in_(tenants))
        ).all()
    return {(r.tenant_id, r.party_a_hash, r.reference): r for r in rows}


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
