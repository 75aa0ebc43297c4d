"""Configuration: conf/callctl.yaml, then CALLCTL_* environment overrides.

A bad file or value stops the program with one clear sentence naming the problem.
"""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from callctl import netacl

DEFAULT_PATH = "conf/callctl.yaml"


class ConfigError(Exception):
    pass


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Listener(Strict):
    """A section with a listen address, HOST:PORT."""

    listen: str

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:4573")
        return value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0]

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class AgiConfig(Listener):
    listen: str = "127.0.0.1:4573"
    env_timeout: float = Field(5.0, gt=0)
    command_timeout: float = Field(5.0, gt=0)
    # Peers that may connect (the PBX): CIDRs; anyone else is dropped at connect
    # (callctl/netacl.py). $CALLCTL_AGI_ALLOW: comma-separated.
    allow: list[str] = list(netacl.LOOPBACK)

    @field_validator("allow", mode="before")
    @classmethod
    def _cidrs(cls, value):
        return netacl.parse_cidrs(value)


class FreeSwitchConfig(Listener):
    """`callctl serve freeswitch` (docs/esl.md)."""
    listen: str = "127.0.0.1:8084"  # the dialplan's socket application connects here
    # Peers that may connect (FreeSWITCH): CIDRs, as agi.allow. $CALLCTL_FREESWITCH_ALLOW.
    allow: list[str] = list(netacl.LOOPBACK)
    command_timeout: float = Field(5.0, gt=0)  # seconds FreeSWITCH may take to answer a command
    linger: int = Field(60, ge=5, le=3600)  # seconds FreeSWITCH keeps a hung-up call's socket for its CDR
    # The inbound event socket, for `callctl cdr import-pbx --pbx freeswitch`.
    esl: str = "127.0.0.1:8021"
    esl_password: str = "ClueCon"

    @field_validator("allow", mode="before")
    @classmethod
    def _cidrs(cls, value):
        return netacl.parse_cidrs(value)


class ApiConfig(Listener):
    listen: str = "127.0.0.1:8080"
    workers: int = Field(1, ge=1, le=64)  # server processes sharing the listen socket
    # One line per request on stderr: method, path, status; never the query string (it may
    # carry a customer's number), the client's address or a body (callctl.api.app.AccessFormatter).
    access_log: bool = False
    max_body_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024)  # larger: 413
    body_timeout: float = Field(10.0, gt=0, le=300)  # seconds for a whole body to arrive: 408
    # an accepted token is remembered this long: a revoked one is refused at most this late (0: ask every time)
    token_cache_seconds: float = Field(5.0, ge=0, le=60)
    metrics_listen: str = "127.0.0.1:9465"  # the API process's own /metrics and /healthz


    @field_validator("metrics_listen")
    @classmethod
    def _metrics_host_port(cls, value: str) -> str:
        return Listener._host_port(value)

    @property
    def metrics_host(self) -> str:
        return self.metrics_listen.rpartition(":")[0]

    @property
    def metrics_port(self) -> int:
        return int(self.metrics_listen.rpartition(":")[2])


class MetricsConfig(Listener):
    """Prometheus /metrics and /healthz (callctl.metrics)."""

    listen: str = "127.0.0.1:9464"


class AmiConfig(Strict):
    """Asterisk Manager Interface (manager.conf): live calls, --cut-active, doctor.
    Off while username is empty."""

    host: str = "127.0.0.1"
    port: int = Field(5038, ge=1, le=65535)
    username: str = ""
    secret: str = ""
    action_timeout: float = Field(2.0, gt=0, le=30)  # seconds for one AMI action's answer


class LogConfig(Strict):
    format: str = Field("console", pattern="^(console|json)$")
    level: str = Field("info", pattern="^(debug|info|warning|error)$")


class KeysConfig(Strict):
    # The number key ring (docs/keys.md); $CALLCTL_KEYS, when set, replaces the file.
    file: str = "var/callctl.keys"
    current: str = ""  # key id for new writes; empty = the last key listed


