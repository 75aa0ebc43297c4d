"""Live calls over the Asterisk Manager Interface, through panoramisk's Manager.

The Manager reconnects by itself when the link drops; on top of it here: a checked
ping (a Ping that gets no answer in time closes the link, so the Manager reconnects
instead of waiting on a half-dead TCP connection), and a timeout on every action.

Live calls are read with CoreShowChannels: a bridged call is its inbound channel (the
one running Dial) with a bridge, and the callctl variables the route AGI set on it.
Callers' numbers arrive here in the clear: they are masked before they leave this
module and never logged.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import structlog
from panoramisk import Manager

from callctl.core.decision import Reason, Reject
from callctl.core.numbers import mask
from callctl.metrics import AMI_CONNECTED, AMI_RECONNECTS, CALLS_CUT

log = structlog.get_logger("callctl.ami")
_quiet = logging.getLogger("callctl.ami.panoramisk")  # panoramisk's debug lines carry numbers
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False

# Set on the inbound channel by the dialplan and the route AGI (docs/agi.md). The
# channel's own caller id is X by the time it dials: the caller is CALLCTL_CALLER.
_CALL_VARIABLES = ("CALLCTL_TENANT", "CALLCTL_BINDING", "CALLCTL_DIRECTION", "CALLCTL_DEST", "CALLCTL_CALLED",
                   "CALLCTL_CALLER")


class AmiError(Exception):
    """The AMI link is down, refused the login, or did not answer in time."""


@dataclass(frozen=True)
class LiveCall:
    channel: str
    uniqueid: str
    x: str
    tenant_id: int | None
    binding_id: int | None
    direction: str
    seconds: int
    caller: str  # real: only for deciding again (cut-active); shown masked
    callee: str

    def shown(self) -> dict:
        """What a person may see: parties masked."""
        return {"uniqueid": self.uniqueid, "tenant_id": self.tenant_id, "x": self.x, "binding_id": self.binding_id,
                "direction": self.direction, "caller": mask(self.caller) if self.caller else "",
                "callee": mask(self.callee) if self.callee else "", "seconds": self.seconds}


class AmiLink:
    def __init__(self, host: str = "127.0.0.1", port: int = 5038, username: str = "", secret: str = "",
                 action_timeout: float = 2.0, ping_every: float = 5.0):
        self.action_timeout = action_timeout
        self.ping_every = ping_every
        self._logged_in = asyncio.Event()
        self._logins = 0
        self.manager = Manager(
            host=host, port=port, username=username, secret=secret, events="off",
            ping_delay=10 ** 6,  # panoramisk's own ping never checks the answer: ours does (keepalive)
            reconnect_timeout=1, log=_quiet,
            on_login=self._on_login, on_disconnect=self._on_disconnect)

    def _on_login(self, _manager) -> None:
        self._logins += 1
        if self._logins > 1:
            AMI_RECONNECTS.inc()
            log.info("AMI link back")
        AMI_CONNECTED.set(1)
        self._logged_in.set()

    def _on_disconnect(self, _manager, _exc) -> None:
        AMI_CONNECTED.set(0)
        self._logged_in.clear()
        log.warning("AMI link lost; reconnecting")

    def start(self) -> None:
        """Connect in the background; the Manager keeps trying while Asterisk is away."""
        AMI_CONNECTED.set(0)
        self.manager.connect()

    async def connect(self, timeout: float = 5.0) -> "AmiLink":
        """Connect and log in; AmiError if that does not happen within `timeout`."""
        self.manager.connect()
        try:
            async with asyncio.timeout(timeout):
                while not self._logged_in.is_set():
                    future = self.manager.authenticated_future
                    if future is not None and future.done() and not self.manager.authenticated:
                        raise AmiError("AMI login refused: check ami.username and ami.secret against manager.conf")
                    await asyncio.sleep(0.05)
        except TimeoutError:
            self.close()
            raise AmiError(f"no AMI login within {timeout:g} s at {self.manager.config['host']}:"
                           f"{self.manager.config['port']} (is Asterisk up, manager.conf enabled?)") from None
        except AmiError:
            self.close()
            raise
        return self

    async def action(self, action: dict, as_list: bool | None = None):
        if not self._logged_in.is_set():
            raise AmiError("AMI link is down")
        try:
            return await asyncio.wait_for(self.manager.send_action(dict(action), as_list=as_list),
                                          self.action_timeout)
        except TimeoutError:
            raise AmiError(f"AMI action {action.get('Action')} not answered within {self.action_timeout:g} s") from None

    async def ping(self) -> None:
        reply = await self.action({"Action": "Ping"})
        if reply.get("Response") != "Success":
            raise AmiError("AMI ping refused")

    async def keepalive(self, stop: asyncio.Event) -> None:
        """A checked ping every few seconds; no answer: drop the link, the Manager reconnects."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.ping_every)
                return
            except TimeoutError:
                pass
            if not self._logged_in.is_set():
                continue
            try:
                await self.ping()
            except AmiError as exc:
                log.warning("AMI ping failed: dropping the link to reconnect", error=str(exc))
                AMI_CONNECTED.set(0)
                self._logged_in.clear()
                transport = getattr(self.manager.protocol, "transport", None)
                if transport is not None:
                    transport.close()  # connection_lost -> panoramisk reconnects

    async def bridged_calls(self) -> list[LiveCall]:
        """Bridged callctl calls now up on this Asterisk."""
        replies = await self.action({"Action": "CoreShowChannels"}, as_list=True)
        calls = []
        for event in replies:
            if event.get("Event") != "CoreShowChannel" or event.get("Application") != "Dial" \
                    or not event.get("BridgeId"):
                continue
            values = {}
            for name in _CALL_VARIABLES:
                reply = await self.action({"Action": "Getvar", "Channel": event["Channel"], "Variable": name})
                values[name] = reply.get("Value") or ""
            if not values["CALLCTL_BINDING"]:
                continue  # not routed by callctl
            calls.append(LiveCall(
                channel=event["Channel"], uniqueid=event.get("Uniqueid", ""),
                x=values["CALLCTL_CALLED"] or event.get("Exten", ""),
                tenant_id=_int(values["CALLCTL_TENANT"]), binding_id=_int(values["CALLCTL_BINDING"]),
                direction=values["CALLCTL_DIRECTION"], seconds=_int(event.get("Duration", "")) or _hms(event),
                caller=values["CALLCTL_CALLER"], callee=values["CALLCTL_DEST"]))
        return calls

    async def hangup(self, channel: str) -> bool:
        reply = await self.action({"Action": "Hangup", "Channel": channel, "Cause": "16"})
        return reply.get("Response") == "Success"

    def close(self) -> None:
        self.manager.close()
        # No reconnect after a close of our own: panoramisk would retry from connection_lost.
        self.manager.connection_lost = lambda exc: None
        AMI_CONNECTED.set(0)


