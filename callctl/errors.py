"""Errors a person or a program sees: a stable code, a message without real numbers, and
the HTTP status the API answers with. The status belongs to the class, so a new code
raised through the right class cannot fall through to a wrong status (the API has no
table of codes). The CLI prints `callctl: <message> [<code>]` and exits 1 for all of them.
"""
from __future__ import annotations


class ProvisionError(Exception):
    """Bad input: 422. The base of every error below (`except ProvisionError` catches all)."""

    status = 422

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Unauthorized(ProvisionError):
    status = 401


class Forbidden(ProvisionError):
    status = 403


class NotFound(ProvisionError):
    status = 404


class Conflict(ProvisionError):
    """The request is fine but the state does not allow it (exists, ended, taken)."""

    status = 409


class Unavailable(ProvisionError):
    """Busy or down for now: retry."""

    status = 503