class WebhookConfig(Strict):
    """`callctl webhook deliver`: retries double from retry_seconds up to max_retry_seconds."""
    retry_seconds: float = Field(5.0, gt=0, le=3600)
    max_retry_seconds: float = Field(3600.0, gt=0, le=86400)
    timeout: float = Field(5.0, gt=0, le=60)  # seconds an endpoint has to answer


class Config(Strict):
    database_url: str = "sqlite:///var/callctl.db"
    region: str = Field("CN", min_length=2, max_length=2)  # how national numbers are read
    node: str = ""  # this PBX/daemon pair's name in CDRs; the PBX's own name wins if sent
    spool_dir: str = "var/spool"
    quarantine_days: float = Field(30, ge=0)  # cooldown before an unbound X is reused
    # After an expiry X rests as long as its binding lived, at most this (unset: quarantine_days).
    quarantine_after_expiry_days: float | None = Field(None, ge=0)
    axe_extension_digits: int = Field(4, ge=1, le=6)  # AXE: digits of an extension on X
    db_threads: int = Field(8, ge=1, le=64)
    # Longest wait for the database at call time (connect, statement, lock); past it a
    # call is rejected as unavailable and its CDR goes to the spool.
    db_timeout: float = Field(2.0, gt=0, le=30)
    # Group commit of CDRs on PostgreSQL: a CDR waits up to this long for others to go
    # in the same statement and commit; 0 writes each alone. The PBX's hangup is
    # acknowledged after the commit either way.
    cdr_group_ms: float = Field(20.0, ge=0, le=1000)
    anomaly_rules: str = "conf/anomaly.yaml"  # the anomaly job's rules (callctl anomaly run)
    # The audit log's signed head, kept outside the database (docs/reveal.md).
    audit_checkpoint: str = "var/callctl.audit-head"
    # Numbers of the customers' self-service line (E.164): the daemon answers calls to them
    # with its menu instead of routing them (Asterisk: dialplan context callctl-selfservice;
    # FreeSWITCH: over the event socket, docs/esl.md).
    selfservice_numbers: list[str] = []
    housekeeping_seconds: float = Field(5.0, gt=0, le=3600)  # expiry, spool replay: how often

    @field_validator("selfservice_numbers", mode="before")
    @classmethod
    def _number_list(cls, value):
        if isinstance(value, str):  # from the environment: comma-separated
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("selfservice_numbers")
    @classmethod
    def _e164(cls, value: list[str]) -> list[str]:
        for number in value:
            if not (number.startswith("+") and number[1:].isdigit() and 3 <= len(number) <= 16):
                raise ValueError("each must be an E.164 number, e.g. +8695500")
        return value

    @property
    def expiry_quarantine(self) -> timedelta:
        """The most an X rests after its binding expired (the binding's lifetime, at most this)."""
        days = self.quarantine_after_expiry_days
        return timedelta(days=self.quarantine_days if days is None else days)
    agi: AgiConfig = AgiConfig()
    metrics: MetricsConfig = MetricsConfig()
    ami: AmiConfig = AmiConfig()
    freeswitch: FreeSwitchConfig = FreeSwitchConfig()
    api: ApiConfig = ApiConfig()
    log: LogConfig = LogConfig()
    keys: KeysConfig = KeysConfig()
    webhooks: WebhookConfig = WebhookConfig()
    # The file named when loading (None: $CALLCTL_CONFIG or the default): a reload reads it again.
    source: str | None = Field(None, exclude=True)


