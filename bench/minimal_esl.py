#!/usr/bin/env python3
"""Minimal ESL application: the floor of the event socket's cost, for `make bench`.

FreeSWITCH's `socket` application (async full) connects once per call, as to `callctl
serve freeswitch`. Per call it does what the dialplan's contract asks and nothing more
(docs/esl.md): connect, myevents (filtered as callctl's), linger, the dialplan's guard cancelled (`api sched_del`),
a bridge to one destination presenting X, and at CHANNEL_HANGUP_COMPLETE the PBX's kept
CDR deleted (`api db delete`), as callctl acknowledges a CDR. No decision, no database.
The same runtime and protocol code as callctl's backend (gevent, callctl.freeswitch.esl).
usage: minimal_esl.py [HOST:PORT] [DEST]
"""
import argparse

import gevent.server

from callctl.freeswitch.esl import EslError, EslSession

p = argparse.ArgumentParser()
p.add_argument("listen", nargs="?", default="127.0.0.1:8084")
p.add_argument("dest", nargs="?", default="+8613800000001")
a = p.parse_args()


def handle(sock, _address):
    esl = EslSession(sock, timeout=5.0)
    try:
        channel = esl.connect()
        uuid = channel.get("Unique-ID", "")
        esl.subscribe()
        esl.command("linger 60")
        esl.api(f"sched_del {uuid}")
        x = channel.get("variable_callctl_called", "")
        outbound = channel.get("variable_callctl_outbound", "sofia/gateway/phones")
        esl.execute("bridge", f"{{origination_caller_id_number={x},origination_caller_id_name={x},"
                              f"sip_cid_type=none}}{outbound}/{a.dest}", wait=False)
        if esl.hangup_complete(timeout=120) is not None:
            esl.api(f"db delete/callctl_cdr/{uuid}")
    except EslError:
        pass
    finally:
        sock.close()


host, port = a.listen.rsplit(":", 1)
gevent.server.StreamServer((host, int(port)), handle, backlog=1024).serve_forever()
