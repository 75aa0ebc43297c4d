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
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

from sqlalchemy import and_, insert, or_, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

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
    X locked with SKIP LOCKED, one UPDATE, one multi-row INSERT); AXB and AXE rows each
    need their own conflict check on X, so they go through provision.bind one by one.
    The bindings made go to `out` (default FILE.bound.csv): line, id, X, extension, ..."""
    path = Path(path)
    header, rows = _rows(path, BIND_COLUMNS, "customer")
    result, rejects, tenants = BulkResult(), _Rejects(path, header), _Tenants(engine, tenant_name)
    result.bound_file = Path(out) if out else path.with_name(path.stem + ".bound.csv")
    with open(result.bound_file, "w", newline="") as bound_handle:
        bound = csv.DictWriter(bound_handle, BOUND_COLUMNS)
        bound.writeheader()
        try:
            for batch in _batches(rows, batch_size):
                when = now or utcnow()
                axn: dict[int, list] = {}  # tenant id -> [(line, raw, name, binding values)]
                made_rows, problems = [], []  # written in line order once the batch is done
                for line, raw in batch:
                    result.rows += 1
                    if isinstance(raw, RowError):
                        problems.append((line, {}, raw))
                        continue
                    try:
                        name, tenant_id = tenants.id_of(raw)
                        mode = (raw.get("mode") or "AXN").upper()
                        if mode != Mode.AXN:
                            made = provision.bind(
                                engine, name, raw["customer"], mode=mode, other_party=raw.get("other_party") or None,
                                reference=raw.get("reference") or None, expires_at=_date(raw.get("expires_at")),
                                ttl_seconds=_int(raw.get("ttl_seconds")), region=region,
                                extension_digits=extension_digits, now=when)
                            made_rows.append(_bound_row(line, made))
                            continue
                        party_a, _ = provision._binding_input(mode, raw["customer"], raw.get("other_party") or None,
                                                              extension_digits, region)
                        values = {
                            "tenant_id": tenant_id, "mode": mode, "party_a": party_a, "party_b": None,
                            "extension": None, "reference": provision._reference(raw.get("reference") or None),
                            "expires_at": provision._expiry_from(_date(raw.get("expires_at")),
                                                                 _int(raw.get("ttl_seconds")), when),
                            "status": "active", "created_at": when,
                        }
                    except ProvisionError as exc:
                        problems.append((line, raw, exc))
                        continue
                    axn.setdefault(tenant_id, []).append((line, raw, name, values))
                for tenant_id, wanted in axn.items():
                    made, exhausted = _bind_axn_batch(engine, tenant_id, wanted, when)
                    made_rows += made
                    problems += [(line, raw, ProvisionError("pool_exhausted", "no free virtual number left in the pool"))
                                 for line, raw, *_ in exhausted]
                bound.writerows(sorted(made_rows, key=lambda r: r["line"]))
                result.done += len(made_rows)
                for line, raw, problem in sorted(problems, key=lambda p: p[0]):
                    rejects.add(line, raw, problem, result)
                if progress:
                    progress(len(batch))
        finally:
            rejects.close()
    return result


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
