"""Every error code callctl can give is documented with its HTTP status (docs/api.md,
Errors), so the promise "codes are stable" covers all of them (issue #15, item 10).

The codes are read from the source: the first argument of every error class
(callctl.errors and its subclasses; the class gives the status) raised with a
constant, the API's own HTTP-level answers, and the few made at run time, each from
where it is made (a moment's `code`, a block's text field, a blacklist step's check, a
reveal's refusal). A raise whose code this walk cannot read fails the test: teach the
walk, do not skip it.
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import callctl
from callctl.core.enums import GrantStatus
from callctl.errors import ProvisionError

SRC = Path(callctl.__file__).parent
DOCS = SRC.parent / "docs" / "api.md"

# Raise sites whose code is made at run time; the walk reads it from where it is made.
MADE_AT_RUN_TIME = {
    ("callctl/core/times.py", "parse_time"),     # its `code` argument
    ("callctl/store/blocks.py", "_text"),        # invalid_<field>
    ("callctl/store/blacklist.py", "_refused_step"),  # what a step's check() returns
    ("callctl/store/reveal.py", "use"),          # what _refusal() returns
    ("callctl/api/app.py", "_provision_error"),  # every code above
    ("callctl/api/app.py", "_http"),             # HTTP_CODES, else http_error
}


def _error_classes() -> dict[str, type]:
    for module in pkgutil.walk_packages(callctl.__path__, "callctl."):
        if not module.name.startswith(("callctl.freeswitch", "callctl.cli.__main__")):  # gevent; runs main
            importlib.import_module(module.name)
    found, todo = {}, [ProvisionError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def _name(func: ast.expr) -> str | None:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def _const(node: ast.expr | None):
    return node.value if isinstance(node, ast.Constant) else None


def codes_in_source() -> tuple[dict[str, set[int]], list[str]]:
    """({code: the HTTP statuses it is raised with}, the raise sites whose code could not be read)."""
    from callctl.api.app import HTTP_CODES
    from callctl.store.blacklist import _BY_PERSON
    from callctl.store.reveal import RevealError

    classes, unread = _error_classes(), []
    codes: dict[str, set[int]] = {}

    def add(code, status: int) -> None:
        if isinstance(code, str):
            codes.setdefault(code, set()).add(status)

    for path in sorted(SRC.rglob("*.py")):
        where = str(path.relative_to(SRC.parent))
        for func in ast.walk(ast.parse(path.read_text())):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if not isinstance(node, ast.Call):
                    continue
                name, args = _name(node.func), node.args
                if name in classes or isinstance(node.func, ast.IfExp):
                    code = _const(args[0]) if args and not isinstance(args[0], ast.Starred) else None
                    if isinstance(code, str) and name in classes:
                        add(code, classes[name].status)
                    elif (where, func.name) not in MADE_AT_RUN_TIME:
                        unread.append(f"{where}:{node.lineno} in {func.name}")
                elif isinstance(node.func, ast.Name) and name in ("error", "_refuse") and "/api/" in where:
                    at = 1 if name == "_refuse" else 0  # (send,) status, code, message
                    if len(args) > at + 1 and isinstance(_const(args[at + 1]), str):
                        add(_const(args[at + 1]), _const(args[at]))
                    elif (where, func.name) not in MADE_AT_RUN_TIME:
                        unread.append(f"{where}:{node.lineno} in {func.name}")
                elif name == "parse_time":  # a moment's code: invalid_time unless given
                    for keyword in node.keywords:
                        add(_const(keyword.value) if keyword.arg == "code" else None, 422)
                elif name == "_text" and len(args) > 1 and isinstance(_const(args[1]), str):  # store/blocks.py
                    add("invalid_" + _const(args[1]).replace(" ", "_"), 422)
            if where.endswith("store/blacklist.py") and func.name == "check":  # a refused step's (code, message)
                for r in ast.walk(func):
                    if isinstance(r, ast.Return) and isinstance(r.value, ast.Tuple):
                        code = _const(r.value.elts[0])
                        add(code, 403 if code in _BY_PERSON else 409)
            if where.endswith("store/reveal.py") and func.name == "_refusal":  # a refused reveal
                for r in ast.walk(func):
                    if isinstance(r, ast.Return):
                        add(_const(r.value), RevealError.status)
    for status, code in HTTP_CODES.items():
        add(code, status)
    add("invalid_time", 422)  # parse_time's own default
    for status in GrantStatus:  # _refusal's f"grant_{grant.status}" for a grant not approved
        if status != GrantStatus.APPROVED:
            add(f"grant_{status}", RevealError.status)
    add("http_error", 0)  # any other HTTP-level status (app._http)
    return codes, unread


def documented() -> tuple[dict[str, int], set[str]]:
    """({code: its status in the Errors table}, the codes only the command line gives)."""
    text = DOCS.read_text()
    section = text[text.index("\n## Errors"):]
    table, cli_only = {}, set()
    for line in section.splitlines():
        if row := re.match(r"\|\s*(\d{3}|other)\s*\|(.*)\|\s*$", line):
            status = 0 if row.group(1) == "other" else int(row.group(1))
            table.update((code, status) for code in re.findall(r"`([a-z][a-z0-9_]*)`", row.group(2)))
        elif line.startswith("Codes only the command line gives"):
            cli_only = set(re.findall(r"`([a-z][a-z0-9_]*)`", section[section.index(line):]))
    return table, cli_only


def test_every_error_code_is_documented_with_its_status():
    codes, unread = codes_in_source()
    assert not unread, f"raises whose code the walk cannot read: {unread}"
    assert len(codes) > 80  # the walk found the codes
    table, cli_only = documented()
    missing = sorted(set(codes) - set(table) - cli_only)
    assert not missing, f"error codes not in docs/api.md's Errors section: {missing}"
    wrong = sorted(f"{code}: documented {table[code]}, raised with {sorted(codes[code])}"
                   for code in set(codes) & set(table) if table[code] not in codes[code])
    assert not wrong, f"docs/api.md's Errors table gives the wrong status: {wrong}"


def test_the_errors_section_names_no_code_callctl_never_gives():
    codes, _ = codes_in_source()
    table, cli_only = documented()
    settings = {"db_timeout"}  # a setting named in the table
    stale = sorted((set(table) | cli_only) - set(codes) - settings)
    assert not stale, f"docs/api.md's Errors section names codes callctl never gives: {stale}"
    both = sorted(set(table) & cli_only)
    assert not both, f"codes both in the API's table and among the command line's only: {both}"
