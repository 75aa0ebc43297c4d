"""FreeSWITCH backend: `callctl serve freeswitch`, the server FreeSWITCH's `socket`
application (async full) connects to once per call (docs/esl.md).

gevent, in a process of its own: one greenlet per call holds the call's socket from the
decision to its CHANNEL_HANGUP_COMPLETE (linger), then writes the CDR. The store is the
synchronous one: on PostgreSQL psycopg2 waits cooperatively (psycogreen), with at most
db_threads greenlets in it at once; on SQLite its calls run in gevent's thread pool.
Translates the channel to the daemon's route/record and back, nothing more.
"""
from __future__ import annotations

import signal
import time
from typing import Mapping

import gevent
import gevent.event
import gevent.lock
import gevent.server
import structlog
from sqlalchemy.exc import SQLAlchemyError

from callctl.core.decision import Bridge, CollectExtension, Reason, Reject, SelfService
from callctl.core.numbers import caller_e164
from callctl.core.rejections import DIAL_END_CAUSES, OTHER_DIAL_END_CAUSE, REJECTIONS, rejection
from callctl import lifecycle
from callctl.daemon import Housekeeping, counted_cdr, log_routed, open_service, reload_profile_hours
from callctl.freeswitch.esl import EslClosed, EslError, EslSession
from callctl.metrics import DB_ERRORS, SESSIONS, SESSIONS_OPEN, SPOOL_DEPTH, Protocol, serve_in_thread
from callctl.netacl import AllowList
from callctl.service import CallService, FinishedCall, decision_variables, parse_epoch, parse_int
from callctl.store.keycheck import KeyMismatch
from callctl.store.spool import SpoolError

log = structlog.get_logger("callctl.freeswitch")

# FreeSWITCH's DIALSTATUS words -> Asterisk's, so that CDRs read the same on both PBXs.
_DIAL_STATUS = {"SUCCESS": "ANSWER", "ANSWER": "ANSWER", "CANCEL": "CANCEL", "BUSY": "BUSY",
                "NOANSWER": "NOANSWER", "NO_ANSWER": "NOANSWER", "ORIGINATOR_CANCEL": "CANCEL",
                "NORMAL_CIRCUIT_CONGESTION": "CONGESTION", "SWITCH_CONGESTION": "CONGESTION",
                "NORMAL_TEMPORARY_FAILURE": "CONGESTION", "EARLY": "ANSWER"}
# FreeSWITCH answers Q.850 21 (call rejected) with 603; Asterisk, and what carriers
# expect of a refusal, is 403: those rejections end with `respond` instead of `hangup`.
_SIP_RESPONSE = {21: 403}
LIMIT_REALM = "callctl_tenant"  # mod_hash realm of the tenants' concurrent calls (resource: tenant id)
KEPT_REALM = "callctl_cdr"  # mod_db realm of the CDRs the dialplan keeps on the PBX


def dial_status(word: str) -> str:
    if not word:
        return ""
    return _DIAL_STATUS.get(word, "CHANUNAVAIL")


def hangup_by(disposition: str, bridged: bool, bridge_cause: str) -> str:
    """Who ended the call, from the caller's leg: sofia's sip_hangup_disposition (recv_bye,
    recv_cancel: the caller's side; send_bye, send_refuse, send_cancel: FreeSWITCH) and,
    once bridged, how the other leg ended (last_bridge_hangup_cause: NORMAL_CLEARING when
    the callee hung up, ALLOTTED_TIMEOUT when the maximum duration cut it). "" when the
    channel reports no disposition (not a SIP call)."""
    if disposition in ("recv_bye", "recv_cancel"):
        return "caller"
    if not disposition:
        return ""
    return "callee" if bridged and bridge_cause == "NORMAL_CLEARING" else "pbx"


