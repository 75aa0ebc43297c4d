"""CDRs the dialplan kept on the PBX because no daemon acknowledged the hangup AGI
(daemon restarting or down for the whole end of a call): with the global
CALLCTL_CDR_FALLBACK set, the hangup handler appends one line per such call to that file,
`uniqueid=<id>,` followed by the hangup AGI's own arguments. `callctl cdr import-pbx
FILE` writes them as CDRs.

The file holds real numbers (as Asterisk's own CDRs do): it stays on the PBX, and an
import removes it once every line is in the database.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import structlog

from callctl.asterisk.server import finished_call, keyword_args
from callctl.service import CallService

log = structlog.get_logger("callctl.asterisk")


def import_fallback(service: CallService, path: Path) -> dict[str, int]:
    """Write every CDR kept in `path` (a call already recorded counts as a duplicate)
    and remove the file. It is first renamed to FILE.importing, so lines Asterisk
    appends meanwhile start a new file; an import cut short (database down) leaves
    FILE.importing, which the next import finishes first. Raises SQLAlchemyError when
    the database cannot take them: nothing is lost, run it again."""
    path = Path(path)
    importing = path.with_name(path.name + ".importing")
    counts = {"written": 0, "duplicate": 0, "unreadable": 0}
    for _ in range(2):  # a file cut short earlier first, then the current one
        if not importing.exists():
            try:
                path.rename(importing)
            except FileNotFoundError:
                break
        written_at = _file_time(importing)
        for number, line in enumerate(importing.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            given = keyword_args(line.split(","))
            call_id = given.get("uniqueid", "")
            if not call_id:
                counts["unreadable"] += 1  # the line is not repeated: it holds real numbers
                log.warning("unreadable line in the PBX's CDR file skipped", file=str(importing), line=number)
                continue
            row = service.cdr_row(finished_call(call_id, given), written_at)
            counts["written" if service.store_row(row) else "duplicate"] += 1
        importing.unlink()
    return counts


def _file_time(path: Path) -> datetime:
    """'now' for a kept CDR without an end time: when the PBX last wrote the file."""
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
