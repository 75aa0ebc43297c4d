"""A local, append-only, fsync'd spool for CDRs the database could not take.

Each line is one CDR as JSON. Replay moves the file aside, writes every row (the
CDR write is idempotent on call_id, so a crash mid-replay only means a harmless
second attempt), then deletes it.
"""
from __future__ import annotations

import json
import os
import threading
from datetime import datetime
from pathlib import Path
from typing import Callable

_TIME_FIELDS = ("started_at", "answered_at", "ended_at")


class CdrSpool:
    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "cdrs.jsonl"
        self.replaying = self.dir / "cdrs.replaying.jsonl"
        self._lock = threading.Lock()

    def append(self, row: dict) -> None:
        line = json.dumps(
            {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()},
            separators=(",", ":"),
        )
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, (line + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)

    def pending(self) -> bool:
        return self.path.exists() or self.replaying.exists()

    def replay(self, write: Callable[[dict], object]) -> int:
        """Write every spooled CDR with `write`; returns how many rows were replayed.

        If `write` raises (database still down) the rows stay spooled for next time.
        """
        with self._lock:
            if not self.replaying.exists():
                if not self.path.exists():
                    return 0
                os.replace(self.path, self.replaying)
        count = 0
        with open(self.replaying, encoding="utf-8") as spooled:
            for line in spooled:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a crash mid-append was never acknowledged
                for key in _TIME_FIELDS:
                    if row.get(key):
                        row[key] = datetime.fromisoformat(row[key])
                write(row)
                count += 1
        os.unlink(self.replaying)
        return count
