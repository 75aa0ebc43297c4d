"""Anomaly rules and thresholds from YAML (conf/anomaly.yaml documents every key).

Each rule (callctl/anomaly/rules/) has defaults; `tenants:` overrides any rule's fields
for one tenant by name, except the settings a rule reads for all tenants at once.
A bad file or value stops the job with one sentence naming the problem.
"""
from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, ValidationError, field_validator

from callctl.anomaly import rules as _builtin  # noqa: F401  (registers the built-in rules)
from callctl.anomaly.base import RULES, Rule, Strict
from callctl.anomaly.rules.off_hours import clock_minute
from callctl.config import ConfigError
from callctl.core.decision import Profile


class BlacklistProposals(Strict):
    """When a pass proposes a caller for the shared blacklist (callctl.store.blacklist)."""
    enabled: bool = True
    rules: list[str] = ["caller_frequency", "blast"]  # per-caller rules whose findings count
    min_tenants: int = Field(2, ge=2)  # a caller found in this many tenants or more
    lookback_seconds: int = Field(30 * 86400, ge=60)  # findings whose window ended this recently

    @field_validator("rules")
    @classmethod
    def _caller_rules(cls, rules: list[str]) -> list[str]:
        wrong = [r for r in rules if r not in ("caller_frequency", "blast")]
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: only per-caller rules (caller_frequency, blast) find callers")
        return rules


PROFILES = tuple(p.value for p in Profile)  # protection profiles a binding may carry


class ProfileSettings(Strict):
    """Stricter settings for customers whose binding carries this protection profile."""
    hours: str | None = None  # "HH:MM-HH:MM": they are called only then (and within the tenant's hours)
    block_factor: float = Field(2.0, ge=1, le=30)  # an automatic block on them lasts this many times longer
    rules: dict[str, dict] = {}  # overrides of per-customer (binding) rules, e.g. customer_frequency: {calls: 3}

    @field_validator("hours")
    @classmethod
    def _hours(cls, value: str | None) -> str | None:
        if value is not None:
            start, sep, end = value.partition("-")
            if not sep or clock_minute(start) is None or clock_minute(end) is None or start == end:
                raise ValueError("must be HH:MM-HH:MM, e.g. 09:00-18:00")
        return value

    @field_validator("rules")
    @classmethod
    def _rules(cls, rules: dict) -> dict:
        for name in rules:
            if name not in RULES or RULES[name].subject_kind != "binding":
                known = ", ".join(n for n, r in RULES.items() if r.subject_kind == "binding")
                raise ValueError(f"{name}: a profile tightens per-customer rules only ({known})")
        return rules


class AnomalyConfig(Strict):
    overlap_seconds: int = Field(120, ge=0)  # rescanned CDR ids: covers late commits
    interval_seconds: float = Field(2, gt=0)  # --follow: pause between passes (blocks within seconds)
    evidence_limit: int = Field(100, ge=1, le=10000)  # CDR ids kept per finding
    workers: int = Field(2, ge=1, le=32)  # PostgreSQL: rules run side by side on this many connections
    rules: dict[str, dict] = {}
    tenants: dict[str, dict[str, dict]] = {}
    blacklist: BlacklistProposals = BlacklistProposals()
    profiles: dict[str, ProfileSettings] = {}

    @field_validator("profiles")
    @classmethod
    def _profiles(cls, profiles: dict) -> dict:
        unknown = sorted(set(profiles) - set(PROFILES))
        if unknown:
            raise ValueError(f"unknown profile(s) {', '.join(unknown)}; known: {', '.join(PROFILES)}")
        return profiles

    def profile_rule(self, name: str, tenant: str, profile: str) -> Rule | None:
        """The tenant's rule tightened for customers of `profile`; None if it sets nothing."""
        override = self.profiles[profile].rules.get(name) if profile in self.profiles else None
        if not override:
            return None
        base = self.rule(name, tenant)
        try:
            return RULES[name].model_validate({**base.model_dump(), **override})
        except ValidationError as exc:
            raise ConfigError(f"profile {profile}, rule {name}: {_problems(exc)}") from None

    def profile_hours(self) -> dict[str, tuple[str, str]]:
        return {name: tuple(p.hours.split("-")) for name, p in self.profiles.items() if p.hours}

    @field_validator("rules")
    @classmethod
    def _rules(cls, rules: dict) -> dict:
        unknown = sorted(set(rules) - set(RULES))
        if unknown:
            raise ValueError(f"unknown rule(s) {', '.join(unknown)}; known: {', '.join(RULES)}")
        for name, fields in rules.items():
            RULES[name].model_validate(fields or {})
        return rules

    @field_validator("tenants")
    @classmethod
    def _tenants(cls, tenants: dict) -> dict:
        for tenant, rules in tenants.items():
            unknown = sorted(set(rules or {}) - set(RULES))
            if unknown:
                raise ValueError(f"tenant {tenant}: unknown rule(s) {', '.join(unknown)}")
            for name, fields in (rules or {}).items():
                shared = sorted(set(fields or {}) & set(RULES[name].tenant_wide))
                if shared:
                    raise ValueError(f"tenant {tenant}: {name}.{shared[0]} is set for all tenants only")
        return tenants

    def rule(self, name: str, tenant: str | None = None) -> Rule:
        """The rule's settings for one tenant (defaults, then rules:, then tenants:)."""
        fields = dict(self.rules.get(name) or {})
        override = (self.tenants.get(tenant) or {}).get(name) or {} if tenant else {}
        for key, value in override.items():
            if key == "block" and isinstance(value, dict):
                value = {**(fields.get("block") or {}), **value}
            fields[key] = value
        try:
            return RULES[name].model_validate(fields)
        except ValidationError as exc:
            raise ConfigError(f"tenant {tenant}, rule {name}: {_problems(exc)}") from None


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}" for err in exc.errors()
    )


def load(path: str | Path) -> AnomalyConfig:
    file = Path(path)
    if not file.exists():
        raise ConfigError(f"{file}: no such anomaly rules file")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        raise ConfigError(f"{file}: not valid YAML{f' at line {where.line + 1}' if where else ''}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: must be a mapping of settings")
    try:
        config = AnomalyConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{file}: {_problems(exc)}") from None
    for tenant in config.tenants:
        for name in RULES:
            config.rule(name, tenant)  # every override must be valid on its own
    for profile in config.profiles:
        for name in RULES:
            config.profile_rule(name, None, profile)
    return config
