"""Drive the lab from Python: the Asterisk chroot (lab/lab.sh), a callctl daemon as a
real subprocess, and a lock so that tests, demo and bench never share the fixed ports
(SIP 5060, phones 5070, FastAGI 4573) at the same time.

Used by tests/test_lab_calls.py, lab/demo.py and bench/bench.py.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAB_SH = REPO / "lab" / "lab.sh"
AGI_HOST, AGI_PORT = "127.0.0.1", 4573
ESL_PORT = 8084  # callctl serve freeswitch in the FreeSWITCH lab
SIP_TARGET = "127.0.0.1:5060"
PHONE_PORT = 5070  # every outbound leg goes to the SIPp phone here
LOCK_FILE = Path(os.environ.get("CALLCTL_LAB_LOCK", "/tmp/callctl-lab.lock"))
CHROOT = Path(os.environ.get("CALLCTL_LAB_CACHE", "/var/cache/callctl")) / "asterisk-sid"
# The lab's CALLCTL_CDR_FALLBACK (conf/asterisk/extensions.conf), seen from the host.
CDR_FALLBACK = CHROOT / "var/spool/asterisk/callctl-cdr-fallback.txt"


class LabError(RuntimeError):
    pass


_held_here = 0  # LabLocks this process holds (nested ones share the first's flock)


class LabLock:
    """Exclusive use of the lab's fixed ports, machine-wide (flock: freed if we die)."""

    def __init__(self, wait: float = 1800.0):
        self.wait = wait
        self._fd: int | None = None

    def __enter__(self) -> "LabLock":
        global _held_here
        if _held_here:  # this process has the lab already: a second flock would wait for itself
            _held_here += 1
            return self
        self._fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + self.wait
        announced = False
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                _held_here = 1
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LabError(f"the lab is in use by another run (lock {LOCK_FILE})") from None
                if not announced:
                    print(f"lab: waiting for another run to release {LOCK_FILE}", file=sys.stderr)
                    announced = True
                time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        global _held_here
        _held_here -= 1
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def lab(command: str, *args: str, timeout: float = 600) -> str:
    """Run lab/lab.sh COMMAND; raise LabError with its output when it fails."""
    done = subprocess.run(["bash", str(LAB_SH), command, *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise LabError(f"lab.sh {command} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout


FS_SH = REPO / "lab" / "freeswitch.sh"
FS_SIP_TARGET = "127.0.0.1:5062"
FS_ESL = ("127.0.0.1", 8021, "ClueCon")  # the FreeSWITCH lab's inbound event socket


def fs_lab(command: str, timeout: float = 3600) -> str:
    """Run lab/freeswitch.sh COMMAND (build, up, down); LabError with its output on failure."""
    done = subprocess.run(["bash", str(FS_SH), command], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise LabError(f"freeswitch.sh {command} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout


def fs_api(command: str, timeout: float = 10.0) -> str:
    """One `api` command over the FreeSWITCH lab's inbound event socket; its response body."""
    host, port, password = FS_ESL
    with socket.create_connection((host, port), timeout=timeout) as sock:
        reader = sock.makefile("rb")

        def message() -> tuple[dict, bytes]:
            headers = {}
            while (line := reader.readline().rstrip(b"\n")):
                name, _, value = line.decode().partition(": ")
                headers[name] = value
            length = int(headers.get("Content-Length", "0"))
            return headers, reader.read(length) if length else b""

        message()  # auth/request
        sock.sendall(f"auth {password}\n\n".encode())
        if not message()[0].get("Reply-Text", "").startswith("+OK"):
            raise LabError("the FreeSWITCH lab refused the event socket password")
        sock.sendall(f"api {command}\n\n".encode())
        return message()[1].decode(errors="replace")


class Pbx:
    """One of the lab's PBXs, as the lab tests use it: where SIPp sends calls, how many
    channels are up, which daemon serves it, and how the CDRs it kept are imported."""

    def __init__(self, name: str, sip_target: str):
        self.name, self.sip_target = name, sip_target

    def __repr__(self) -> str:
        return self.name

    def up(self) -> None:
        lab("up") if self.name == "asterisk" else fs_lab("up")

    def down(self) -> None:
        lab("down") if self.name == "asterisk" else fs_lab("down")

    def active_channels(self) -> int:
        if self.name == "asterisk":
            return active_channels()
        out = fs_api("show channels count")
        for word in out.split():
            if word.isdigit():
                return int(word)
        raise LabError(f"unexpected 'show channels count' output: {out!r}")

    def hangup_all(self) -> None:
        """End every call on the PBX (as an operator would from its console)."""
        if self.name == "asterisk":
            asterisk_cli("channel request hangup all")
        else:
            fs_api("hupall NORMAL_CLEARING")

    def wait_no_channels(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while self.active_channels():
            if time.monotonic() > deadline:
                raise LabError(f"{self.name} still has active channels")
            time.sleep(0.1)

    def kept_cdrs(self) -> int:
        """CDRs the PBX keeps for `callctl cdr import-pbx` (no daemon took them)."""
        if self.name == "asterisk":
            return len(CDR_FALLBACK.read_text().splitlines()) if CDR_FALLBACK.exists() else 0
        count = fs_api("db count/callctl_cdr").strip()
        return int(count) if count.isdigit() else 0

    def forget_kept_cdrs(self) -> None:
        if self.name == "asterisk":
            CDR_FALLBACK.unlink(missing_ok=True)
            return
        for key in fs_api("db list/callctl_cdr").strip().split(","):
            if key and not key.startswith("-ERR"):  # "-ERR no reply": none kept
                fs_api(f"db delete/callctl_cdr/{key}")

    def kept_lines(self) -> dict[str, str]:
        """The CDRs the PBX keeps as they are (key -> line; Asterisk's file has one key)."""
        if self.name == "asterisk":
            return {"": CDR_FALLBACK.read_text()} if CDR_FALLBACK.exists() else {}
        keys = fs_api("db list/callctl_cdr").strip().split(",")
        return {key: fs_api(f"db select/callctl_cdr/{key}") for key in keys if key and not key.startswith("-ERR")}

    def restore_kept_lines(self, lines: dict[str, str]) -> None:
        """Put kept CDRs back as they were (a PBX retry, a restored backup)."""
        for key, line in lines.items():
            if self.name == "asterisk":
                CDR_FALLBACK.write_text(line)
            else:
                fs_api(f"db insert/callctl_cdr/{key}/{line}")

    def import_args(self) -> list[str]:
        """`callctl cdr import-pbx` arguments for this PBX."""
        return [str(CDR_FALLBACK)] if self.name == "asterisk" else ["--pbx", "freeswitch"]


ASTERISK = Pbx("asterisk", SIP_TARGET)
FREESWITCH = Pbx("freeswitch", FS_SIP_TARGET)


def asterisk_cli(command: str) -> str:
    return lab("cli", command, timeout=30)


def active_channels() -> int:
    out = asterisk_cli("core show channels count")
    for line in out.splitlines():
        if "active channel" in line:
            return int(line.split()[0])
    raise LabError(f"unexpected 'core show channels count' output: {out!r}")


def wait_no_channels(timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while active_channels():
        if time.monotonic() > deadline:
            raise LabError("Asterisk still has active channels")
        time.sleep(0.1)


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def _listeners(port: int, proto: str = "t") -> list[int]:
    out = subprocess.run(["ss", "-H", f"-l{proto}np", f"sport = :{port}"], capture_output=True, text=True).stdout
    return sorted({int(item[4:]) for item in out.replace(")", ",").split(",") if item.startswith("pid=")})


def clear_stale_phones(port: int = PHONE_PORT) -> None:
    """Kill a SIPp phone an earlier, killed run left on the phones' port."""
    for pid in _listeners(port, "u"):
        if Path(f"/proc/{pid}/comm").read_text().strip() == "sipp":
            os.kill(pid, signal.SIGKILL)


def free_agi_port(port: int = AGI_PORT) -> None:
    """Clear the FastAGI port of a daemon an earlier, killed run left behind; never
    touch a program that is not ours."""
    for pid in _listeners(port):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if not any(name in cmdline for name in ("callctl", "minimal_fastagi", "floor_fastagi")):
            raise LabError(f"TCP port {port} is held by another program (pid {pid}): {cmdline[:80]}")
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while port_open(AGI_HOST, port):
        if time.monotonic() > deadline:
            raise LabError(f"TCP port {port} did not free up")
        time.sleep(0.05)


class Process:
    """A FastAGI server subprocess on 127.0.0.1:4573 (or another port) with its output in a log file."""

    def __init__(self, argv: list[str], log_path: Path, env: dict | None = None, cwd: Path = REPO,
                 port: int = AGI_PORT):
        self.argv, self.log_path, self.env, self.cwd, self.port = argv, Path(log_path), env, cwd, port
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> "Process":
        if self.port in (AGI_PORT, ESL_PORT):
            free_agi_port(self.port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        env = {**os.environ, **(self.env or {})}
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.cwd,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while not port_open(AGI_HOST, self.port):
            if self.proc.poll() is not None:
                raise LabError(f"{self.argv[1:4]} exited ({self.proc.returncode}):\n{self.output()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise LabError(f"{self.argv[1:4]} not listening on {self.port} within {timeout} s")
            time.sleep(0.05)
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def __enter__(self) -> "Process":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def callctl_daemon(database_url: str, workdir: Path, log_format: str = "json", extra_env: dict | None = None,
                   port: int | None = None, pbx: str = "asterisk") -> Process:
    """`callctl serve asterisk|freeswitch` as an administrator would run it, configured by
    environment. Tests that do not need the lab's PBX pass a free port of their own."""
    workdir = Path(workdir)
    port = port or (AGI_PORT if pbx == "asterisk" else ESL_PORT)
    env = {
        "CALLCTL_CONFIG": str(REPO / "conf" / "callctl.yaml"),
        "CALLCTL_DATABASE_URL": database_url,
        "CALLCTL_SPOOL_DIR": str(workdir / "spool"),
        "CALLCTL_AGI_LISTEN" if pbx == "asterisk" else "CALLCTL_FREESWITCH_LISTEN": f"{AGI_HOST}:{port}",
        "CALLCTL_LOG_FORMAT": log_format,
        "CALLCTL_NODE": "lab",
        "CALLCTL_AUDIT_CHECKPOINT": str(workdir / "callctl.audit-head"),  # one per database
        # a port of its own: two daemons (or test runs) at once must not fight over 9464
        "CALLCTL_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
        **(extra_env or {}),
    }
    callctl = Path(sys.executable).with_name("callctl")
    argv = [str(callctl)] if callctl.exists() else [sys.executable, "-m", "callctl.cli"]
    return Process(argv + ["serve", pbx], workdir / "callctl.log", env=env, port=port)


def minimal_fastagi(workdir: Path) -> Process:
    """The floor of AGI cost: answers every call with one destination (bench/minimal_fastagi.py)."""
    return Process([sys.executable, str(REPO / "bench" / "minimal_fastagi.py"), f"{AGI_HOST}:{AGI_PORT}"],
                   Path(workdir) / "minimal_fastagi.log")


def floor_fastagi(workdir: Path, dsn: str) -> Process:
    """The floor of the durable work: one indexed read per route, one committed insert
    per hangup, written plainly (bench/floor_fastagi.py)."""
    return Process([sys.executable, str(REPO / "bench" / "floor_fastagi.py"), f"{AGI_HOST}:{AGI_PORT}", dsn],
                   Path(workdir) / "floor_fastagi.log")


def minimal_esl(workdir: Path) -> Process:
    """The floor of the event socket's cost: bridges every call to one destination
    (bench/minimal_esl.py), on the daemon's ESL port."""
    return Process([sys.executable, str(REPO / "bench" / "minimal_esl.py"), f"{AGI_HOST}:{ESL_PORT}"],
                   Path(workdir) / "minimal_esl.log", port=ESL_PORT)


def json_events(text: str) -> list[dict]:
    """The JSON log events in a daemon's output (other lines ignored)."""
    events = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
    return events


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ApiServer:
    """`callctl serve api` on a free loopback port, as an administrator would run it."""

    def __init__(self, database_url: str, workdir: Path, extra_env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(workdir) / "callctl-api.log"
        self.env = {
            **os.environ,
            "CALLCTL_CONFIG": str(REPO / "conf" / "callctl.yaml"),
            "CALLCTL_DATABASE_URL": database_url,
            "CALLCTL_API_LISTEN": f"127.0.0.1:{self.port}",
            "CALLCTL_LOG_FORMAT": "json",
            # one checkpoint per database (the default is relative to the repository)
            "CALLCTL_AUDIT_CHECKPOINT": str(Path(workdir) / "callctl.audit-head"),
            "CALLCTL_API_METRICS_LISTEN": f"127.0.0.1:{free_port()}",  # not the shared 9465
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ApiServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        callctl = Path(sys.executable).with_name("callctl")
        argv = [str(callctl)] if callctl.exists() else [sys.executable, "-m", "callctl.cli"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv + ["serve", "api"], stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=REPO, start_new_session=True)
        deadline = time.monotonic() + 20
        while not port_open("127.0.0.1", self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise LabError(f"callctl serve api did not start:\n{self.output()[-2000:]}")
            time.sleep(0.05)
        return self

    def __exit__(self, *_exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
