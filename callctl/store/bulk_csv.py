"""CSV input of the bulk loads (store/bulk.py): the file read as a stream of records
(each line decoded on its own, the header checked first), the rejected-rows file, and
the counts of a load."""
from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from callctl.errors import ProvisionError

IGNORED_COLUMNS = ("line", "error")  # the rejected file's own columns: it loads again as it is
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
class Record:
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


def _read(lines: _Lines, reader) -> Record | None:
    """The next record (values as a list), or None at the end of the file."""
    lines.taken = []
    start = lines.count + 1
    try:
        values = next(reader)
    except StopIteration:
        return None
    except csv.Error as exc:  # e.g. a field over csv.field_size_limit(): that row only
        return Record(start, "".join(lines.taken), error=RowError(start, "invalid_row", f"not CSV text: {exc}"))
    raw = "".join(lines.taken)
    if _NOT_UTF8.search(raw):
        return Record(start, raw, error=RowError(start, "invalid_text", "not UTF-8 text (a byte that is not)"))
    if "\0" in raw:
        return Record(start, raw, error=RowError(start, "invalid_text", "a NUL character"))
    return Record(start, raw, values=values)


def read_rows(path: Path, known: tuple[str, ...], required: str) -> tuple[str, Iterator[Record]]:
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


class Rejects:
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

    def add(self, record: Record, error: ProvisionError | RowError) -> None:
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


def batches(rows: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in rows:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
