"""Real SIPp against real SIPp on 127.0.0.1 (no Asterisk): the scenarios in
sipp_scenarios/ and the runner in lab/sipp.py."""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from lab import sipp

pytestmark = pytest.mark.skipif(shutil.which(sipp.SIPP) is None, reason="sipp not installed")

X = "+8657100000001"  # virtual number (presented to the far end)
A = "+8613800000001"  # customer's real number (dialled by the PBX)
C = "+8613900000002"  # calling party's real number: must never reach A
C_DIGITS = "13900000002"  # national significant digits: catches +86..., 0086..., 0...


def _no_sipp_left(*procs):
    for p in procs:
        assert p.proc.poll() is not None, "sipp still running"


def _target(uas):
    return f"127.0.0.1:{uas.local_port}"


def test_call_passes_checks(tmp_path):
    # SIPp-to-SIPp: the UAC plays the PBX's outbound leg (From = X, R-URI = A).
    with sipp.start_uas(port=None, expect_ruri=A, expect_from=X, forbidden=[C_DIGITS],
                        workdir=tmp_path / "uas") as uas:
        r = sipp.run_uac("uac_call", _target(uas), [(X, A)], talk_ms=100, timeout=15,
                         workdir=tmp_path / "uac")
        u = uas.stop()
    assert r.ok and r.status == "ok", (r, r.errors[-2000:])
    assert (r.attempted, r.successful, r.failed) == (1, 1, 0)
    assert u.ok and u.successful == 1 and u.failed == 0, (u, u.log)
    assert r.setup_ms_mean is not None and 0 <= r.setup_ms_mean < 1000
    assert r.remote_hangups == 0
    _no_sipp_left(uas)


@pytest.mark.parametrize(
    "uas_kwargs, call, why",
    [
        # the caller's number arrives in a P-Asserted-Identity header (display name too)
        ({"expect_ruri": A, "expect_from": X, "forbidden": [C_DIGITS]},
         (X, A, f'P-Asserted-Identity: "{C}" <sip:{C}@127.0.0.1>'), "forbidden number"),
        # ... or in the From header itself
        ({"expect_ruri": A, "forbidden": ["13700000000", C]}, (C, A), "forbidden number"),
        ({"expect_ruri": A, "expect_from": X}, (C, A), "from user"),
        ({"expect_ruri": "+8613800000009", "expect_from": X}, (X, A), "request-uri user"),
    ],
    ids=["pai-leak", "from-leak", "from-mismatch", "ruri-mismatch"],
)
def test_failed_check_fails_the_call(tmp_path, uas_kwargs, call, why):
    with sipp.start_uas(port=None, workdir=tmp_path / "uas", **uas_kwargs) as uas:
        r = sipp.run_uac("uac_call", _target(uas), [call], talk_ms=100, timeout=15,
                         workdir=tmp_path / "uac")
        u = uas.stop()
    assert u.returncode == 1 and u.status == "failed"
    assert u.failed == 1 and u.successful == 0
    assert f"callctl check failed: {why}" in u.log
    # the UAS answers 606, so the caller's call fails too
    assert r.returncode == 1 and r.failed == 1


def test_pai_option_adds_callers_number(tmp_path):
    with sipp.start_uas(port=None, forbidden=[C_DIGITS], workdir=tmp_path / "uas") as uas:
        r = sipp.run_uac("uac_call", _target(uas), [(C, A)], pai=True, talk_ms=100, timeout=15,
                         workdir=tmp_path / "uac")
        u = uas.stop()
    assert not r.ok and u.failed == 1
    assert "P-Asserted-Identity" in (tmp_path / "uac" / "calls.csv").read_text()


@pytest.mark.parametrize("expected, passes", [(404, True), (403, False)])
def test_reject_expectation(tmp_path, expected, passes):
    with sipp.start_uas(port=None, reply_code=404, early_media=True, workdir=tmp_path / "uas") as uas:
        r = sipp.run_uac("uac_expect_reject", _target(uas), [(C, X)], expect_code=expected,
                         timeout=15, workdir=tmp_path / "uac")
        u = uas.stop()
    assert u.ok, u  # the rejecting side got its ACK either way
    if passes:
        assert r.ok and r.successful == 1, (r, r.errors[-2000:])
        assert r.setup_ms_mean is not None
    else:
        assert r.returncode == 1 and r.failed == 1
        assert "expected final response 403, got 404" in r.log


