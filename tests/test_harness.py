"""The lab lock: one run at a time machine-wide, but never waiting for itself."""
import subprocess
import sys

from lab import harness


def test_lab_lock_nests_in_one_process_and_excludes_others(tmp_path, monkeypatch):
    lock = tmp_path / "lab.lock"
    monkeypatch.setattr(harness, "LOCK_FILE", lock)
    other = [sys.executable, "-c",
             "import sys; from pathlib import Path; from lab import harness;"
             f"harness.LOCK_FILE = Path({str(lock)!r});"
             "\ntry:\n with harness.LabLock(wait=0.5): print('got')\n"
             "except harness.LabError: print('busy')"]
    with harness.LabLock():
        with harness.LabLock(wait=0.5):  # a module fixture inside the session's lock
            pass
        busy = subprocess.run(other, capture_output=True, text=True, cwd=harness.REPO, timeout=30)
        assert busy.stdout.strip() == "busy", busy.stderr
    free = subprocess.run(other, capture_output=True, text=True, cwd=harness.REPO, timeout=30)
    assert free.stdout.strip() == "got", free.stderr
