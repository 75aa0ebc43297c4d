"""The `callctl` command never prints a traceback: out-of-range numbers, durations and ids,
a binary key file, a reader that goes away (`| head`) each get one line on stderr and the
exit code README.md documents (issue 15, item 11). A real subprocess on SQLite and
PostgreSQL."""
from __future__ import annotations

import os
import subprocess

import pytest

from tests import realnumbers
from tests.test_cli import CALLCTL, run
from tests.pg import empty_database_url

AGENT, HOTLINE = realnumbers.tenant_line("+8613900008001", "+861058008000")
CUSTOMER = realnumbers.person("+8613800008001")
POOL = ["+8617100008001", "+8617100008002"]
# README.md, "Exit codes": bad input, bad config or key, database, a command line argparse refuses
BAD_INPUT, BAD_CONFIG, DATABASE, USAGE = 1, 2, 3, 2


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def cli(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(f"cli-hardening-{request.param}")
    url = empty_database_url(request, workdir)
    env = {"PATH": "/usr/bin:/bin", "CALLCTL_DATABASE_URL": url, "CALLCTL_SPOOL_DIR": str(workdir / "spool")}
    call = lambda *args, **kw: run(*args, env={**env, **kw.pop("env", {})}, cwd=kw.pop("cwd", workdir))  # noqa: E731
    for args in (["db", "upgrade"], ["tenant", "add", "acme", "--hotline", HOTLINE, "--caller", AGENT],
                 ["pool", "add", "--tenant", "acme", *POOL], ["bind", "--tenant", "acme", "--customer", CUSTOMER]):
        done = call(*args)
        assert done.returncode == 0, done.stderr
    call.env = env
    call.workdir = workdir
    return call


def one_line(done: subprocess.CompletedProcess, code: int) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("callctl"), done.stderr
    assert done.returncode == code, (done.returncode, done.stderr)
    return lines[0]


@pytest.mark.parametrize("args, code", [
    (["bind", "--tenant", "acme", "--customer", CUSTOMER, "--ttl", "99999999999999999"], BAD_INPUT),
    (["bind", "--tenant", "acme", "--customer", CUSTOMER, "--ttl", "-1"], BAD_INPUT),
    (["bind", "--tenant", "acme", "--customer", CUSTOMER, "--expires", "9999-12-31T23:59:59-14:00"], BAD_INPUT),
    (["binding", "get", "99999999999999999999"], USAGE),
    (["binding", "get", "9223372036854775808"], USAGE),
    (["binding", "list", "--after", "99999999999999999999"], USAGE),
    (["binding", "extend", "1", "--ttl", "99999999999999999"], BAD_INPUT),
    (["unbind", "99999999999999999999"], USAGE),
    (["cdr", "list", "--since", "99999999d"], BAD_INPUT),
    (["cdr", "list", "--since", "9999-12-31T23:59:59-14:00"], BAD_INPUT),
    (["cdr", "list", "--binding", "99999999999999999999"], USAGE),
    (["block", "add", "--scope", "tenant", "--tenant", "acme", "--direction", "both", "--reason", "r",
      "--duration", "99999999999999999"], BAD_INPUT),
    (["block", "lift", "99999999999999999999"], USAGE),
    (["cdr", "list", "--limit", "-5"], USAGE),
    (["cdr", "list", "--limit", "0"], USAGE),
    (["binding", "list", "--limit", "-5"], USAGE),
    (["findings", "list", "--limit", "-5"], USAGE),
    (["cdr", "list", "--limit", "many"], USAGE),
])
def test_bad_values_get_one_line_and_the_documented_exit_code(cli, args, code):
    one_line(cli(*args), code)


def test_a_binary_key_file_is_one_line_naming_the_file(cli, tmp_path):
    keys = tmp_path / "binary.keys"
    keys.write_bytes(b"\xff\xfe\x00\x01lookup=\xe9\x80" + os.urandom(64))
    keys.chmod(0o600)
    env = {**cli.env, "CALLCTL_KEY_FILE": str(keys)}
    done = run("tenant", "list", env={**env, "CALLCTL_KEYS": ""}, cwd=cli.workdir)
    assert str(keys) in one_line(done, BAD_CONFIG)


def test_a_missing_relative_key_file_says_which_config_was_read(cli, tmp_path):
    config = tmp_path / "etc" / "callctl.yaml"
    config.parent.mkdir()
    config.write_text("keys:\n  file: var/callctl.keys\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run("tenant", "list", env={**cli.env, "CALLCTL_KEYS": "", "CALLCTL_CONFIG": str(config)}, cwd=elsewhere)
    line = one_line(done, BAD_CONFIG)
    assert str(config) in line and str(elsewhere / "var" / "callctl.keys") in line


def test_a_reader_that_goes_away_ends_the_command_quietly(cli):
    """`callctl tenant list | head`: the reader closes the pipe before the output comes."""
    read, write = os.pipe()
    env = {"CALLCTL_KEYS": os.environ["CALLCTL_KEYS"], **cli.env}
    os.close(read)  # nobody reads: the first write gets EPIPE
    done = subprocess.run([str(CALLCTL), "tenant", "list"], stdout=write, stderr=subprocess.PIPE, text=True,
                          env=env, cwd=cli.workdir, timeout=60)
    os.close(write)
    assert done.stderr == "", done.stderr
    assert done.returncode in (0, 141), done.returncode  # 141: 128 + SIGPIPE, as other Unix tools


def test_nothing_was_changed_by_a_refused_command(cli):
    before = cli("binding", "list").stdout
    one_line(cli("bind", "--tenant", "acme", "--customer", CUSTOMER, "--ttl", "99999999999999999"), BAD_INPUT)
    assert cli("binding", "list").stdout == before