def test_reject_expected_but_answered_fails(tmp_path):
    with sipp.start_uas(port=None, workdir=tmp_path / "uas") as uas:
        r = sipp.run_uac("uac_expect_reject", _target(uas), [(C, X)], expect_code=404,
                         timeout=15, workdir=tmp_path / "uac")
        uas.stop()
    assert r.returncode == 1 and r.failed == 1


def test_call_rejected_counts_failed(tmp_path):
    with sipp.start_uas(port=None, reply_code=503, workdir=tmp_path / "uas") as uas:
        r = sipp.run_uac("uac_call", _target(uas), [(C, X)], talk_ms=100, timeout=15,
                         workdir=tmp_path / "uac")
        u = uas.stop()
    assert r.returncode == 1 and r.failed == 1 and r.successful == 0
    assert u.ok


def test_far_end_hangs_up_first(tmp_path):
    # e.g. the PBX cutting the call at the maximum duration
    with sipp.start_uas(port=None, hangup_ms=300, workdir=tmp_path / "uas") as uas:
        r = sipp.run_uac("uac_call", _target(uas), [(X, A)] * 3, rate=20, talk_ms=5000,
                         timeout=15, workdir=tmp_path / "uac")
        u = uas.stop()
    assert r.ok and r.successful == 3, (r, r.errors[-2000:])
    assert u.ok and u.successful == 3
    assert r.remote_hangups == 3
    assert 250 <= r.answer_to_remote_bye_ms_mean <= 1500
    assert r.elapsed_s < 4  # did not sit out the 5 s talk time


def test_many_calls_from_injection_file(tmp_path):
    n = 150
    calls = [(f"+86139{i:08d}", f"+86571{i:08d}") for i in range(n)]
    with sipp.start_uas(port=None, forbidden=["13800000001"], workdir=tmp_path / "uas") as uas:
        r = sipp.run_uac("uac_call", _target(uas), calls, rate=150, talk_ms=100, timeout=20,
                         workdir=tmp_path / "uac")
        u = uas.stop()
    assert r.ok, (r, r.errors[-2000:])
    assert (r.attempted, r.successful, r.failed) == (n, n, 0)
    assert u.successful == n
    assert len(r.rtt[1]) == n  # one setup time per call
    assert 0 <= r.setup_ms_mean <= r.setup_ms_max < 2000
    assert r.setup_ms_p95 <= r.setup_ms_max
    # every call carried its own numbers
    text = (tmp_path / "uac" / "calls.csv").read_text()
    assert text.count("\n") == n + 1
    s = r.summary()
    assert s["attempted"] == n and s["setup_ms_mean"] == r.setup_ms_mean


def test_timeout_stops_sipp(tmp_path):
    # nobody listens: INVITE retransmits; our timeout must end sipp (no orphan)
    port = sipp.free_port()
    proc = sipp.start("uac_call", remote=f"127.0.0.1:{port}", calls=[(X, A)],
                      variables={"talk_ms": 100}, workdir=tmp_path)
    r = proc.wait(timeout=1.5)
    assert r.status == "timeout"
    assert not r.ok
    _no_sipp_left(proc)
    out = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert out.stdout.strip() == ""


def test_fatal_exit_is_reported(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text('<?xml version="1.0"?><scenario name="bad"><recv request="INVITE"/><nop><action>'
                   '<assign assign_to="never_used" value="1"/></action></nop></scenario>')
    r = sipp.run(bad, local_port=None, timeout=10, workdir=tmp_path / "w")
    # SIPp exits 1 (as for a failed call) when it refuses a scenario
    assert r.status == "fatal" and not r.ok
    assert "never_used" in r.screen


def test_scenarios_load(tmp_path):
    # every scenario parses: sipp refuses unused variables, variable status codes, an
    # optional receive before a <nop>... at load time and exits at once.
    for path in sorted(sipp.SCENARIO_DIR.glob("*.xml")):
        uac = path.name.startswith("uac")
        proc = sipp.start(path, remote=f"127.0.0.1:{sipp.free_port()}" if uac else None,
                          calls=[(X, A)] if uac else None, workdir=tmp_path / path.stem)
        time.sleep(0.4)
        alive = proc.running()
        r = proc.stop(grace=0.5)
        assert alive, (path.name, r.screen[-800:])
        _no_sipp_left(proc)