def finished_call(headers: Mapping[str, str]) -> FinishedCall:
    """A hung-up channel's variables (CHANNEL_HANGUP_COMPLETE's headers, or the copy the
    dialplan kept on the PBX) as a FinishedCall. Talk time is the bridged leg's, as on
    Asterisk (ANSWEREDTIME); ring time runs from the start to the bridge."""
    def var(name: str) -> str:
        return headers.get(f"variable_{name}", "")

    start = parse_epoch(var("start_uepoch"), 1e-6)
    end = parse_epoch(var("end_uepoch"), 1e-6)
    bridged = parse_epoch(var("bridge_uepoch"), 1e-6)
    return FinishedCall(
        call_id=headers.get("Unique-ID") or var("uuid"),
        called=var("callctl_called"), caller=var("callctl_caller"), destination=var("callctl_dest"),
        action=var("callctl_action"), reason=var("callctl_reason"),
        binding=parse_int(var("callctl_binding")), tenant=parse_int(var("callctl_tenant")),
        direction=var("callctl_direction"), purpose=var("callctl_purpose"), start=start, end=end,
        ring_seconds=(bridged - start).total_seconds() if bridged and start else None,
        talk_seconds=max((end - bridged).total_seconds(), 0.0) if bridged and end else 0.0,
        dial_status=dial_status(var("DIALSTATUS")),
        hangup_cause=parse_int(var("hangup_cause_q850")),
        node=headers.get("FreeSWITCH-Switchname", ""),
        hangup_by=hangup_by(var("sip_hangup_disposition"), bridged is not None,
                            var("last_bridge_hangup_cause")),
    )


class Calls:
    """The daemon's call path for greenlets: decisions and CDRs with the same bounds and
    fail-closed ends as the asyncio daemon (callctl.daemon.AsyncDaemon)."""

    def __init__(self, service: CallService, db_slots: int, db_timeout: float):
        self.service = service
        self.decision_timeout = db_timeout + 1
        self.write_timeout = db_timeout + 1
        self.on_postgresql = service.engine.dialect.name == "postgresql"
        self.command_timeout: float | None = None  # SIGHUP's freeswitch.command_timeout
        self._slots = gevent.lock.BoundedSemaphore(db_slots)

    def store(self, fn, *args):
        """Run a store call without blocking other greenlets."""
        if self.on_postgresql:  # psycopg2 waits in the hub (psycogreen); the pool stays bounded
            with self._slots:
                return fn(*args)
        return gevent.get_hub().threadpool.apply(fn, args)  # sqlite3 would block the hub

    def route(self, called: str, caller: str, extension: str | None, call_id: str):
        started = time.perf_counter()
        try:
            with gevent.Timeout(self.decision_timeout):
                x, decision = self.store(self.service.route, called, caller, None, extension)
        except gevent.Timeout:
            DB_ERRORS.labels("route").inc()
            log.error("no decision in time: rejected as unavailable", call_id=call_id,
                      seconds=self.decision_timeout)
            x, decision = caller_e164(called, self.service.region), Reject(Reason.UNAVAILABLE)
        log_routed(self.service, call_id, caller, x, decision, (time.perf_counter() - started) * 1000)
        return x, decision

    def record(self, call: FinishedCall) -> str:
        """'written', 'duplicate' or 'spooled'; SpoolError when nothing could keep it."""
        row = self.service.cdr_row(call)  # made once: a timed-out write and its spooled copy match
        try:
            try:
                with gevent.Timeout(self.write_timeout):
                    return counted_cdr(self.store(self.service.write_row, row))
            except gevent.Timeout:
                return counted_cdr(gevent.get_hub().threadpool.apply(self.service.spool_row, (row, "timeout")))
        except SpoolError as lost:
            return counted_cdr(lost)


