"""The API's accepted-token cache (callctl/api/auth.py Tokens) on each database, with a
clock of the test's own: a revoked token is refused once its remembered acceptance is
older than the bound, never later; unknown and revoked tokens are never remembered."""
from __future__ import annotations

import asyncio

from callctl.api.auth import Tokens
from callctl.store import tenants, tokens

HOTLINE = "+861058000000"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def made_token(engine) -> dict:
    tenants.add_tenant(engine, "acme", HOTLINE)
    return tokens.create_token(engine, tenant_name="acme", name="policy system")


def test_a_revoked_token_is_refused_once_the_bound_has_passed(engine):
    made, clock = made_token(engine), Clock()
    accepted = Tokens(engine, 5, timer=clock)
    who = accepted(made["token"])
    assert (who.role, who.tenant_name, who.name) == ("tenant", "acme", "policy system")
    tokens.revoke_token(engine, made["id"])
    clock.now += 4.999
    assert accepted(made["token"]) == who  # remembered: at most the bound late
    clock.now += 0.001
    assert accepted(made["token"]) is None  # the bound has passed: looked up again, refused
    clock.now += 60
    assert accepted(made["token"]) is None and len(accepted.accepted) == 0  # refusals are not remembered


def test_without_a_cache_every_request_looks_the_token_up(engine):
    made = made_token(engine)
    accepted = Tokens(engine, 0)
    assert accepted(made["token"]) is not None
    tokens.revoke_token(engine, made["id"])
    assert accepted(made["token"]) is None


def test_unknown_tokens_are_never_remembered(engine):
    made, clock = made_token(engine), Clock()
    accepted = Tokens(engine, 5, timer=clock)
    for guess in ("cc_" + "x" * 43, "cc_guess", "not-even-prefixed", made["token"] + "x"):
        assert accepted(guess) is None
        assert asyncio.run(accepted.check(guess)) is None
    assert len(accepted.accepted) == 0
    assert asyncio.run(accepted.check(made["token"])).tenant_name == "acme"
    assert len(accepted.accepted) == 1
