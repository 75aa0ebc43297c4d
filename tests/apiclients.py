"""What the API tests share: a database of each kind set up through the real CLI, and
HTTP clients that hand every response to a hook (the tests' leak records)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import httpx

from tests.pg import empty_database_url
from tests.test_cli import run


def provisioned(request, tmp_path_factory, label: str, *commands: list[str]) -> tuple[Path, str, Callable]:
    """A workdir, an empty database of request.param's kind migrated by `callctl db
    upgrade`, then each of `commands` run through the CLI (each must succeed). Returns
    the workdir, the database URL and the CLI bound to both."""
    workdir = tmp_path_factory.mktemp(f"{label}-{request.param}")
    url = empty_database_url(request, workdir)
    env = {"PATH": "/usr/bin:/bin", "CALLCTL_DATABASE_URL": url}
    cli = lambda *args: run(*args, env=env, cwd=workdir)  # noqa: E731
    for args in (["db", "upgrade"], *commands):
        done = cli(*args)
        assert done.returncode == 0, done.stderr
    return workdir, url, cli


def clients(base_url: str, tokens: dict[str, str], keep, nobody: bool = False) -> dict[str, httpx.Client]:
    """A client per token (Bearer), plus one without a token as "nobody" if asked."""
    made = {name: httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"},
                               event_hooks={"response": [keep]}, timeout=30)
            for name, token in tokens.items()}
    if nobody:
        made["nobody"] = httpx.Client(base_url=base_url, event_hooks={"response": [keep]}, timeout=30)
    return made
