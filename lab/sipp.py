"""Run SIPp scenarios (sipp_scenarios/) from Python: a plain subprocess wrapper.

- ``run_uac(...)`` places calls and waits for SIPp to finish.
- ``start_uas(...)`` starts a far-end phone in the background; ``.stop()`` ends it.
- ``run(...)`` / ``start(...)`` are the generic forms (any scenario, any options).

Every run gets its own temp directory (``SippResult.workdir``) holding the
injection file, the statistics CSV (``-trace_stat -stf``), per-call response
times (``-trace_rtt``), the error log, the ``<log>`` output and the final screen.
The result is parsed from those files; the SIPp exit code is mapped to a status.

Timing conventions of the scenarios (see sipp_scenarios/README.md):
  ResponseTime1 = INVITE sent -> 200 OK (setup time; for uac_expect_reject: -> final)
  ResponseTime2 = ACK sent -> BYE received from the far end
  GenericCounter1 = calls the far end hung up

No sipp process outlives its handle: timeouts, exceptions and garbage all end
the process group. The numbers handed to SIPp are the test's own data; this
module never logs them.
"""
from __future__ import annotations

import csv
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

SCENARIO_DIR = Path(
    os.environ.get("CALLCTL_SIPP_SCENARIOS", Path(__file__).resolve().parent.parent / "sipp_scenarios")
)
SIPP = os.environ.get("CALLCTL_SIPP", "sipp")

EXIT_STATUS = {
    0: "ok",  # all calls successful
    1: "failed",  # at least one call failed
    97: "internal_exit",  # exit on internal command; calls may have been processed
    99: "no_calls",  # normal exit without calls processed
    255: "fatal",  # -1: fatal error (bad scenario, bad option, ...)
    254: "bind_error",  # -2: fatal error binding a socket
}


class SippError(RuntimeError):
    """SIPp could not be started or did not produce usable output."""


def free_port(host: str = "127.0.0.1") -> int:
    """A UDP port that is free right now on host (UDP is what SIPp binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def scenario_path(scenario: str | os.PathLike) -> Path:
    """A scenario name ('uac_call' or 'uac_call.xml') from sipp_scenarios/, or a path."""
    p = Path(scenario)
    if p.exists():
        return p.resolve()
    name = p.name if p.suffix == ".xml" else p.name + ".xml"
    q = SCENARIO_DIR / name
    if not q.exists():
        raise FileNotFoundError(f"no SIPp scenario {scenario!r} (looked in {SCENARIO_DIR})")
    return q


def _duration_ms(value: str) -> float | None:
    """SIPp's 'HH:MM:SS:uuuuuu' (or plain seconds/ms numbers) to milliseconds."""
    if not value:
        return None
    parts = value.split(":")
    try:
        if len(parts) == 4:
            h, m, s, us = (int(x) for x in parts)
            ms = ((h * 60 + m) * 60 + s) * 1000 + us / 1000
            # SIPp prints garbage like 2562047788015:12:55:808000 for an undefined stdev
            return ms if h < 10_000 else None
        return float(value)
    except ValueError:
        return None


def _int(row: dict, key: str) -> int:
    try:
        return int(float(row.get(key) or 0))
    except ValueError:
        return 0


