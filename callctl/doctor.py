"""`callctl doctor`: check a box end to end and say plainly what is wrong and how to fix it.

Each check gives ok / FAIL / skip, a sentence, and for a failure the fix. Nothing is
changed by a check (the key check stores a check value not stored yet, as every start of
the daemon does): the test decision is a routing read (no CDR is written) and the AMI
checks only read. No output carries a number.
"""
from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError

from callctl.config import Config


class Status(StrEnum):
    OK = "ok"
    FAIL = "FAIL"
    SKIP = "skip"


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


def run(cfg: Config) -> list[Check]:
    checks: list[Check] = []
    add = checks.append
    add(Check("config", Status.OK, f"loaded from {cfg.source}" if cfg.source else "no config file: defaults and CALLCTL_* variables"))
    keys, ring = _keys(cfg)
    add(keys)
    if ring is None:
        return checks

    from callctl.store.db import make_engine
    engine = make_engine(cfg.database_url, pool_size=1, timeout=cfg.db_timeout)
    database, answers = _database(engine)
    add(database)
    if not answers:
        return checks
    schema = _schema(engine)
    add(schema)
    if schema.status == Status.FAIL:
        return checks
    add(_keys_match_database(engine, ring))
    add(_decision(engine, cfg))
    add(_spool(cfg))
    engine.dispose()

    add(_agi(cfg))
    add(_health(cfg))
    checks.extend(asyncio.run(_asterisk(cfg)))
    return checks


def _keys(cfg: Config):
    """The key ring's check, and the ring (None when it cannot be loaded)."""
    from callctl.store import crypto
    try:
        crypto.install(crypto.load_ring(cfg.keys.file, cfg.keys.current))
        ring = crypto.ring()
        return Check("keys", Status.OK, f"key ring loaded: {len(ring.keys)} key(s), current '{ring.current}'"), ring
    except Exception as exc:  # the CLI installs the ring at start; a failure there ends it already
        return Check("keys", Status.FAIL, str(exc), "callctl keys generate (or set $CALLCTL_KEYS); docs/keys.md"), None


