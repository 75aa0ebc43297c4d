"""Finished calls as Asterisk's hangup AGI reports them (strings, docs/agi.md section 2),
parsed by the Asterisk backend: tests name the fields as FinishedCall does."""
from callctl.asterisk.server import finished_call

_ARG = {"destination": "dest", "dial_status": "dialstatus", "dialed_ms": "dialedtime",
        "answered_ms": "answeredtime", "hangup_cause": "hangupcause"}


def agi_call(call_id: str, **fields: str):
    return finished_call(call_id, {_ARG.get(name, name): value for name, value in fields.items()})
