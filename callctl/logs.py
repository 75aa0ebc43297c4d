"""Structured logging (structlog), console or JSON, with a last line of defence
against phone numbers: callers log masked numbers only, and any digit run that
still looks like a phone number is masked before it is written."""
from __future__ import annotations

import logging
import re
import sys

import structlog

from callctl.core.numbers import PHONE_LIKE as _PHONE_LIKE, call_identifier, mask

# Keys whose values are ours and not personal: virtual numbers (callers log an X that is
# not ours masked), ids, timings.
_SAFE_KEYS = {"x", "binding", "tenant", "ms", "port", "pid", "count"}
# A PBX's call ids: shown, but short, and with no number in them (call_identifier).
_IDENTIFIERS = {"call_id", "uniqueid"}
_MAX_IDENTIFIER = 64


def _scrub(value):
    if isinstance(value, str):
        return _PHONE_LIKE.sub(lambda m: mask(m.group()) if m.group().startswith("+") else mask("+" + m.group()), value)
    return value


def scrub_numbers(_logger, _name, event_dict):
    for key, value in event_dict.items():
        if key in _IDENTIFIERS and isinstance(value, str):
            event_dict[key] = call_identifier(value, _MAX_IDENTIFIER)
        elif key not in _SAFE_KEYS and key != "timestamp":
            event_dict[key] = _scrub(value)
    return event_dict


def setup(format: str = "console", level: str = "info", stream=sys.stderr) -> None:
    renderer = (
        structlog.processors.JSONRenderer()
        if format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            scrub_numbers,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