def _database(engine) -> tuple[Check, bool]:
    """The database's check, and whether it answers at all (a read-only standby does)."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            writable = True
            if engine.dialect.name == "postgresql":
                writable = not conn.execute(text("SELECT pg_is_in_recovery()")).scalar()
        return Check("database", Status.OK if writable else Status.FAIL,
                     f"{engine.dialect.name} answers" + ("" if writable else " but is a read-only standby"),
                     "" if writable else "point database_url at the primary: list every host with "
                     "target_session_attrs=read-write (README: Running in production)"), True
    except SQLAlchemyError as exc:
        return Check("database", Status.FAIL, f"{engine.dialect.name} does not answer ({type(exc).__name__})",
                     "check database_url, that the server runs and this host may connect (pg_hba.conf)"), False


def _schema(engine) -> Check:
    from callctl.store.db import migrations
    try:
        with engine.connect() as conn:
            done = {row[0] for row in conn.execute(text("SELECT version FROM schema_migrations"))}
    except SQLAlchemyError:
        done = set()
    missing = [p.stem for p in migrations(engine.dialect.name) if p.stem not in done]
    return Check("schema", Status.FAIL if missing else Status.OK,
                 f"{len(missing)} migration(s) not applied, first {missing[0]}" if missing else "all migrations applied",
                 "callctl db upgrade" if missing else "")


def _decision(engine, cfg: Config) -> Check:
    """A test call to the first pool number, decided here (a routing read: no CDR)."""
    from callctl.service import CallService
    from callctl.store.models import VirtualNumber
    with engine.connect() as conn:
        x = conn.execute(select(func.min(VirtualNumber.e164))).scalar()
    service = CallService(engine, spool=None, region=cfg.region, node=cfg.node)
    if x is None:
        return Check("decision", Status.SKIP, "no virtual number provisioned yet", "callctl pool add")
    _, decision = service.route(x, "anonymous")
    return Check("decision", Status.OK if decision.action != "reject" or str(decision.reason) != "unavailable"
                 else Status.FAIL, f"a test call to the first pool number was decided here: {decision.action}"
                 + (f" ({decision.reason})" if decision.action == "reject" else ""))


def _spool(cfg: Config) -> Check:
    from callctl.store.spool import CdrSpool, SpoolError
    try:
        CdrSpool(cfg.spool_dir).check_writable()
        return Check("spool", Status.OK, f"{cfg.spool_dir} writable")
    except SpoolError as exc:
        return Check("spool", Status.FAIL, str(exc), f"create {cfg.spool_dir}, owned by the daemon's user")


def _keys_match_database(engine, ring) -> Check:
    """The ring must be the one the database was written with (callctl.store.keycheck,
    as at every start of the daemon): else no call finds its binding, or none decrypts."""
    from callctl.store import keycheck
    from callctl.store.reencrypt import key_usage
    missing = sorted(k for k in key_usage(engine) if k not in ring.keys and k != "plaintext")
    if missing:
        return Check("keys vs database", Status.FAIL, f"numbers stored under key(s) not in the ring: {missing}",
                     "restore those keys into the key file (docs/keys.md)")
    try:
        keycheck.verify(engine, ring)
    except keycheck.KeyMismatch as exc:
        return Check("keys vs database", Status.FAIL, str(exc), "use the key file this database was written with")
    return Check("keys vs database", Status.OK, "the ring's secrets match the database's check values")


def _agi(cfg: Config) -> Check:
    """A FastAGI session as Asterisk opens it, to a script that does not exist: a callctl
    daemon answers by closing it (and logs it), after reading the environment."""
    try:
        with socket.create_connection((cfg.agi.host, cfg.agi.port), timeout=2):
            pass
    except OSError as exc:
        return Check("daemon", Status.FAIL, f"nothing answers on agi.listen {cfg.agi.listen} ({exc.strerror or exc})",
                     "start it: systemctl start callctl-asterisk (or callctl serve asterisk)")
    return Check("daemon", Status.OK, f"FastAGI listens on {cfg.agi.listen}")


def _health(cfg: Config) -> Check:
    url = f"http://{cfg.metrics.listen}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return Check("health", Status.OK, f"{url}: {json.loads(reply.read()).get('status')}")
    except urllib.error.HTTPError as err:
        return Check("health", Status.FAIL, f"{url}: {err.read().decode(errors='replace').strip()}",
                     "the daemon cannot reach its database or write its spool: see its log")
    except (OSError, ValueError) as exc:
        return Check("health", Status.FAIL, f"{url} does not answer ({exc})",
                     "is the daemon running with this metrics.listen?")


async def _asterisk(cfg: Config) -> list[Check]:
    if not cfg.ami.username:
        return [Check("AMI", Status.SKIP, "ami.username not set: live calls and --cut-active are off",
                      "set ami.username/ami.secret from manager.conf")]
    from callctl.asterisk.ami import AmiError, AmiLink
    link = AmiLink(cfg.ami.host, cfg.ami.port, cfg.ami.username, cfg.ami.secret, cfg.ami.action_timeout)
    try:
        await link.connect(cfg.ami.action_timeout + 3)
        await link.ping()
        checks = [Check("AMI", Status.OK, f"logged in at {cfg.ami.host}:{cfg.ami.port}, ping answered")]
        shown = await link.action({"Action": "Command", "Command": "dialplan show globals"})
        if shown.get("Response") == "Error":
            return checks + [Check("dialplan", Status.FAIL, f"AMI refused a CLI command: {shown.get('Message')}",
                                   "give the AMI user 'command' in write= (manager.conf), then: manager reload")]
        output = "\n".join(_output(shown))
        agi = next((line.split("=", 1)[1].strip() for line in output.splitlines()
                    if "CALLCTL_AGI=" in line), None)
        context = await link.action({"Action": "Command", "Command": "dialplan show callctl-inbound"})
        loaded = "callctl-inbound" in "\n".join(_output(context)) and "no such context" not in \
            "\n".join(_output(context)).lower()
        if not loaded:
            checks.append(Check("dialplan", Status.FAIL, "context callctl-inbound is not loaded",
                                "#include extensions_callctl.conf in extensions.conf, then: dialplan reload"))
        elif agi is None:
            checks.append(Check("dialplan", Status.FAIL, "global CALLCTL_AGI is not set",
                                f"set CALLCTL_AGI={cfg.agi.listen} in [globals], then: dialplan reload"))
        elif agi != cfg.agi.listen:
            checks.append(Check("dialplan", Status.FAIL, f"CALLCTL_AGI is {agi}, the daemon listens on {cfg.agi.listen}",
                                "make them the same, then: dialplan reload"))
        else:
            checks.append(Check("dialplan", Status.OK, f"callctl-inbound loaded, CALLCTL_AGI={agi}"))
        return checks
    except AmiError as exc:
        return [Check("AMI", Status.FAIL, str(exc), "check ami.* against Asterisk's manager.conf")]
    finally:
        link.close()


def _output(message) -> list[str]:
    """A Command action's output lines (panoramisk keeps them in `content` or `Output`)."""
    value = getattr(message, "content", None) or message.get("Output") or ""
    return value if isinstance(value, list) else str(value).splitlines()


def report(checks: list[Check]) -> str:
    lines = []
    for check in checks:
        lines.append(f"{check.status:<4}  {check.name:<16} {check.detail}")
        if check.status is Status.FAIL and check.fix:
            lines.append(f"{'':<4}  {'':<16} fix: {check.fix}")
    failed = sum(c.status is Status.FAIL for c in checks)
    lines.append("all checks passed" if not failed else f"{failed} check(s) failed")
    return "\n".join(lines)
