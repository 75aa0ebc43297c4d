"""CDRs FreeSWITCH kept because no daemon took them (daemon down or gone for the end of a
call): the dialplan's api_reporting_hook stores every call's CDR in mod_db (realm
callctl_cdr, key = the call's uuid, one `|`-separated line, dialplan/freeswitch/
callctl.xml); the daemon deletes it once it has committed or spooled the CDR. `callctl
cdr import-pbx --pbx freeswitch` writes what is left, over the inbound event socket,
and deletes each one once it is in the database.

The rows hold real numbers (as FreeSWITCH's own CDRs do) and stay on the PBX.
"""
from __future__ import annotations

from urllib.parse import unquote

import gevent.socket
import structlog

from callctl.freeswitch.esl import EslError, EslProtocolError, EslSession
from callctl.freeswitch.server import KEPT_REALM, finished_call
from callctl.service import CallService

log = structlog.get_logger("callctl.freeswitch")

# The kept line's fields after its version, as CHANNEL_HANGUP_COMPLETE names them.
# Version 2 adds who hung up and the purpose (before the caller); lines kept before it
# are version 1.
_FIELDS_1 = ("variable_start_uepoch", "variable_end_uepoch", "variable_bridge_uepoch",
             "variable_hangup_cause_q850", "variable_DIALSTATUS", "variable_callctl_action",
             "variable_callctl_reason", "variable_callctl_binding", "variable_callctl_tenant",
             "variable_callctl_direction", "variable_callctl_called", "variable_callctl_dest",
             "FreeSWITCH-Switchname", "variable_callctl_caller")
_FIELDS = {"1": _FIELDS_1,
           "2": (*_FIELDS_1[:-1], "variable_sip_hangup_disposition", "variable_last_bridge_hangup_cause",
                 "variable_callctl_purpose", "variable_callctl_caller")}


def kept_headers(call_id: str, line: str) -> dict[str, str] | None:
    """A kept line as the headers finished_call() reads; None if it is not one."""
    fields = line.strip().split("|")
    names = _FIELDS.get(fields[0], ())
    if len(fields) != len(names) + 1:
        return None
    headers = dict(zip(names, fields[1:]))
    headers["variable_callctl_caller"] = unquote(headers["variable_callctl_caller"])
    headers["Unique-ID"] = call_id
    return headers


def inbound(address: str, password: str, timeout: float = 5.0) -> EslSession:
    """An authenticated inbound event socket session."""
    host, _, port = address.rpartition(":")
    esl = EslSession(gevent.socket.create_connection((host, int(port)), timeout=timeout), timeout=timeout)
    with gevent.Timeout(timeout, EslProtocolError("no auth/request")):
        if esl.read_message().content_type != "auth/request":
            raise EslProtocolError("no auth/request")
    if not esl.command(f"auth {password}").ok:
        raise EslError("the event socket refused the password")
    return esl


def import_kept(service: CallService, esl: EslSession) -> dict[str, int]:
    """Write every CDR FreeSWITCH keeps and delete it there once stored (a call already
    recorded counts as a duplicate). Raises SQLAlchemyError when the database cannot
    take them: what is not written stays on the PBX, run it again."""
    counts = {"written": 0, "duplicate": 0, "unreadable": 0}
    skipped: set[str] = set()
    while True:
        listed = esl.api(f"db list/{KEPT_REALM}").body.decode("utf-8", "replace").strip()
        if listed.startswith("-ERR"):  # "-ERR no reply": the realm is empty
            return counts
        keys = [k for k in listed.split(",") if k and k not in skipped and "/" not in k]
        if len(listed) >= 4000:  # mod_db lists into 4 kB: the last key may be cut short
            keys = keys[:-1]
        if not keys:
            return counts
        for key in keys:
            line = esl.api(f"db select/{KEPT_REALM}/{key}").body.decode("utf-8", "replace")
            headers = kept_headers(key, line)
            if headers is None:
                counts["unreadable"] += 1  # left on the PBX for a person: it holds real numbers
                skipped.add(key)
                log.warning("unreadable CDR kept by FreeSWITCH left there", call_id=key[:64])
                continue
            row = service.cdr_row(finished_call(headers))
            counts["written" if service.store_row(row) else "duplicate"] += 1
            esl.api(f"db delete/{KEPT_REALM}/{key}")
