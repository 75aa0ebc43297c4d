"""The registry of real phone numbers the test suite uses, for the suite-wide leak check
(tests/leaks.py, run when the session finishes).

Two kinds:
- people (customers, other parties, unknown callers): may appear in no log line, CDR,
  CLI output, API response or export outside an audited reveal;
- tenant lines (a tenant's own hotline and agent numbers): shown to that tenant's
  administrators in its own configuration (tenant views), nowhere else.

Test modules register the numbers they build at run time (`person(...)`,
`tenant_line(...)`). Every phone-number literal in a test module's source is registered
as a person unless it is a tenant line or a virtual number of a test pool (X is ours and
public: it is what callers dial), so nothing a test writes down can slip past the check.
"""
from __future__ import annotations

import re
from pathlib import Path

import phonenumbers

PEOPLE: set[str] = set()
TENANT_LINES: set[str] = set()
# Test pools take virtual numbers from these ranges; they are not anybody's number.
VIRTUAL_PREFIXES = ("+86171", "+86172", "+86571")

# "+8613800000001" or "13800000001" (a Chinese mobile written nationally) in quotes.
_LITERAL = re.compile(r"""["'](\+\d{9,15}|1[3-9]\d{9})["']""")


def _register(target: set[str], numbers: tuple[str, ...]):
    for number in numbers:
        if not number.startswith("+"):
            raise ValueError("register numbers in E.164 form (+86...)")
        target.add(number)
    return numbers[0] if len(numbers) == 1 else numbers


def person(*numbers: str):
    """Register people's numbers; returns them (one, or a tuple) for assignment."""
    return _register(PEOPLE, numbers)


def tenant_line(*numbers: str):
    """Register a tenant's own hotline / agent numbers; returns them."""
    return _register(TENANT_LINES, numbers)


def is_virtual(number: str) -> bool:
    return number.startswith(VIRTUAL_PREFIXES)


def literals(source: str) -> set[str]:
    """Phone-number literals in a Python source, in E.164."""
    found = set()
    for text in _LITERAL.findall(source):
        number = text if text.startswith("+") else "+86" + text
        try:
            if phonenumbers.is_possible_number(phonenumbers.parse(number, None)):
                found.add(number)
        except phonenumbers.NumberParseException:
            continue
    return found


def register_sources(test_dir: Path) -> None:
    """Register every phone-number literal of the test modules (people by default)."""
    for path in sorted(Path(test_dir).glob("*.py")):
        for number in literals(path.read_text(errors="replace")):
            if not is_virtual(number) and number not in TENANT_LINES:
                PEOPLE.add(number)