@dataclass
class SippResult:
    scenario: str
    returncode: int | None
    # ok / failed / no_calls / internal_exit / fatal / bind_error (from the exit code),
    # timeout (our timeout hit) / terminated (we had to SIGTERM it) / killed
    status: str
    workdir: Path
    stats: dict = field(default_factory=dict)  # last row of the stat CSV (cumulative columns)
    rtt: dict = field(default_factory=dict)  # rtd number -> list of per-call ms
    errors: str = ""  # SIPp's error log (-trace_err), may be long
    log: str = ""  # <log> action output (-trace_logs); check failures land here
    screen: str = ""  # final screen (-trace_screen)
    elapsed_s: float = 0.0

    # --- counts (cumulative) ---
    @property
    def created(self) -> int:
        return _int(self.stats, "TotalCallCreated")

    attempted = created

    @property
    def successful(self) -> int:
        return _int(self.stats, "SuccessfulCall(C)")

    @property
    def failed(self) -> int:
        return _int(self.stats, "FailedCall(C)")

    @property
    def current(self) -> int:
        return _int(self.stats, "CurrentCall")

    @property
    def retransmissions(self) -> int:
        return _int(self.stats, "Retransmissions(C)")

    @property
    def remote_hangups(self) -> int:
        """Calls the far end hung up (uac_call GenericCounter1)."""
        return _int(self.stats, "GenericCounter1(C)")

    @property
    def failure_reasons(self) -> dict[str, int]:
        out = {}
        for k, v in self.stats.items():
            if k.startswith("Failed") and k.endswith("(C)") and k != "FailedCall(C)":
                n = _int(self.stats, k)
                if n:
                    out[k[len("Failed") : -3]] = n
        return out

    @property
    def ok(self) -> bool:
        """SIPp exited 0 by itself: every call it made was successful."""
        return self.status == "ok"

    # --- times (ms) ---
    def response_ms_mean(self, rtd: int = 1) -> float | None:
        per_call = self.rtt.get(rtd)
        if per_call:
            return statistics.fmean(per_call)
        return _duration_ms(self.stats.get(f"ResponseTime{rtd}(C)", ""))

    def response_ms_max(self, rtd: int = 1) -> float | None:
        per_call = self.rtt.get(rtd)
        return max(per_call) if per_call else None

    def response_ms_percentile(self, pct: float, rtd: int = 1) -> float | None:
        return percentile(self.rtt.get(rtd) or [], pct)

    @property
    def setup_ms_mean(self) -> float | None:
        """Mean INVITE -> 200 OK (final response for uac_expect_reject), ms."""
        return self.response_ms_mean(1)

    @property
    def setup_ms_max(self) -> float | None:
        return self.response_ms_max(1)

    @property
    def setup_ms_p95(self) -> float | None:
        return self.response_ms_percentile(95, 1)

    @property
    def answer_to_remote_bye_ms_mean(self) -> float | None:
        """Mean ACK -> far-end BYE (calls cut by the far end), ms."""
        return self.response_ms_mean(2) if self.remote_hangups else None

    @property
    def answer_to_remote_bye_ms_max(self) -> float | None:
        return self.response_ms_max(2) if self.remote_hangups else None

    @property
    def call_length_ms_mean(self) -> float | None:
        return _duration_ms(self.stats.get("CallLength(C)", ""))

    def summary(self) -> dict:
        """Numbers only (safe for our logs and benchmark tables)."""
        return {
            "scenario": self.scenario,
            "status": self.status,
            "returncode": self.returncode,
            "attempted": self.created,
            "successful": self.successful,
            "failed": self.failed,
            "failure_reasons": self.failure_reasons,
            "setup_ms_mean": self.setup_ms_mean,
            "setup_ms_max": self.setup_ms_max,
            "setup_ms_p95": self.setup_ms_p95,
            "remote_hangups": self.remote_hangups,
            "retransmissions": self.retransmissions,
            "elapsed_s": round(self.elapsed_s, 3),
        }

    def __repr__(self) -> str:  # keep numbers out of reprs: no log/errors text
        return f"SippResult({self.summary()!r}, workdir={str(self.workdir)!r})"


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile (pct in 0..100) of values; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = math.ceil(len(ordered) * pct / 100)
    return float(ordered[min(len(ordered), max(rank, 1)) - 1])


def _write_injection(path: Path, calls: Iterable[Sequence[str]]) -> int:
    n = 0
    with open(path, "w", encoding="ascii", newline="\n") as f:
        f.write("SEQUENTIAL\n")
        for call in calls:
            fields = [str(x) for x in call]
            for x in fields:
                if ";" in x or "\n" in x:
                    raise ValueError("injection fields must not contain ';' or newlines")
            while len(fields) < 5:  # the UACs read field0..field4 (three optional header lines)
                fields.append("")
            f.write(";".join(fields) + "\n")
            n += 1
    if n == 0:
        raise ValueError("calls must not be empty")
    return n


def _read(path: Path, limit: int = 200_000) -> str:
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            return f.read(limit)
    except FileNotFoundError:
        return ""


