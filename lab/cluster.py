"""A many-node deployment on one machine, for the failover test: network namespaces
this module creates and removes, joined by veth pairs to a bridge in a namespace of
their own (no interface in the host's namespace, so no traffic leaves the machine):

    pbx1 10.77.0.1   Asterisk (the lab chroot, own config/run/log dirs) + callctl daemon + SIPp
    pbx2 10.77.0.2   the same
    db1  10.77.0.11  PostgreSQL primary (the server binaries in /usr/lib/postgresql/*/bin)
    db2  10.77.0.12  its streaming replica (PostgreSQL's own replication, pg_basebackup -R)

Each namespace has its own loopback, so every Asterisk and daemon uses the lab's usual
ports (SIP 5060, phones 5070, FastAGI 4573, metrics 9464) on 127.0.0.1 inside its host.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab.harness import CHROOT, REPO, LabError

SUBNET = "10.77.0"
ADDRESSES = {"pbx1": f"{SUBNET}.1", "pbx2": f"{SUBNET}.2", "db1": f"{SUBNET}.11", "db2": f"{SUBNET}.12"}


def _run(argv: list[str], check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(argv[:6])} failed ({done.returncode}): {done.stderr[-1500:]}")
    return done


class Namespaces:
    """The hosts above, named <prefix>-<host>, plus <prefix>-sw holding the bridge."""

    def __init__(self, prefix: str | None = None):
        self.prefix = prefix or f"cc{os.getpid()}"
        self.switch = f"{self.prefix}-sw"

    def name(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def exec(self, host: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name(host), *argv]

    def create(self) -> "Namespaces":
        try:
            _run(["ip", "netns", "add", self.switch])
            _run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
            _run(["ip", "-n", self.switch, "link", "set", "br0", "up"])
            for index, (host, address) in enumerate(ADDRESSES.items()):
                ns = self.name(host)
                _run(["ip", "netns", "add", ns])
                _run(["ip", "-n", ns, "link", "set", "lo", "up"])
                # Both ends are made inside the host's namespace, then one is moved: the
                # host's own namespace never holds either.
                _run(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{index}"])
                _run(["ip", "-n", ns, "link", "set", f"p{index}", "netns", self.switch])
                _run(["ip", "-n", self.switch, "link", "set", f"p{index}", "master", "br0", "up"])
                _run(["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0"])
                _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        except BaseException:
            self.destroy()
            raise
        return self

    def pids(self, host: str) -> list[int]:
        out = _run(["ip", "netns", "pids", self.name(host)], check=False).stdout
        return [int(pid) for pid in out.split()]

    def kill_all(self, host: str, sig: int = signal.SIGKILL) -> list[int]:
        """Every process in a host: the machine is lost."""
        pids = self.pids(host)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pids

    def destroy(self) -> None:
        for host in ADDRESSES:
            self.kill_all(host)
        deadline = time.monotonic() + 10
        while any(self.pids(host) for host in ADDRESSES) and time.monotonic() < deadline:
            time.sleep(0.1)
        for ns in [self.name(host) for host in ADDRESSES] + [self.switch]:
            _run(["ip", "netns", "del", ns], check=False)


class Postgres:
    """One PostgreSQL server in a host namespace, run as the postgres user."""

    def __init__(self, nets: Namespaces, host: str, base: Path):
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not bins:
            raise LabError("PostgreSQL server binaries not found; run 'make deps'")
        self.bindir = os.path.dirname(bins[-1])
        self.nets, self.host = nets, host
        self.address = ADDRESSES[host]
        self.dir = base / host
        self.dir.mkdir(parents=True)
        shutil.chown(self.dir, "postgres")
        self.data = self.dir / "data"

    def _as_postgres(self, argv: list[str], netns: bool = True, **kw) -> subprocess.CompletedProcess:
        command = ["runuser", "-u", "postgres", "--", f"{self.bindir}/{argv[0]}", *argv[1:]]
        return _run(self.nets.exec(self.host, command) if netns else command, **kw)

    def init_primary(self) -> None:
        self._as_postgres(["initdb", "-A", "trust", "-U", "postgres", "-D", str(self.data)], netns=False)
        with open(self.data / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {SUBNET}.0/24 trust\nhost replication all {SUBNET}.0/24 trust\n")

    def init_replica(self, primary: "Postgres") -> None:
        """A streaming replica of `primary` (pg_basebackup -R writes standby.signal and
        primary_conninfo)."""
        self._as_postgres(["pg_basebackup", "-h", primary.address, "-U", "postgres", "-D", str(self.data),
                           "-R", "-X", "stream", "-c", "fast"])

    def start(self, settings: dict[str, str] | None = None) -> None:
        options = {"listen_addresses": self.address, "port": "5432", "unix_socket_directories": str(self.dir),
                   "wal_level": "replica", "max_wal_senders": "5", "hot_standby": "on",
                   "cluster_name": self.host, **(settings or {})}
        opts = " ".join(f"-c {key}={value}" for key, value in options.items())
        self._as_postgres(["pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "-t", "60",
                           "-o", opts, "start"])

    def promote(self) -> None:
        self._as_postgres(["pg_ctl", "-D", str(self.data), "-w", "-t", "60", "promote"])

    def sql(self, statement: str, database: str = "postgres") -> str:
        """One statement through psql from inside the host; its output, tuples only."""
        return _run(self.nets.exec(self.host, [f"{self.bindir}/psql", "-h", self.address, "-U", "postgres",
                                               "-d", database, "-Atc", statement])).stdout.strip()

    def stop(self) -> None:
        self._as_postgres(["pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"], check=False)


class Asterisk:
    """One Asterisk from the shared lab chroot in a host namespace, with its own
    config, run, log, spool and database directories (asterisk -C)."""

    def __init__(self, nets: Namespaces, host: str):
        self.nets, self.host = nets, host
        self.inside = f"/tmp/callctl-{nets.prefix}/{host}"  # as Asterisk in the chroot sees it
        self.root = CHROOT / self.inside.lstrip("/")
        self.conf = f"{self.inside}/etc/asterisk.conf"
        self.fallback = self.root / "spool/callctl-cdr-fallback.txt"
        self.proc: subprocess.Popen | None = None

    def install(self) -> None:
        if not (CHROOT / "usr/sbin/asterisk").exists():
            raise LabError(f"no lab chroot at {CHROOT}: run 'bash lab/lab.sh build'")
        etc = self.root / "etc"
        for sub in ("etc", "run", "log", "spool", "db", "cache"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for conf in (REPO / "conf" / "asterisk").glob("*"):
            shutil.copy(conf, etc)
        shutil.copy(REPO / "dialplan" / "asterisk" / "extensions_callctl.conf", etc)
        text = (etc / "asterisk.conf").read_text()
        for key, sub in (("astetcdir", "etc"), ("astrundir", "run"), ("astlogdir", "log"), ("astspooldir", "spool"),
                         ("astdbdir", "db"), ("astcachedir", "cache")):
            text = re.sub(rf"^{key} => .*$", f"{key} => {self.inside}/{sub}", text, flags=re.M)
        text = re.sub(r"^systemname = \w+", f"systemname = {self.host}", text, flags=re.M)
        # The lab's [directories](!) is a template, i.e. ignored: this instance's must be read.
        text = text.replace("[directories](!)", "[directories]")
        (etc / "asterisk.conf").write_text(text)
        dialplan = (etc / "extensions.conf").read_text()
        dialplan = re.sub(r"^CALLCTL_CDR_FALLBACK = \S+", f"CALLCTL_CDR_FALLBACK = {self.inside}/spool/"
                          "callctl-cdr-fallback.txt", dialplan, flags=re.M)
        (etc / "extensions.conf").write_text(dialplan)

    def start(self, timeout: float = 60) -> None:
        log = open(self.root / "log" / "console.log", "ab")
        argv = self.nets.exec(self.host, ["chroot", str(CHROOT), "/usr/sbin/asterisk", "-f", "-n", "-U", "root",
                                          "-G", "root", "-C", self.conf])
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise LabError(f"Asterisk on {self.host} exited at start")
            if (self.root / "run" / "asterisk.ctl").exists() and \
                    self.cli("core waitfullybooted", check=False).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise LabError(f"Asterisk on {self.host} not up within {timeout} s")
            time.sleep(0.2)

    def cli(self, command: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(["chroot", str(CHROOT), "/usr/sbin/asterisk", "-C", self.conf, "-rx", command],
                    check=check, timeout=30)

    def channels(self) -> int:
        out = self.cli("core show channels count").stdout
        return int(next(line.split()[0] for line in out.splitlines() if "active channel" in line))

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.cli("core stop now", check=False)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def remove(self) -> None:
        shutil.rmtree(self.root.parent, ignore_errors=True)


class Daemon:
    """`callctl serve asterisk` inside a host namespace, configured by environment."""

    def __init__(self, nets: Namespaces, host: str, database_url: str, workdir: Path, extra_env: dict | None = None):
        self.nets, self.host = nets, host
        self.log_path = workdir / f"callctl-{host}.log"
        self.env = {
            **os.environ,
            "CALLCTL_CONFIG": str(REPO / "conf" / "callctl.yaml"),
            "CALLCTL_DATABASE_URL": database_url,
            "CALLCTL_SPOOL_DIR": str(workdir / f"spool-{host}"),
            "CALLCTL_AGI_LISTEN": "127.0.0.1:4573",
            "CALLCTL_METRICS_LISTEN": "127.0.0.1:9464",
            "CALLCTL_LOG_FORMAT": "json",
            "CALLCTL_NODE": host,
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen | None = None

    def argv(self, *args: str) -> list[str]:
        callctl = Path(sys.executable).with_name("callctl")
        base = [str(callctl)] if callctl.exists() else [sys.executable, "-m", "callctl.cli"]
        return self.nets.exec(self.host, base + list(args))

    def start(self, timeout: float = 30) -> "Daemon":
        starts = self.output().count('"serving FastAGI"')
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv("serve", "asterisk"), stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=REPO, start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.output().count('"serving FastAGI"') == starts:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"daemon on {self.host} did not start:\n{self.output()[-2000:]}")
            time.sleep(0.1)
        return self

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """A callctl command run from this host, against the same database."""
        return _run(self.argv(*args), check=check, env=self.env, cwd=REPO)

    def http(self, path: str) -> tuple[int, str]:
        """GET the daemon's metrics listener (/metrics, /healthz) from inside its host."""
        fetch = ("import sys, urllib.request, urllib.error\n"
                 "try:\n r = urllib.request.urlopen('http://127.0.0.1:9464' + sys.argv[1], timeout=10)\n"
                 " print(r.status); print(r.read().decode())\n"
                 "except urllib.error.HTTPError as e:\n print(e.code); print(e.read().decode())\n")
        out = _run(self.nets.exec(self.host, [sys.executable, "-c", fetch, path])).stdout
        status, _, body = out.partition("\n")
        return int(status), body

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.terminate()
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, name: str | None = None) -> list[dict]:
        events = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if name is None or event.get("event") == name:
                    events.append(event)
        return events


def workdir(prefix: str = "callctl-cluster-") -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)  # the postgres user works in its own directories below
    return path
