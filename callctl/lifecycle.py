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
# "agi.allow" is the FastAGI peer allow-list, where present.
RELOADABLE = {"log.level", "log.format", "agi.env_timeout", "agi.command_timeout", "agi.allow"}


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


def _flat(cfg: config_mod.Config) -> dict[str, object]:
    flat = {}
    for key, value in cfg.model_dump().items():
        if isinstance(value, dict):
            flat.update({f"{key}.{sub}": v for sub, v in value.items()})
        else:
            flat[key] = value
    return flat


def reload(current: config_mod.Config, apply: Callable[[config_mod.Config], None]) -> config_mod.Config:
    """Read the config again (same file, same environment). Applies the reloadable
    settings through `apply` and logs which changed settings need a restart. A file
    that does not load changes nothing. Returns the config now in force."""
    notify("RELOADING=1")
    try:
        fresh = config_mod.load(current.source)
    except config_mod.ConfigError as exc:
        RELOADS.labels("refused").inc()
        log.error("reload refused: configuration not valid, nothing changed", error=str(exc))
        notify("READY=1")
        return current
    before, after = _flat(current), _flat(fresh)
    changed = sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))
    applied = [key for key in changed if key in RELOADABLE]
    restart = [key for key in changed if key not in RELOADABLE]
    if "log.level" in applied or "log.format" in applied:
        logs.setup(fresh.log.format, fresh.log.level)
    apply(fresh)
    RELOADS.labels("applied").inc()
    log.info("configuration reloaded", applied=applied, needs_restart=restart,
             note="restart the daemon for the settings in needs_restart" if restart else None)
    # The settings not reloadable stay as they were until the restart.
    kept = current.model_copy(deep=True)
    for key in applied:
        section, _, name = key.partition(".")
        setattr(getattr(kept, section), name, getattr(getattr(fresh, section), name))
    notify("READY=1")
    return kept