# Environment variable -> (section, key); section None is top level.
ENV_OVERRIDES = {
    "CALLCTL_DATABASE_URL": (None, "database_url"),
    "CALLCTL_REGION": (None, "region"),
    "CALLCTL_NODE": (None, "node"),
    "CALLCTL_SPOOL_DIR": (None, "spool_dir"),
    "CALLCTL_QUARANTINE_DAYS": (None, "quarantine_days"),
    "CALLCTL_QUARANTINE_AFTER_EXPIRY_DAYS": (None, "quarantine_after_expiry_days"),
    "CALLCTL_DB_TIMEOUT": (None, "db_timeout"),
    "CALLCTL_CDR_GROUP_MS": (None, "cdr_group_ms"),
    "CALLCTL_DB_THREADS": (None, "db_threads"),
    "CALLCTL_ANOMALY_RULES": (None, "anomaly_rules"),
    "CALLCTL_AUDIT_CHECKPOINT": (None, "audit_checkpoint"),
    "CALLCTL_SELFSERVICE_NUMBERS": (None, "selfservice_numbers"),
    "CALLCTL_HOUSEKEEPING_SECONDS": (None, "housekeeping_seconds"),
    "CALLCTL_AGI_LISTEN": ("agi", "listen"),
    "CALLCTL_AGI_ALLOW": ("agi", "allow"),
    "CALLCTL_FREESWITCH_LISTEN": ("freeswitch", "listen"),
    "CALLCTL_FREESWITCH_ALLOW": ("freeswitch", "allow"),
    "CALLCTL_FREESWITCH_ESL": ("freeswitch", "esl"),
    "CALLCTL_FREESWITCH_ESL_PASSWORD": ("freeswitch", "esl_password"),
    "CALLCTL_API_LISTEN": ("api", "listen"),
    "CALLCTL_API_WORKERS": ("api", "workers"),
    "CALLCTL_API_MAX_BODY_BYTES": ("api", "max_body_bytes"),
    "CALLCTL_API_BODY_TIMEOUT": ("api", "body_timeout"),
    "CALLCTL_API_TOKEN_CACHE_SECONDS": ("api", "token_cache_seconds"),
    "CALLCTL_API_METRICS_LISTEN": ("api", "metrics_listen"),
    "CALLCTL_METRICS_LISTEN": ("metrics", "listen"),
    "CALLCTL_AMI_HOST": ("ami", "host"),
    "CALLCTL_AMI_PORT": ("ami", "port"),
    "CALLCTL_AMI_USERNAME": ("ami", "username"),
    "CALLCTL_AMI_SECRET": ("ami", "secret"),
    "CALLCTL_LOG_FORMAT": ("log", "format"),
    "CALLCTL_LOG_LEVEL": ("log", "level"),
    "CALLCTL_KEY_FILE": ("keys", "file"),
    "CALLCTL_KEY_CURRENT": ("keys", "current"),
    "CALLCTL_WEBHOOK_RETRY_SECONDS": ("webhooks", "retry_seconds"),
    "CALLCTL_WEBHOOK_MAX_RETRY_SECONDS": ("webhooks", "max_retry_seconds"),
}


def source(path: str | os.PathLike | None = None, environ=os.environ) -> str:
    """Which config file load() reads, for messages about paths in it (relative paths
    are read from the working directory, not from the config's)."""
    file = Path(path or environ.get("CALLCTL_CONFIG") or DEFAULT_PATH).absolute()
    where = f"config {file}" if file.exists() else f"no config file at {file}: defaults"
    return f"{where}; working directory {Path.cwd()}"


def load(path: str | os.PathLike | None = None, environ=os.environ) -> Config:
    """Read the config file (optional when not named explicitly) and apply overrides."""
    named = path or environ.get("CALLCTL_CONFIG")
    file = Path(named or DEFAULT_PATH)
    data: dict = {}
    if file.exists():
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" at line {where.line + 1}" if where else ""
            raise ConfigError(f"{file}: not valid YAML{line}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: must be a mapping of settings")
    elif named:
        raise ConfigError(f"{file}: no such config file")
    for var, (section, key) in ENV_OVERRIDES.items():
        if var in environ:
            target = data.setdefault(section, {}) if section else data
            if not isinstance(target, dict):
                raise ConfigError(f"{file}: '{section}' must be a mapping")
            target[key] = environ[var]
    try:
        cfg = Config.model_validate({**data, "source": None})
        cfg.source = str(file) if file.exists() else None
        return cfg
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{file}: {problems}") from None
