"""Measured figures reach the normal `make test` output (`pytest -q -rfEs`, no -s, which
swallows print()): a test run through the suite's own conftest records figures and
they appear in the terminal summary, also when that test then fails."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

MEASURING = '''
from tests import figures

def test_measures_then_passes():
    figures.record("cluster failover figures", "calls refused (503) during the outage", 17)
    figures.section("cluster failover figures")["duplicates"] = 0
    print("swallowed without -s")

def test_measures_then_fails():
    figures.record("cut-active figures", "block committed -> hangup sent, s", 0.25)
    assert False, "failed after measuring"
'''


def test_figures_are_in_the_summary_of_a_quiet_run(tmp_path):
    (tmp_path / "test_measuring.py").write_text(MEASURING)
    env = {k: v for k, v in os.environ.items() if k != "CALLCTL_TEST_CAPTURE"}  # a session of its own
    env["PYTHONPATH"] = str(REPO)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "tests.conftest",
                          "-p", "no:cacheprovider", str(tmp_path / "test_measuring.py")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = run.stdout
    assert run.returncode == 1 and "1 failed, 1 passed" in out, out
    assert "swallowed without -s" not in out  # what print() would have shown
    lines = out.splitlines()
    assert any("cluster failover figures" in line and line.startswith("=") for line in lines), out
    assert "calls refused (503) during the outage: 17" in lines and "duplicates: 0" in lines
    assert any("cut-active figures" in line for line in lines)
    assert "block committed -> hangup sent, s: 0.25" in lines
