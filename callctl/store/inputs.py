"""Provisioning inputs, checked once: numbers, caller prefixes, calling hours, time zones,
limits, references, expiries, purposes, profiles, a new binding's parties.

Every error is a ProvisionError with a stable code and a message that never repeats a
real number. Used by tenants, pool, bindings, bulk, blocks, blacklist and customers.
"""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from callctl.core.bounds import MAX_SECONDS, printable
from callctl.core.decision import Mode, Profile, Purpose, known_zone
from callctl.core.numbers import InvalidNumber, to_e164
from callctl.errors import ProvisionError

MODES = tuple(m.value for m in Mode)
PURPOSES = tuple(p.value for p in Purpose)
PROFILES = tuple(p.value for p in Profile)  # protection profiles (conf/anomaly.yaml: profiles)


def parse_number(raw: str, what: str, region: str) -> str:
    try:
        return to_e164(raw, region)
    except InvalidNumber as exc:
        raise ProvisionError("invalid_number", f"{what}: {exc}") from None


def parse_prefix(raw: str) -> str:
    text = raw.strip()
    if not (text.startswith("+") and text[1:].isdigit() and 2 <= len(text) <= 16):
        raise ProvisionError("invalid_prefix", "caller prefix must be '+' and 1-15 digits")
    return text


# ASCII digits only: \d would take other scripts' digits, which no time parser reads back.
_HOURS = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-(([01]\d|2[0-3]):[0-5]\d|24:00)$", re.ASCII)


def parse_hours(text: str) -> tuple[str, str]:
    """'08:00-21:00' -> ('08:00', '21:00'). An end before the start crosses midnight
    ('22:00-06:00'); equal ends, or '00:00-24:00', mean all day."""
    if not _HOURS.match((text or "").strip()):
        raise ProvisionError("invalid_hours", "calling hours must be HH:MM-HH:MM, e.g. 08:00-21:00")
    start, end = text.strip().split("-")
    return start, "00:00" if end == "24:00" else end


def parse_zone(name: str) -> str:
    if not known_zone(name):
        raise ProvisionError("invalid_time_zone", "unknown time zone; use an IANA name, e.g. Asia/Shanghai")
    return name


def check_limits(ring_timeout: int | None, max_call_seconds: int | None) -> None:
    if ring_timeout is not None and not 1 <= ring_timeout <= 300:
        raise ProvisionError("invalid_limit", "ring timeout must be 1-300 seconds")
    if max_call_seconds is not None and not 1 <= max_call_seconds <= 86400:
        raise ProvisionError("invalid_limit", "maximum call duration must be 1-86400 seconds")


def parse_reference(reference: str | None) -> str | None:
    if reference is not None and len(reference) > 100:
        raise ProvisionError("invalid_reference", "reference must be at most 100 characters")
    if reference is not None and not printable(reference):
        raise ProvisionError("invalid_reference", "reference must be printable text (no control characters)")
    return reference


def parse_purpose(value: str) -> str:
    if value not in PURPOSES:
        raise ProvisionError("invalid_purpose", f"purpose must be one of {', '.join(PURPOSES)}")
    return value


def parse_purposes(purposes: list[str] | None) -> str | None:
    """The stored form of the purposes a customer accepts; None keeps the default."""
    if purposes is None:
        return None
    return ",".join(sorted({parse_purpose(p.strip()) for p in purposes}))


def parse_profile(profile: str | None) -> str | None:
    if profile is not None and profile not in PROFILES:
        raise ProvisionError("invalid_profile", f"profile must be one of {', '.join(PROFILES)}")
    return profile


def expiry_from(expires_at: datetime | None, ttl_seconds: int | None, now: datetime) -> datetime | None:
    """A binding's expiry from a date (long-term) or a TTL (temporary); None never expires."""
    if expires_at is not None and ttl_seconds is not None:
        raise ProvisionError("invalid_expiry", "give an expiry date or a TTL, not both")
    if ttl_seconds is not None:
        if not 0 < ttl_seconds <= MAX_SECONDS:
            raise ProvisionError("invalid_expiry", f"TTL must be 1 to {MAX_SECONDS} seconds")
        expires_at = now + timedelta(seconds=ttl_seconds)
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise ProvisionError("invalid_expiry", "expiry needs a time zone, e.g. 2027-01-01T00:00:00+08:00")
        try:
            expires_at = expires_at.astimezone(timezone.utc)  # shown as stored: UTC
        except OverflowError:  # e.g. 9999-12-31T23:59:59-14:00 is in the year 10000
            raise ProvisionError("invalid_expiry", "expiry is out of range") from None
        if expires_at <= now:
            raise ProvisionError("invalid_expiry", "expiry is in the past")
    return expires_at


def binding_parties(mode: str, customer: str, other_party: str | None, extension_digits: int,
                    region: str) -> tuple[str, str | None]:
    """The (party A, party B) of a new binding, validated for its mode."""
    if mode not in MODES:
        raise ProvisionError("invalid_mode", f"mode must be one of {', '.join(MODES)}")
    if not 1 <= extension_digits <= 6:
        raise ProvisionError("invalid_extension_digits", "an extension has 1-6 digits")
    party_a = parse_number(customer, "customer", region)
    if mode != Mode.AXB:
        if other_party is not None:
            raise ProvisionError("invalid_party", f"only AXB bindings have an other party, not {mode}")
        return party_a, None
    if other_party is None:
        raise ProvisionError("missing_other_party", "an AXB binding needs the other party's number")
    party_b = parse_number(other_party, "other party", region)
    if party_b == party_a:
        raise ProvisionError("invalid_party", "the two parties of an AXB binding must differ")
    return party_a, party_b
