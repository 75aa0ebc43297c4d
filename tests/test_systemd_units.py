"""The systemd units shipped in conf/systemd: the webhook deliverer and the anomaly job
run beside the daemon with the daemon's user, config, restart and sandboxing settings,
their ExecStart is a real `callctl ... --follow` command, SIGHUP is their reload, and
systemd itself accepts the files (systemd-analyze verify, where installed)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from callctl.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "conf" / "systemd"
JOBS = {"callctl-webhooks.service": ("webhook", "deliver"), "callctl-anomaly.service": ("anomaly", "run")}
# What the jobs share with the daemon's unit: who runs, where, the sandbox, the restart policy.
SHARED = ("User", "Group", "WorkingDirectory", "Environment", "NoNewPrivileges", "ProtectSystem", "ProtectHome",
          "PrivateTmp", "ReadWritePaths", "Restart", "KillSignal", "ExecReload")


def settings(path: Path) -> dict[str, str]:
    """section.key -> value of a unit file (no key repeats in ours)."""
    found, section = {}, ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            assert f"{section}.{key}" not in found, f"{path.name}: {key} twice"
            found[f"{section}.{key}"] = value
    return found


@pytest.mark.parametrize("unit", sorted(JOBS))
def test_job_units_run_follow_commands_with_the_daemons_settings(unit):
    daemon, job = settings(UNITS / "callctl-asterisk.service"), settings(UNITS / unit)
    for key in SHARED:
        assert job[f"Service.{key}"] == daemon[f"Service.{key}"], f"{unit}: {key}"
    assert job["Service.ExecReload"] == "/bin/kill -HUP $MAINPID" and job["Install.WantedBy"] == "multi-user.target"
    program, *argv = job["Service.ExecStart"].split()
    assert program == "/opt/callctl/bin/callctl" and tuple(argv[:2]) == JOBS[unit]
    args = build_parser().parse_args(argv)
    assert args.follow is True and args.func.__module__ == f"callctl.cli.{JOBS[unit][0]}"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_every_unit(tmp_path):
    callctl = Path(sys.executable).with_name("callctl")
    for unit in UNITS.glob("*.service"):  # ExecStart must exist for verify: this install's callctl
        (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/callctl/bin/callctl", str(callctl)))
    done = subprocess.run(["systemd-analyze", "verify", *sorted(map(str, tmp_path.glob("*.service")))],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    assert {p.name for p in tmp_path.glob("*.service")} >= set(JOBS)
