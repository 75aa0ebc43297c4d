"""The one parser of moments people type: `--since/--until/--from/--to/--starts/--ends/--expires`."""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from callctl.errors import ProvisionError

_AGE = re.compile(r"(\d+)([smhd])\Z")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
FORMS = "an ISO date-time with zone (2026-11-29T08:00+08:00), a date (2026-11-29, UTC) or an age (15m, 2h, 7d)"


def parse_time(text: str | None, what: str, now: datetime | None = None, *, ahead: bool = False,
               code: str = "invalid_time") -> datetime | None:
    """`text` as a UTC-aware datetime (None stays None). An age counts back from now, or
    forward with `ahead` (an end or an expiry: `--ends 2h`). A date-time needs its zone;
    a bare date is UTC midnight. `what` names the option in the error."""
    if text is None:
        return None
    text = text.strip()
    try:
        if match := _AGE.match(text):
            age = timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
            now = now or datetime.now(timezone.utc)
            return now + age if ahead else now - age
        value = datetime.fromisoformat(text)
        if value.tzinfo is None:
            if len(text) > 10:
                raise ProvisionError(code, f"--{what} must be an ISO date-time with zone: give a time zone,"
                                           " e.g. 2026-11-29T08:00+08:00")
            value = value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)
    except OverflowError:  # 99999999d, or 9999-12-31T23:59-14:00 (the year 10000 in UTC)
        raise ProvisionError(code, f"--{what} is out of range (years 1 to 9999)") from None
    except ValueError:
        raise ProvisionError(code, f"--{what} must be {FORMS}") from None
