"""A local, append-only, fsync'd spool for CDRs the database could not take.

Each line is one CDR as JSON. `append` returns only once the line is on disk (file
fsync'd, and the directory too when the file was new), so a CDR acknowledged to the
PBX survives a SIGKILL or a power cut. Replay moves the file aside, writes every row
(the CDR write is idempotent, so a crash mid-replay only means a harmless second
attempt), then deletes it.

Crash cases, and why nothing acknowledged is lost:
- killed between write and fsync: the CDR was not acknowledged; the line may or may
  not be on disk, and if it is, replay writes it (at most once, by idempotence);
- a torn last line (killed mid-write, disk full): the next append starts a new line
  first, so a torn line never swallows an acknowledged one; replay sets unreadable
  lines aside in `cdrs.unreadable.jsonl` for a person, it never drops them silently;
- killed mid-replay: `cdrs.replaying.jsonl` is still there and is replayed again at
  the next start;
- appends during a replay go to a fresh `cdrs.jsonl` (the rename happens under the
  lock), so they are neither lost nor replayed twice.
Several processes may share one spool directory: an flock guards appends and the
rename, and only one process replays at a time.
"""
from __future__ import annotations

import fcntl
import json
import os
import threading
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable

import structlog

log = structlog.get_logger("callctl.spool")
_TIME_FIELDS = ("started_at", "answered_at", "ended_at")


class SpoolError(OSError):
    """The spool cannot hold a CDR (directory not writable, disk full)."""


class CdrSpool:
    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"spool directory {self.dir}: {exc.strerror}") from None
        self.path = self.dir / "cdrs.jsonl"
        self.replaying = self.dir / "cdrs.replaying.jsonl"
        self.unreadable = self.dir / "cdrs.unreadable.jsonl"
        self._lock = threading.Lock()
        self._replay_lock = threading.Lock()

    def check_writable(self) -> None:
        """Fail at start, not at the first outage, when the spool cannot be written."""
        try:
            with self._locked():
                pass
        except OSError as exc:
            raise SpoolError(f"spool directory {self.dir} is not writable: {exc.strerror}") from None

    @contextmanager
    def _locked(self, name: str = ".lock", blocking: bool = True):
        """This thread and this process alone (flock works across processes, not threads)."""
        thread_lock = self._lock if name == ".lock" else self._replay_lock
        if not thread_lock.acquire(blocking):
            yield False
            return
        try:
            fd = os.open(self.dir / name, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                except BlockingIOError:
                    yield False
                    return
                yield True
            finally:
                os.close(fd)  # releases the flock
        finally:
            thread_lock.release()

    def append(self, row: dict) -> None:
        """Put one CDR on disk; returns only when it is durable. Raises SpoolError if not."""
        line = encode(row) + b"\n"
        try:
            with self._locked():
                self._append_durably(self.path, line)
        except OSError as exc:
            raise SpoolError(f"cannot spool CDR in {self.dir}: {exc.strerror or exc}") from None

    def _append_durably(self, path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # end a torn line first; it must not swallow this one
            if os.write(fd, data) != len(data):
                raise OSError("short write (disk full?)")
            os.fsync(fd)
        finally:
            os.close(fd)
        if size == 0:  # (possibly) a new file: its directory entry must be durable too
            _fsync_dir(self.dir)

    def depth(self) -> int:
        """CDRs waiting (lines in the spool and in a replay under way): for metrics."""
        count = 0
        for path in (self.path, self.replaying):
            try:
                with open(path, "rb") as spooled:
                    count += sum(chunk.count(b"\n") for chunk in iter(lambda: spooled.read(1 << 16), b""))
            except FileNotFoundError:
                pass
        return count

    def pending(self) -> bool:
        return self.path.exists() or self.replaying.exists()

    def replay(self, write: Callable[[list[dict]], object], batch: int = 200) -> int:
        """Hand every spooled CDR to `write` (in batches); returns how many were replayed.

        If `write` raises (database still down) the rows stay spooled for next time.
        Returns 0 at once when another thread or process is replaying.
        """
        with self._locked(".replay.lock", blocking=False) as mine:
            if not mine:
                return 0
            with self._locked():
                if not self.replaying.exists():
                    if not self.path.exists():
                        return 0
                    os.replace(self.path, self.replaying)
                    _fsync_dir(self.dir)
            count = 0
            for rows in _batches(self._rows(), batch):
                write(rows)
                count += len(rows)
            os.unlink(self.replaying)
            _fsync_dir(self.dir)
            return count

    def _rows(self) -> Iterable[dict]:
        with open(self.replaying, "rb") as spooled:
            for raw in spooled:
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                    for key in _TIME_FIELDS:
                        if row.get(key):
                            row[key] = datetime.fromisoformat(row[key])
                    if not isinstance(row.get("call_id"), str):
                        raise ValueError("no call id")
                except ValueError:
                    self.set_aside(raw)
                    continue
                yield row

    def set_aside(self, raw: bytes) -> None:
        """Keep a line replay cannot use (torn, or refused by the database) for a person."""
        with self._locked():
            self._append_durably(self.unreadable, raw.rstrip(b"\n") + b"\n")
        log.error("spooled CDR set aside for a person", file=str(self.unreadable), bytes=len(raw))


def encode(row: dict) -> bytes:
    """One CDR as a spool line (without the newline)."""
    return json.dumps(
        {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()},
        separators=(",", ":"),
    ).encode()


def _batches(rows: Iterable[dict], size: int) -> Iterable[list[dict]]:
    chunk: list[dict] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
