"""The one parser of typed moments (callctl.core.times): every --since/--until/--from/--to/
--starts/--ends/--expires of the CLI goes through it."""
from datetime import datetime, timedelta, timezone

import pytest

from callctl.core.times import parse_time
from callctl.errors import ProvisionError

NOW = datetime(2026, 11, 21, 8, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("text, ahead, expected", [
    ("2h", False, NOW - timedelta(hours=2)),
    ("15m", True, NOW + timedelta(minutes=15)),
    (" 7d ", False, NOW - timedelta(days=7)),
    ("30s", False, NOW - timedelta(seconds=30)),
    ("2026-11-29", False, datetime(2026, 11, 29, tzinfo=timezone.utc)),
    ("2026-11-29T08:00+08:00", True, datetime(2026, 11, 29, 0, 0, tzinfo=timezone.utc)),
    (None, False, None),
])
def test_forms(text, ahead, expected):
    assert parse_time(text, "since", NOW, ahead=ahead) == expected


@pytest.mark.parametrize("text, message", [
    ("yesterday", "--ends must be an ISO date-time with zone"),
    ("2h ago", "--ends must be an ISO date-time with zone"),
    ("2026-11-29T08:00", "give a time zone"),
])
def test_refusals_name_the_option_and_carry_the_code(text, message):
    with pytest.raises(ProvisionError) as refused:
        parse_time(text, "ends", NOW, code="invalid_block")
    assert message in str(refused.value) and refused.value.code == "invalid_block"