class CallSession:
    """One call's socket: decide, act on the decision, wait for the hangup, record."""

    def __init__(self, calls: Calls, esl: EslSession, cfg):
        self.calls, self.esl, self.cfg = calls, esl, cfg
        self.channel: dict[str, str] = {}
        self.call_id = ""
        self.answered = False  # AXE answers for its prompt

    def run(self) -> None:
        esl = self.esl
        self.channel = esl.connect()
        self.call_id = self.channel.get("Unique-ID", "")[:64]
        esl.subscribe()
        esl.command(f"linger {self.cfg.linger}")
        # Connected and talking: cancel the dialplan's guard against a daemon that takes
        # the connection and never speaks (sched_hangup, group = the call's uuid).
        esl.api(f"sched_del {self.call_id}")
        if self.channel.get("Channel-State") == "CS_HANGUP" or self.channel.get("Answer-State") == "hangup":
            log.info("call gone before its decision", call_id=self.call_id)
        else:
            self.decide_and_act()
        # The call ends right after a bridge or a reject; a caller left alone in an AXE
        # prompt hangs up within its timeouts.
        self.record(esl.hangup_complete(timeout=120))

    def var(self, name: str) -> str:
        return self.channel.get(f"variable_{name}", "")

    def decide_and_act(self) -> None:
        called = self.var("callctl_called") or self.channel.get("Caller-Destination-Number", "")
        caller = self.var("callctl_caller") or self.channel.get("Caller-Caller-ID-Number", "")
        _, decision = self.calls.route(called, caller, None, self.call_id)
        if isinstance(decision, CollectExtension):
            decision = self.axe(decision, called, caller)
            if decision is None:
                return  # hung up at the prompt: the CDR says invalid_extension
        self.set_variables(decision)
        if isinstance(decision, SelfService):
            self.self_service(caller)
        elif isinstance(decision, Bridge):
            if self.within_limit(decision):
                self.bridge(decision)
        else:
            self.reject(decision.reason)

    def set_variables(self, decision) -> None:
        """The decision on the channel (callctl_*), "action" last: the PBX's copy of the
        CDR (docs/esl.md) then never holds half a decision."""
        values = {f"callctl_{name}": value for name, value in decision_variables(decision).items()}
        self.esl.execute("multiset", " ".join(f"{k}={v}" for k, v in values.items()))

    def axe(self, ask: CollectExtension, called: str, caller: str):
        """AXE: answer, prompt, route again with the keys; a wrong or missing extension
        gets ask.tries attempts in all, as on Asterisk. None: hung up meanwhile."""
        self.set_variables(ask)
        if self.esl.execute("answer") is None:
            return None
        self.answered = True
        decision = None
        for attempt in range(ask.tries):
            keyed = self.read_extension(ask.digits, "enter_extension" if attempt == 0 else "invalid_try_again")
            if keyed is None:
                return None
            _, decision = self.calls.route(called, caller, keyed, self.call_id)
            if isinstance(decision, CollectExtension):  # asked again despite the keys: fail closed
                decision = Reject(Reason.UNAVAILABLE, tenant_id=decision.tenant_id)
            if not (isinstance(decision, Reject) and decision.reason == Reason.INVALID_EXTENSION):
                break
        return decision

    def read_extension(self, digits: int, prompt: str) -> str | None:
        """Up to `digits` RFC 2833 keys ('#' ends early) after the prompt; '' for none."""
        timeout_ms = int(float(self.var("callctl_ext_timeout") or 5) * 1000)
        done = self.esl.execute("play_and_get_digits", " ".join([
            "1", str(digits), "1", str(timeout_ms), "#", f"{self.var('callctl_sounds')}/{prompt}.wav",
            "silence_stream://100", "callctl_ext", f"^\\d{{1,{digits}}}$", str(timeout_ms)]),
            timeout=timeout_ms / 1000 + 30)
        if done is None:
            return None
        return done.event.get("variable_callctl_ext", "")

    def within_limit(self, decision: Bridge) -> bool:
        """The tenant's concurrent-call limit, counted by FreeSWITCH (mod_hash's `limit`,
        realm callctl_tenant, the tenant id as resource): the call counts from here until
        it hangs up, and the count lives in FreeSWITCH, right across daemon restarts.
        Past the limit: `limit` counts nothing and sets no limit_usage; the call is
        refused concurrent_limit (486). `limit` also transfers such a call to the
        dialplan's callctl_concurrent_limit, which refuses it the same way: it takes
        effect only once the daemon has left the call (the socket application returns)."""
        if decision.max_concurrent is None or decision.tenant_id is None:
            return True
        done = self.esl.execute("limit", f"hash {LIMIT_REALM} {decision.tenant_id} {decision.max_concurrent} "
                                         "callctl_concurrent_limit XML callctl")
        if done is None:
            return False  # hung up meanwhile
        if done.event.get("variable_limit_usage"):
            return True
        log.info("tenant at its concurrent-call limit: refused", call_id=self.call_id,
                 tenant=decision.tenant_id, limit=decision.max_concurrent)
        self.esl.execute("multiset", f"callctl_dest= callctl_reason={Reason.CONCURRENT_LIMIT} callctl_action=reject")
        self.reject(Reason.CONCURRENT_LIMIT)
        return False

    def self_service(self, caller: str) -> None:
        """The customers' self-service line (docs/esl.md section 2, as Asterisk's
        callctl-selfservice): answer, the menu of the insurers holding a binding for
        the caller, one RFC 2833 key toggles that insurer's calls, a confirmation,
        hang up (16). Database unavailable: its announcement and 34."""
        if self.esl.execute("answer") is None:
            return
        self.answered = True
        sounds = self.var("callctl_sounds")
        menu = self.self_service_call(self.calls.service.selfservice_menu, caller)
        count = parse_int(menu.get("SS_COUNT", "")) if menu else None
        if count is None:
            return self.end_with(sounds, "unavailable", REJECTIONS[Reason.UNAVAILABLE].cause)
        if count == 0:
            return self.end_with(sounds, "selfservice_nobody", 16)
        files = []
        for key in range(1, count + 1):  # "press <n>: enabled" (calls allowed) or "disabled"
            state = "enabled" if menu.get(f"SS_{key}") == "allowed" else "disabled"
            files += [f"{sounds}/selfservice_press.wav", f"{sounds}/selfservice_{key}.wav",
                      f"{sounds}/selfservice_{state}.wav"]
        done = self.esl.execute("play_and_get_digits", " ".join([
            "1", "1", "1", "10000", "#", "file_string://" + "!".join(files), "silence_stream://100",
            "callctl_ss_key", "^[0-9*]$", "10000"]), timeout=len(files) * 5 + 40)
        if done is None:
            return
        key = done.event.get("variable_callctl_ss_key", "")
        if not key:
            return self.end_with(sounds, None, 16)
        result = self.self_service_call(self.calls.service.selfservice_key, caller, key).get("SS_RESULT", "")
        if result in ("none", "allowed", "invalid"):
            return self.end_with(sounds, {"none": "selfservice_stopped", "allowed": "selfservice_allowed",
                                          "invalid": "selfservice_invalid"}[result], 16)
        self.end_with(sounds, "unavailable", REJECTIONS[Reason.UNAVAILABLE].cause)

    def self_service_call(self, fn, *args) -> dict[str, str]:
        """A self-service store call within the decision's bound; {} when the database
        does not answer (the line then plays the unavailable announcement)."""
        try:
            with gevent.Timeout(self.calls.decision_timeout):
                return self.calls.store(fn, *args)
        except (gevent.Timeout, SQLAlchemyError) as exc:
            log.error("self-service line: database unavailable", call_id=self.call_id, error=type(exc).__name__)
            return {}

    def end_with(self, sounds: str, prompt: str | None, cause: int) -> None:
        if prompt and self.esl.execute("playback", f"{sounds}/{prompt}.wav", timeout=60) is None:
            return
        self.esl.execute("hangup", str(cause), wait=False)

    def bridge(self, decision: Bridge) -> None:
        outbound = self.var("callctl_outbound") or "sofia/gateway/carrier-out"
        x = decision.present
        # The far end's leg: X as caller id number and name, no caller-id header.
        # FreeSWITCH counts both timeouts in whole seconds from a whole second: +1 so that
        # neither ever ends early.
        leg = [f"origination_caller_id_number={x}", f"origination_caller_id_name={x}", "sip_cid_type=none",
               f"originate_timeout={decision.ring_timeout + 1}"]
        if decision.max_seconds:
            leg.append(f"execute_on_answer='sched_hangup +{decision.max_seconds + 1} ALLOTTED_TIMEOUT'")
        # The caller's leg: no caller-id headers in its responses, no callee display
        # updates, and none of the carrier's headers copied to the far end's leg
        # (FreeSWITCH copies the caller's sip_h_* variables, its Diversion among them,
        # unless the caller's leg says not to).
        self.esl.execute("multiset", "sip_cid_type=none ignore_display_updates=true hangup_after_bridge=true "
                                     "sip_copy_custom_headers=false sip_copy_multipart=false")
        done = self.esl.execute("bridge", "{" + ",".join(leg) + "}" + f"{outbound}/{decision.destination}",
                                timeout=decision.ring_timeout + (decision.max_seconds or 86400) + 60)
        if done is None:
            return  # hung up (either side): the channel is gone or going
        status = dial_status(done.event.get("variable_DIALSTATUS", ""))
        self.esl.execute("hangup", str(DIAL_END_CAUSES.get(status, OTHER_DIAL_END_CAUSE)), wait=False)

    def reject(self, reason: Reason | str) -> None:
        """Early media (183), the reason's announcement, then the mapped cause; never answered
        (an AXE call was, for its prompt: then the cause goes in the BYE)."""
        end = rejection(str(reason))
        if self.esl.execute("pre_answer") is None:
            return
        sounds = self.var("callctl_sounds")
        if self.esl.execute("playback", f"{sounds}/{end.prompt}.wav", timeout=60) is None:
            return
        if end.cause in _SIP_RESPONSE and not self.answered:
            self.esl.execute("respond", str(_SIP_RESPONSE[end.cause]), wait=False)
        else:
            self.esl.execute("hangup", str(end.cause), wait=False)

    def record(self, hangup) -> None:
        if hangup is None:
            log.warning("socket closed before the hangup: CDR left with the PBX", call_id=self.call_id)
            return
        call = finished_call(hangup.event)
        try:
            outcome = self.calls.record(call)
        except SpoolError as exc:
            log.error("CDR not kept: database down and spool unusable", call_id=self.call_id, error=str(exc))
            return
        # The acknowledgement: the PBX drops its own copy only once the CDR is kept here.
        try:
            self.esl.api(f"db delete/{KEPT_REALM}/{call.call_id}")
        except EslError:
            pass  # still kept on the PBX: an import finds it a duplicate
        log.info("call recorded", call_id=call.call_id, outcome=outcome)


