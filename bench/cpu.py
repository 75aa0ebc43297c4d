"""CPU seconds of processes from /proc, for the benches' CPU-per-call and per-bind figures."""
from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import text


def process_cpu_s(stat: str) -> tuple[str, float]:
    """A /proc/PID/stat line as (command name, CPU seconds used: user + system, all threads)."""
    head, _, rest = stat.rpartition(")")
    fields = rest.split()
    return head.partition(" (")[2], (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    return process_cpu_s(Path(f"/proc/{pid}/stat").read_text())[1]


def alive_cpu(pids) -> dict[int, float]:
    """CPU seconds of each of `pids` still running."""
    seconds = {}
    for pid in pids:
        try:
            seconds[pid] = cpu_seconds(pid)
        except OSError:  # gone since
            pass
    return seconds


def backend_cpu_seconds(engine, application: str) -> dict[int, float]:
    """CPU of each PostgreSQL backend serving one client program (its application_name)."""
    with engine.connect() as db:
        pids = db.execute(text("SELECT pid FROM pg_stat_activity WHERE application_name = :a"),
                          {"a": application}).scalars().all()
    return alive_cpu(pids)


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two readings: a process started in between counts from
    zero; one that ended is lost (rare: the servers keep their connections)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())
