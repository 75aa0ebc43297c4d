"""Phone numbers: E.164 normalisation (via phonenumbers) and masking.

Real numbers leave this process only towards the PBX (as a dial destination) and
through an audited reveal; everywhere else they are shown with `mask`.
"""
from __future__ import annotations

import re
from functools import lru_cache

import phonenumbers


class InvalidNumber(ValueError):
    """A phone number that cannot be understood. The message never repeats it."""


def to_e164(raw: str, region: str = "CN", *, strict: bool = True) -> str:
    """Return `raw` as E.164 ("+8613812345678").

    National forms are read in `region`; "00"-prefixed international forms work too.
    strict=True (provisioning) also demands a number that is valid for its country;
    call time uses strict=False, since carriers send what they send.
    """
    text = (raw or "").strip()
    if text.startswith("00"):
        text = "+" + text[2:]
    try:
        parsed = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        raise InvalidNumber("not a phone number") from None
    if strict and not phonenumbers.is_valid_number(parsed):
        raise InvalidNumber("not a valid phone number for its country")
    if not strict and not phonenumbers.is_possible_number(parsed):
        raise InvalidNumber("not a possible phone number")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def caller_e164(raw: str | None, region: str = "CN") -> str | None:
    """A caller id as E.164, or None when withheld, anonymous or unreadable."""
    if not raw or not any(ch.isdigit() for ch in raw):
        return None
    return _call_time_e164(raw, region)


# Parsing is the costliest step of a call in Python, and numbers come back: a call's
# numbers again when it ends (its CDR), agents and regular callers on every call.
@lru_cache(maxsize=16384)
def _call_time_e164(raw: str, region: str) -> str | None:
    try:
        return to_e164(raw, region, strict=False)
    except InvalidNumber:
        return None


def mask(number: str | None) -> str:
    """Mask an E.164 number for people: +8613812345678 -> +86138****5678.

    Keeps the country code, the first three national digits and the last four;
    short numbers keep only their last two digits.
    """
    if not number:
        return ""
    if not number.startswith("+"):
        digits = "".join(ch for ch in number if ch.isdigit())
        return "*" * max(len(digits) - 2, 0) + digits[-2:] if digits else "?"
    country = _country_code(number[1:])
    national = number[1 + len(country):]
    if len(national) >= 9:
        shown = national[:3] + "*" * (len(national) - 7) + national[-4:]
    else:
        shown = "*" * max(len(national) - 2, 0) + national[-2:]
    return f"+{country}{shown}"


def _country_code(digits: str) -> str:
    """The country calling code that `digits` (E.164 without '+') starts with, or ''.
    Codes are prefix-free, 1 to 3 digits: the first known prefix is the one."""
    for length in (1, 2, 3):
        code = digits[:length]
        if code.isdigit() and code[0] != "0" and int(code) in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            return code
    return ""


# Digit runs a log line or a stored call id must not show as they are (logs.py masks the
# same runs in every other logged value).
PHONE_LIKE = re.compile(r"\+?\d{7,15}")
# Asterisk's uniqueid ends in the channel's creation time and a sequence number
# ("lab-1795887084.12"); FreeSWITCH's is a UUID. Neither holds a phone number.
_UNIQUEID_TAIL = re.compile(r"\d{9,11}\.\d{1,12}\Z")
_UUID = re.compile(r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}\Z")


def call_identifier(value: str, limit: int) -> str:
    """A call id or node name from a PBX as it may be stored or logged: at most `limit`
    characters (the end kept: it tells calls apart), printable ASCII only, and any digit
    run that could be a phone number masked, except an Asterisk uniqueid's time and
    sequence. The same input always gives the same output (a call's CDR key)."""
    if _UUID.match(value):
        return value
    tail = _UNIQUEID_TAIL.search(value)
    head, tail = (value[:tail.start()], tail.group()) if tail else (value, "")
    head = "".join(ch if ch.isascii() and ch.isprintable() else "?" for ch in head[-2 * limit:])
    head = PHONE_LIKE.sub(lambda m: mask(m.group() if m.group().startswith("+") else "+" + m.group()), head)
    return (head + tail)[-limit:]
