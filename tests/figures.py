"""Figures a test measures, shown in the normal `make test` output (`pytest -q -rfEs`,
which swallows print()): a test calls `record(section, name, value)` (or fills `section(title)`) and, when the
session ends, each section is written in the terminal summary, after the leak check's
line. A test that fails after recording still shows what it measured.

The hook is registered by tests/conftest.py (pytest_plugins).
"""
from __future__ import annotations

_FIGURES: dict[str, dict[str, object]] = {}


def section(title: str) -> dict[str, object]:
    """The figures of one section, a dict the test fills as it measures (name -> a
    number, a tuple of numbers, a word: never a phone number)."""
    return _FIGURES.setdefault(title, {})


def record(title: str, name: str, value: object) -> None:
    section(title)[name] = value


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for section, figures in _FIGURES.items():
        terminalreporter.section(section)
        for name, value in figures.items():
            terminalreporter.write_line(f"{name}: {value}")
