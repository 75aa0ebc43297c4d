"""The bounds every input is checked against: the API's schemas (which state them), the
CLI's arguments and the store use the same ones, so no value the database cannot hold
(or the clock cannot reach) gets as far as a query."""
from __future__ import annotations

import unicodedata

MAX_ID = 2 ** 63 - 1  # the largest id SQLite's INTEGER and PostgreSQL's bigint hold
MAX_SECONDS = 100 * 366 * 86400  # a TTL or a duration: at most a century
# Text a person typed: no control characters (PostgreSQL refuses NUL) and no lone
# surrogates (they cannot be stored as UTF-8); tabs and line breaks are text, kept as
# written (a pasted multi-line policy reference). As a JSON Schema pattern too.
PRINTABLE_PATTERN = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]*$"
_WHITESPACE = frozenset("\t\n\r")


def printable(text: str) -> bool:
    return not any(unicodedata.category(ch) in ("Cc", "Cs") and ch not in _WHITESPACE for ch in text)
