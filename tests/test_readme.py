"""README.md's examples, run as a newcomer would: every ```sh block from top to bottom as
one script, in a fresh checkout's layout (conf/ copied, nothing else) on a fresh SQLite
database, with no key ring in the environment (issue 15, item 15). A block that is not
meant to run is preceded by `<!-- not run by tests/test_readme.py: why -->`."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests import leaks, realnumbers

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
_BLOCK = re.compile(r"(?:^(<!--[^\n]*-->)\n)?^```sh\n(.*?)^```", re.M | re.S)


def readme_script() -> str:
    return "".join(body for comment, body in _BLOCK.findall(README.read_text())
                   if not (comment and "not run by tests/test_readme.py" in comment))


def register_readme_numbers(script: str) -> None:
    """The README's people (customers) for the leak check; its tenants' own lines and X are not."""
    for number in set(re.findall(r"\+86\d{9,11}", script)):
        if number.startswith("+86138"):
            realnumbers.person(number)
        elif not realnumbers.is_virtual(number):
            realnumbers.tenant_line(number)


# Each command's output is preceded by this marker line (bash's DEBUG trap), so the leak
# check sees every output under its own channel: `callctl tenant ...` answers a tenant's
# administrators with its own lines (channel "tenant"), everything else is CLI output.
_MARK = "@@readme-command@@ "


def record_outputs(output: str) -> None:
    """Hand each command's output to the leak check under the channel it belongs to."""
    for segment in output.split(_MARK)[1:]:
        command, _, text = segment.partition("\n")
        channel = "tenant" if command.startswith("callctl tenant ") else "cli"
        if text.strip():
            leaks.record(channel, f"README {command[:40]}", text)


def input_files(script: str, folder: Path) -> list[Path]:
    """The CSV files the examples write for the product to read (printf ... > FILE)."""
    return [folder / name for name in re.findall(r"^printf .*> (\S+\.csv)$", script, re.M)]


def test_readme_examples_run_top_to_bottom_on_a_fresh_database(tmp_path):
    script = readme_script()
    assert "callctl keys generate" in script.split("callctl tenant add")[0], "keys and schema come first"
    register_readme_numbers(script)
    leaks.test_input(*input_files(script, tmp_path))
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    env = {key: value for key, value in os.environ.items() if not key.startswith("CALLCTL_")}
    env["PATH"] = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    prologue = ("set -eo pipefail\nexec 2>&1\n"
                "trap 'echo \"README example failed at script line $LINENO\"' ERR\n"
                f"trap 'printf \"%s%s\\\\n\" \"{_MARK}\" \"$BASH_COMMAND\"' DEBUG\n")
    done = subprocess.run(["bash", "-c", prologue + script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    record_outputs(done.stdout)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "Traceback" not in done.stdout
    assert (tmp_path / "var" / "callctl.db").exists() and (tmp_path / "report.html").exists()
