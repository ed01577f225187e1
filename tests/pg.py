"""A real PostgreSQL for the suite: Debian's server binaries, a throw-away cluster in a temporary
directory, run as an unprivileged user (PostgreSQL refuses to run as root), fsync off.

It listens on a unix socket in its directory and on 127.0.0.1 at a free port; each test gets a
database of its own (`fresh_database`) so tests never see each other's rows.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

TEST_USER = "meshnode-test"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries here (run `scripts/setup --test`)."""


def bindir() -> Path:
    """The newest installed server's bin directory (Debian keeps initdb out of PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise PostgresUnavailable("initdb not found: install Debian's postgresql (scripts/setup --test)")


def _run_as() -> tuple[int, int] | None:
    """(uid, gid) to run the server as when we are root: a system user made for it, else nobody."""
    if os.getuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(TEST_USER)
    except KeyError:
        try:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
                           capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            pass   # no useradd here: nobody will do, in a directory made for it
        try:
            pw = pwd.getpwnam(TEST_USER)
        except KeyError:
            pw = pwd.getpwnam("nobody")
    return pw.pw_uid, pw.pw_gid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PostgresServer:
    root: Path
    port: int
    owner: tuple[int, int] | None
    _bin: Path
    _names = itertools.count(1)

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    def url(self, database: str = "postgres", unix: bool = False) -> str:
        if unix:
            return f"postgresql://postgres@/{database}?host={self.socket_dir}&port={self.port}"
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        kwargs = {}
        if self.owner:
            kwargs = {"user": self.owner[0], "group": self.owner[1], "extra_groups": []}
        return subprocess.run([str(self._bin / "pg_ctl"), "-D", str(self.root / "data"), *args],
                              capture_output=True, text=True, check=check, timeout=60, **kwargs)

    @classmethod
    def start(cls) -> "PostgresServer":
        bin_ = bindir()
        owner = _run_as()
        root = Path(tempfile.mkdtemp(prefix="meshnode-pg-"))
        os.chmod(root, 0o700)
        (root / "sock").mkdir()
        if owner:
            for p in (root, root / "sock"):
                os.chown(p, *owner)
        kwargs = {"user": owner[0], "group": owner[1], "extra_groups": []} if owner else {}
        subprocess.run([str(bin_ / "initdb"), "-D", str(root / "data"), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--locale=C", "--no-sync"],
                       capture_output=True, text=True, check=True, timeout=120, cwd=root, **kwargs)
        last = ""
        for _ in range(5):   # the free port may be taken between probing and binding: try another
            server = cls(root, _free_port(), owner, bin_)
            opts = (f"-F -k {root / 'sock'} -h 127.0.0.1 -p {server.port} -c synchronous_commit=off"
                    " -c full_page_writes=off -c max_connections=200 -c shared_buffers=32MB")
            done = server._ctl("-o", opts, "-l", str(root / "server.log"), "-w", "-t", "60", "start", check=False)
            if done.returncode == 0:
                return server
            last = done.stderr + (root / "server.log").read_text(errors="replace")[-2000:]
        shutil.rmtree(root, ignore_errors=True)
        raise PostgresUnavailable(f"PostgreSQL did not start: {last}")

    def stop(self) -> None:
        self._ctl("-m", "immediate", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def admin_sql(self, sql: str) -> None:
        import psycopg
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql)

    def fresh_database(self) -> str:
        """A new empty database; returns its URL."""
        name = f"t{os.getpid()}_{next(self._names)}"
        self.admin_sql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1].split("?")[0]
        self.admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