class SippProcess:
    """One running sipp. Use as a context manager, or call wait()/stop()."""

    def __init__(self, scenario: Path, args: list[str], workdir: Path, keep_workdir: bool | None,
                 netns: str | None = None):
        self.scenario = scenario
        self.workdir = workdir
        self.keep_workdir = keep_workdir
        self.stat_file = workdir / "stat.csv"
        self.netns = netns
        self.cmd = [
            *(["ip", "netns", "exec", netns] if netns else []),  # exec's: the pid stays sipp's
            SIPP,
            "-sf", str(scenario),
            "-nostdin",
            "-trace_stat", "-stf", str(self.stat_file), "-fd", "1",
            "-trace_rtt", "-rtt_freq", "1",
            "-trace_err", "-error_file", str(workdir / "errors.log"),
            "-trace_logs", "-log_file", str(workdir / "logs.log"),
            "-trace_screen", "-screen_file", str(workdir / "screen.log"),
            *args,
        ]
        self._stdout = open(workdir / "stdout.log", "wb")
        self.started = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=workdir,  # -trace_rtt writes <scenario>_<pid>_rtt.csv into the cwd
                stdin=subprocess.DEVNULL,
                stdout=self._stdout,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: we can always kill it all
            )
        except OSError as e:
            self._stdout.close()
            raise SippError(f"cannot start {SIPP}: {e}") from e
        self.result: SippResult | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float | None = None) -> SippResult:
        """Wait for sipp to exit by itself; past timeout, stop it (status 'timeout')."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return self.stop(grace=0.5, status="timeout")
        except BaseException:
            self.kill()
            raise
        return self._finish()

    def stop(self, grace: float = 3.0, status: str | None = None) -> SippResult:
        """End sipp. SIGUSR1 (= pressing 'q': no new calls, current ones may end),
        after grace seconds SIGTERM (sipp writes its stats and exits 0 at once, so
        the status becomes 'terminated'), and SIGKILL as the last resort ('killed')."""
        if self.result is not None:
            return self.result
        steps = ((signal.SIGUSR1, grace, None), (signal.SIGTERM, 2.0, "terminated"), (signal.SIGKILL, 5.0, "killed"))
        for sig, wait_s, forced_status in steps:
            if self.proc.poll() is not None:
                break
            self._signal(sig)
            if forced_status and status is None:
                status = forced_status
            try:
                self.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
        return self._finish(status)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self._signal(signal.SIGKILL)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if not self._stdout.closed:
            self._stdout.close()

    def _finish(self, status: str | None = None) -> SippResult:
        if self.result is not None:
            return self.result
        self.kill()  # no-op when already gone; closes stdout
        rc = self.proc.returncode
        if rc is not None and rc < 0:  # killed by a signal
            status = status or "killed"
        res = SippResult(
            scenario=self.scenario.name,
            returncode=rc,
            status=status or EXIT_STATUS.get(rc, f"exit_{rc}"),
            workdir=self.workdir,
            elapsed_s=time.monotonic() - self.started,
        )
        res.stats = self._parse_stats()
        res.rtt = self._parse_rtt()
        res.errors = _read(self.workdir / "errors.log")
        res.log = _read(self.workdir / "logs.log")
        res.screen = _read(self.workdir / "screen.log")
        if not res.stats and res.status == "failed":
            # SIPp also exits 1 when it refuses the scenario or an option at load
            # time (before any statistics exist): that is no failed call.
            res.status = "fatal"
        if not res.screen or res.status == "fatal":
            res.screen = _read(self.workdir / "stdout.log")  # load errors are printed here
        self.result = res
        keep = self.keep_workdir if self.keep_workdir is not None else not res.ok
        if not keep:
            self.cleanup()
        return res

    def _parse_stats(self) -> dict:
        try:
            with open(self.stat_file, newline="") as f:
                rows = list(csv.reader(f, delimiter=";"))
        except FileNotFoundError:
            return {}
        if len(rows) < 2:
            return {}
        header = rows[0]
        last = rows[-1]
        return {k: v for k, v in zip(header, last) if k}

    def _parse_rtt(self) -> dict[int, list[float]]:
        out: dict[int, list[float]] = {}
        for path in self.workdir.glob("*_rtt.csv"):
            with open(path, newline="") as f:
                for row in csv.reader(f, delimiter=";"):
                    if len(row) < 3 or not row[1] or not row[1].replace(".", "", 1).isdigit():
                        continue
                    try:
                        out.setdefault(int(row[2]), []).append(float(row[1]))
                    except ValueError:
                        continue
        return out

    def cleanup(self) -> None:
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "SippProcess":
        return self

    def __exit__(self, *exc) -> None:
        if self.result is None:
            if exc[0] is None:
                self.stop()
            else:
                self.kill()

    def __del__(self):  # last resort: never leave a sipp behind
        try:
            if self.proc.poll() is None:
                self._signal(signal.SIGKILL)
        except Exception:
            pass


def _set_args(variables: dict | None) -> list[str]:
    args: list[str] = []
    for k, v in (variables or {}).items():
        if v is None:
            continue
        args += ["-set", str(k), str(v)]
    return args


def start(
    scenario: str | os.PathLike,
    *,
    remote: str | None = None,
    local_ip: str = "127.0.0.1",
    local_port: int | None = None,
    variables: dict | None = None,
    calls: Iterable[Sequence[str]] | None = None,
    max_calls: int | None = None,
    rate: float | None = None,
    rate_period_ms: int = 1000,
    limit: int | None = None,
    sipp_timeout_s: float | None = None,
    extra_args: Sequence[str] = (),
    workdir: str | os.PathLike | None = None,
    keep_workdir: bool | None = None,
    netns: str | None = None,
) -> SippProcess:
    """Start sipp in the background (generic). calls -> injection file (-inf):
    rows of (caller, called[, extra header line]).

    workdir: where sipp's files go (default: a new temp dir). keep_workdir: True
    keep, False remove once the result is parsed; None (default): keep a given
    workdir always, a temp dir only when the run was not ok (for a post-mortem).
    netns: run inside that network namespace (`ip netns exec`; give local_port)."""
    sc = scenario_path(scenario)
    if keep_workdir is None and workdir is not None:
        keep_workdir = True
    wd = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"sipp-{sc.stem}-"))
    wd.mkdir(parents=True, exist_ok=True)
    port = local_port or free_port(local_ip)  # in a netns: free here, likely free there
    args: list[str] = []
    if remote:
        args.append(remote)
    args += ["-i", local_ip, "-p", str(port)]
    if calls is not None:
        n = _write_injection(wd / "calls.csv", calls)
        args += ["-inf", str(wd / "calls.csv")]
        if max_calls is None:
            max_calls = n
    if max_calls is not None:
        args += ["-m", str(max_calls)]
    if rate is not None:
        args += ["-r", f"{rate:g}", "-rp", f"{rate_period_ms}ms"]
    if limit is not None:
        args += ["-l", str(limit)]
    if sipp_timeout_s is not None:
        args += ["-timeout", f"{sipp_timeout_s:g}s", "-timeout_error"]
    args += _set_args(variables)
    args += list(extra_args)
    proc = SippProcess(sc, args, wd, keep_workdir, netns)
    proc.local_port = port
    return proc


def run(scenario: str | os.PathLike, *, timeout: float = 60.0, **kwargs) -> SippResult:
    """Run sipp in the foreground until it exits or timeout seconds pass."""
    proc = start(scenario, **kwargs)
    try:
        return proc.wait(timeout=timeout)
    finally:
        proc.kill()


def run_uac(
    scenario: str | os.PathLike = "uac_call",
    target: str = "127.0.0.1:5060",
    calls: Sequence[Sequence[str]] | None = None,
    *,
    count: int | None = None,
    caller: str | None = None,
    called: str | None = None,
    rate: float = 10.0,
    limit: int | None = None,
    talk_ms: int | None = None,
    expect_code: int | None = None,
    pai: bool = False,
    timeout: float = 60.0,
    variables: dict | None = None,
    **kwargs,
) -> SippResult:
    """Place calls at target and wait for the result.

    calls: [(caller, called), ...] or (caller, called, extra_header[, header, header]); the injection
    file is reused round-robin when count > len(calls). Or caller+called and count.
    expect_code: for uac_expect_reject (the final code that must come back).
    pai: add 'P-Asserted-Identity: <sip:caller@local-ip>' (what carriers send).
    """
    if calls is None:
        if caller is None or called is None:
            raise ValueError("give calls=[(caller, called), ...] or caller= and called=")
        calls = [(caller, called)]
    rows = []
    local_ip = kwargs.get("local_ip", "127.0.0.1")
    for c in calls:
        c = list(c)
        if pai and (len(c) < 3 or not c[2]):
            c = c[:2] + [f"P-Asserted-Identity: <sip:{c[0]}@{local_ip}>"]
        rows.append(c)
    if expect_code is None and Path(str(scenario)).stem == "uac_expect_reject":
        raise ValueError("uac_expect_reject needs expect_code")
    v = dict(variables or {})
    if talk_ms is not None:
        v["talk_ms"] = int(talk_ms)
    if expect_code is not None:
        v["expect_code"] = int(expect_code)
    return run(
        scenario,
        remote=target,
        calls=rows,
        max_calls=count if count is not None else len(rows),
        rate=rate,
        limit=limit,
        variables=v,
        timeout=timeout,
        **kwargs,
    )


def start_uas(
    port: int | None = 5070,
    *,
    scenario: str | os.PathLike = "uas_check",
    expect_ruri: str | None = None,
    expect_from: str | None = None,
    forbidden: Sequence[str] | str | None = None,
    hangup_ms: int | None = None,
    reply_code: int | None = None,
    early_media: bool = False,
    max_calls: int | None = None,
    local_ip: str = "127.0.0.1",
    variables: dict | None = None,
    ready_timeout: float = 5.0,
    **kwargs,
) -> SippProcess:
    """Start the far-end phone (uas_check, or uas_reject with reply_code) in the
    background on local_ip:port (port=None: a free port, see .local_port).
    forbidden: numbers (digit strings) that must appear nowhere in the INVITE."""
    v = dict(variables or {})
    if expect_ruri:
        v["expect_ruri"] = expect_ruri
    if expect_from:
        v["expect_from"] = expect_from
    if forbidden:
        items = [forbidden] if isinstance(forbidden, str) else list(forbidden)
        for x in items:
            if not x or "," in x or "#" in x:
                raise ValueError("forbidden entries must be non-empty and contain no ',' or '#'")
        v["forbidden"] = ",".join(items)
    if hangup_ms:
        v["hangup_ms"] = int(hangup_ms)
    if reply_code is not None:
        if Path(str(scenario)).stem == "uas_check":
            scenario = "uas_reject"
        v["reply_code"] = int(reply_code)
    if early_media:
        v["early_media"] = 1
    proc = start(scenario, local_ip=local_ip, local_port=port, variables=v, max_calls=max_calls, **kwargs)
    _wait_bound(proc, local_ip, proc.local_port, ready_timeout)
    return proc


def _bound_in(netns: str, host: str, port: int) -> bool:
    out = subprocess.run(["ip", "netns", "exec", netns, "ss", "-Hlun", f"sport = :{port}"],
                         capture_output=True, text=True).stdout
    return f"{host}:{port}" in out


def _bound_here(host: str, port: int) -> bool:
    """Is a UDP socket bound to host:port (or the wildcard) on this host? Read from the
    kernel's table: probing by binding the port ourselves would hold it, for an instant,
    just when sipp binds it (sipp then fails with 'Address already in use')."""
    wanted = {f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}", f"00000000:{port:04X}"}
    with open("/proc/net/udp") as table:
        next(table)
        return any(line.split()[1] in wanted for line in table)


def _wait_bound(proc: SippProcess, host: str, port: int, timeout: float) -> None:
    """Return once sipp holds the UDP port (so calls sent next are not lost)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.running():
            res = proc.wait(timeout=1)
            raise SippError(f"sipp UAS exited at start: status {res.status}: {res.screen[-500:]}")
        if _bound_in(proc.netns, host, port) if proc.netns else _bound_here(host, port):
            return
        time.sleep(0.02)
    proc.kill()
    raise SippError(f"sipp UAS did not bind {host}:{port} within {timeout}s")


__all__ = [
    "SippError",
    "SippProcess",
    "SippResult",
    "free_port",
    "percentile",
    "run",
    "run_uac",
    "scenario_path",
    "start",
    "start_uas",
]