def _int(value: str) -> int | None:
    return int(value) if value and value.isdigit() else None


def _hms(event) -> int:
    """Duration as 'HH:MM:SS' (CoreShowChannel's Duration field on some versions)."""
    parts = str(event.get("Duration", "")).split(":")
    if len(parts) == 3 and all(p.isdigit() for p in parts):
        return int(parts[0]) * 3600 + int(parts[1]) * 60 + int(parts[2])
    return 0


# Reject reasons that mean "a block (or suspension, or blacklist entry) stops this call".
CUT_REASONS = frozenset(reason for reason in Reason if reason.value in ("blocked", "blacklisted"))


async def cut_active(link: AmiLink, service) -> list[LiveCall]:
    """Hang up the live calls the blocks now in force would refuse: each bridged call is
    decided again (the same decision as its next call would get); those rejected for a
    block are cut. Calls refused for another reason (hours, expiry) are left alone."""
    cut = []
    for call in await link.bridged_calls():
        _, decision = await asyncio.get_running_loop().run_in_executor(None, service.route, call.x, call.caller)
        if isinstance(decision, Reject) and decision.reason in CUT_REASONS and await link.hangup(call.channel):
            CALLS_CUT.inc()
            log.info("live call cut", uniqueid=call.uniqueid, binding=call.binding_id, reason=str(decision.reason))
            cut.append(call)
    return cut
