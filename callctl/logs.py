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


def scrub(text: str) -> str:
    """Any digit run that looks like a phone number, masked."""
    return _scrub(text)


def scrub_numbers(_logger, _name, event_dict):
    for key, value in event_dict.items():
        if key in _IDENTIFIERS and isinstance(value, str):
            event_dict[key] = call_identifier(value, _MAX_IDENTIFIER)
        elif key not in _SAFE_KEYS and key != "timestamp":
            event_dict[key] = _scrub(value)
    return event_dict


# The processor chain and level in force. Loggers cache their chain on first use, so a
# reload (SIGHUP) changes these in place rather than configuring anew.
_PROCESSORS: list = []
_LEVEL = [logging.INFO]
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "warn": logging.WARNING,
           "error": logging.ERROR, "exception": logging.ERROR, "critical": logging.CRITICAL}


def _by_level(_logger, method_name, event_dict):
    if _LEVELS.get(method_name, logging.INFO) < _LEVEL[0]:
        raise structlog.DropEvent
    return event_dict


def setup(format: str = "console", level: str = "info", stream=sys.stderr) -> None:
    renderer = (
        structlog.processors.JSONRenderer()
        if format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    _LEVEL[0] = getattr(logging, level.upper())
    _PROCESSORS[:] = [
        _by_level,
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        scrub_numbers,
        renderer,
    ]
    structlog.configure(
        processors=_PROCESSORS,
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
