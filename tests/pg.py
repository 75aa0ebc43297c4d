"""PostgreSQL for tests: the shared server on 127.0.0.1:5432 when it answers, else a
throwaway cluster started here (initdb + pg_ctl as the postgres user); each test
session gets a database of its own."""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import psycopg2

from callctl.store.db import make_engine

SHARED = "postgresql://postgres@127.0.0.1:5432/test"


def _answers(dsn: str) -> bool:
    try:
        psycopg2.connect(dsn, connect_timeout=3).close()
        return True
    except psycopg2.OperationalError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    """A private PostgreSQL cluster on a free loopback port; start() and stop() at will."""

    def __init__(self):
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not bins:
            raise RuntimeError("PostgreSQL server binaries not found; run 'make deps'")
        self.bindir = os.path.dirname(bins[-1])
        self.dir = tempfile.mkdtemp(prefix="callctl-pg-")
        shutil.chown(self.dir, "postgres")
        self.port = _free_port()
        self._as_postgres(["initdb", "-A", "trust", "-U", "postgres", "-D", f"{self.dir}/data"])

    def _as_postgres(self, argv: list[str]) -> None:
        command = [f"{self.bindir}/{argv[0]}", *argv[1:]]
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self._as_postgres([
            "pg_ctl", "-D", f"{self.dir}/data", "-l", f"{self.dir}/log", "-w", "-t", "30",
            "-o", f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off",
            "start",
        ])

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(["pg_ctl", "-D", f"{self.dir}/data", "-m", mode, "-w", "stop"])

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


class TestDatabase:
    """A fresh database for one test session, dropped afterwards."""

    __test__ = False  # not a test class, for pytest

    def __init__(self):
        self.cluster = None
        admin = SHARED
        if not _answers(admin):
            self.cluster = PgCluster()
            self.cluster.start()
            admin = self.cluster.dsn
        self.admin = admin
        self.name = f"callctl_test_{uuid.uuid4().hex[:10]}"
        self._admin_sql(f'CREATE DATABASE "{self.name}"')
        self.url = "postgresql+psycopg2://" + admin.split("://", 1)[1].rsplit("/", 1)[0] + "/" + self.name

    def _admin_sql(self, sql: str) -> None:
        conn = psycopg2.connect(self.admin)
        conn.autocommit = True
        try:
            conn.cursor().execute(sql)
        finally:
            conn.close()

    def drop(self) -> None:
        from sqlalchemy import create_engine

        from tests import leaks

        engine = create_engine(self.url)
        leaks.record_tables(engine, self.name)  # the leak check sees its CDRs after the drop
        engine.dispose()
        for _ in range(3):
            try:
                self._admin_sql(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
                break
            except psycopg2.Error:
                time.sleep(0.5)
        if self.cluster:
            self.cluster.destroy()


def empty_database_url(request, workdir) -> str:
    """The URL of an empty database of the kind request.param names: a new SQLite file
    in workdir, or the session's PostgreSQL database with its schema reset."""
    if request.param == "sqlite":
        return f"sqlite:///{workdir}/callctl.db"
    url = request.getfixturevalue("pg_url")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    engine.dispose()
    return url