class FreeSwitchBackend:
    name = "FreeSWITCH ESL"

    @classmethod
    def serve(cls, cfg) -> None:
        import psycogreen.gevent

        psycogreen.gevent.patch_psycopg()  # psycopg2 waits via gevent, before any connection
        service = open_service(cfg)
        calls = Calls(service, cfg.db_threads, cfg.db_timeout)
        fs = cfg.freeswitch
        allow = [AllowList.of(fs.allow)]  # SIGHUP replaces it
        sessions: set[gevent.Greenlet] = set()

        def handle(sock, address):
            if not allow[0].allows_peername(address):  # before a byte is read or written
                sock.close()
                log.warning("esl peer refused", peer=f"{address[0]}:{address[1]}")
                return
            SESSIONS.labels(Protocol.ESL).inc()
            sessions.add(gevent.getcurrent())
            try:
                serve_call(calls, sock, address, cfg.freeswitch)
            finally:
                sessions.discard(gevent.getcurrent())

        server = gevent.server.StreamServer((fs.host, fs.port), handle, backlog=1024)
        SESSIONS_OPEN.labels(Protocol.ESL).set_function(lambda: len(sessions))
        SPOOL_DEPTH.set_function(service.spool.depth)
        serve_in_thread(cfg.metrics.host, cfg.metrics.port, service.health)  # /metrics, /healthz
        server.start()
        log.info(f"serving {cls.name}", listen=f"{fs.host}:{server.server_port}", allow=fs.allow,
                 database=service.engine.dialect.name, metrics=cfg.metrics.listen)
        lifecycle.notify("READY=1")
        stop = gevent.event.Event()
        gevent.signal_handler(signal.SIGTERM, stop.set)
        gevent.signal_handler(signal.SIGINT, stop.set)

        def apply(fresh) -> list[str]:  # linger: serve_call reads cfg.freeswitch, replaced by reload
            allow[0] = AllowList.of(fresh.freeswitch.allow)
            calls.command_timeout = fresh.freeswitch.command_timeout
            return reload_profile_hours(service, fresh.anomaly_rules)

        def on_hup() -> None:  # SIGHUP: the allow-list, timeouts and profile hours, without a restart
            nonlocal cfg
            cfg = lifecycle.reload(cfg, apply)

        gevent.signal_handler(signal.SIGHUP, on_hup)
        keeper = gevent.spawn(_housekeeping, calls, Housekeeping(service, cfg), stop)
        stop.wait()
        lifecycle.notify("STOPPING=1")
        log.info("stopping: no new sessions, finishing those in progress")
        server.close()
        # Calls still up keep going on FreeSWITCH; their CDRs stay there (import-pbx).
        gevent.joinall(list(sessions), timeout=10)
        if sessions:
            log.warning("sessions left to the PBX at shutdown", count=len(sessions))
            gevent.killall(list(sessions), timeout=2)
        keeper.join()
        service.engine.dispose()
        log.info("stopped")
        keeper.get()  # raises KeyMismatch if that is why we stop: exit 2


def serve_call(calls: Calls, sock, address, fs) -> None:
    peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
    session = CallSession(calls, EslSession(sock, timeout=calls.command_timeout or fs.command_timeout), fs)
    try:
        session.run()
    except EslClosed:
        log.info("esl peer closed", peer=peer, call_id=session.call_id or None)
    except EslError as exc:
        log.warning("esl session failed", peer=peer, call_id=session.call_id or None,
                    error=type(exc).__name__, detail=str(exc))
    except Exception as exc:  # one bad session never takes the server down
        log.error("esl session crashed", peer=peer, call_id=session.call_id or None, error=type(exc).__name__)
    finally:
        sock.close()


def _housekeeping(calls: Calls, keeper: Housekeeping, stop) -> None:
    """Raises KeyMismatch (after setting stop) when the ring is not the database's."""
    while not stop.is_set():
        try:
            calls.store(keeper.step)
        except KeyMismatch as exc:
            log.error("stopping: the key ring is not this database's", error=str(exc))
            stop.set()
            raise
        except Exception as exc:  # noqa: BLE001 - housekeeping retries on its next round
            log.warning("housekeeping failed", error=type(exc).__name__)
        stop.wait(keeper.every)
