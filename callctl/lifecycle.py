"""What a long-running daemon needs from its host: systemd notifications (ready,
watchdog, stopping), and SIGHUP reloads that apply what can change while running and
name what needs a restart."""
from __future__ import annotations

import asyncio
import os
import socket
from typing import Callable

import structlog

from callctl import config as config_mod
from callctl import logs
from callctl.metrics import RELOADS

log = structlog.get_logger("callctl.daemon")

# Settings a SIGHUP applies in place (section.key); everything else needs a restart.
# "agi.allow" and "freeswitch.allow" are the FastAGI and ESL peer allow-lists;
# "anomaly_rules" is the file the protection profiles' hours are read from (read again
# at every SIGHUP, changed or not).
RELOADABLE = {"log.level", "log.format", "agi.env_timeout", "agi.command_timeout", "agi.allow",
              "freeswitch.allow", "freeswitch.command_timeout", "freeswitch.linger", "anomaly_rules"}


def notify(message: str) -> bool:
    """sd_notify(3) without libsystemd: a datagram to $NOTIFY_SOCKET (Type=notify)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError:
        return False


async def watchdog(stop: asyncio.Event) -> None:
    """WATCHDOG=1 at half systemd's WatchdogSec while the event loop turns: a daemon
    whose loop is stuck stops sending it and systemd restarts it. A database outage
    does not stop it: the daemon is then working as designed (failing closed, spooling)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or os.environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
        return
    every = int(usec) / 2e6
    while not stop.is_set():
        notify("WATCHDOG=1")
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass


def _flat(cfg) -> dict[str, object]:
    flat = {}
    for key, value in cfg.model_dump().items():
        if isinstance(value, dict):
            flat.update({f"{key}.{sub}": v for sub, v in value.items()})
        else:
            flat[key] = value
    return flat


def changed(before, after) -> list[str]:
    """The settings (section.key) that differ between two loads of a settings model."""
    old, new = _flat(before), _flat(after)
    return sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))


def reload(current: config_mod.Config,
           apply: Callable[[config_mod.Config], list[str] | None]) -> config_mod.Config:
    """Read the config again (same file, same environment). Applies the reloadable
    settings through `apply` (which returns what else it reloaded that changed, e.g.
    the profiles' hours from the rules file, or None) and logs which changed settings
    need a restart. A file that does not load changes nothing. Returns the config now
    in force."""
    notify("RELOADING=1")
    try:
        fresh = config_mod.load(current.source)
    except config_mod.ConfigError as exc:
        RELOADS.labels("refused").inc()
        log.error("reload refused: configuration not valid, nothing changed", error=str(exc))
        notify("READY=1")
        return current
    differ = changed(current, fresh)
    applied = [key for key in differ if key in RELOADABLE]
    restart = [key for key in differ if key not in RELOADABLE]
    if "log.level" in applied or "log.format" in applied:
        logs.setup(fresh.log.format, fresh.log.level)
    applied += apply(fresh) or []
    RELOADS.labels("applied").inc()
    log.info("configuration reloaded", applied=applied, needs_restart=restart,
             note="restart the daemon for the settings in needs_restart" if restart else None)
    # The settings not reloadable stay as they were until the restart.
    kept = current.model_copy(deep=True)
    for key in applied:
        section, _, name = key.partition(".")
        if not hasattr(fresh, section):  # beyond the config file (the profiles' hours)
            continue
        if name:
            setattr(getattr(kept, section), name, getattr(getattr(fresh, section), name))
        else:  # a top-level setting
            setattr(kept, section, getattr(fresh, section))
    notify("READY=1")
    return kept
