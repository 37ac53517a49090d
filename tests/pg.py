"""A throwaway PostgreSQL server for tests: the session fixture ``postgres_url``.

It runs Debian's PostgreSQL binaries (``initdb``/``pg_ctl`` on PATH, else /usr/lib/postgresql/<ver>/bin)
on a fresh data directory in a temp dir, listening on 127.0.0.1 at a free port with its unix socket in the
same temp dir, trusts local connections (loopback only, deleted afterwards), creates database
``tpsexplore_test`` and yields ``postgresql://postgres@127.0.0.1:<port>/tpsexplore_test`` (the plain form the
README shows: SQLAlchemy 2.1 opens it with psycopg 3, a dependency of tpsexplore). PostgreSQL
refuses to run as root, so as root the server runs as the ``postgres`` user (or ``nobody``) and the temp dir
is chowned to it. Every step has a timeout. If no server can be started the tests using the fixture are
skipped with the reason, unless ``TPSX_REQUIRE_POSTGRES=1`` makes that a failure (use it in CI).
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

DB_NAME = "tpsexplore_test"
SUPERUSER = "postgres"
STEP_TIMEOUT_S = 60


class PostgresUnavailable(RuntimeError):
    """No throwaway server could be started here; the message says why."""


@dataclass
class PostgresServer:
    """A running throwaway server; `stop` shuts it down and deletes its files."""

    bin_dir: Path
    root: Path
    port: int
    user: pwd.struct_passwd | None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def url(self, database: str = DB_NAME) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def run(self, *args: str, timeout: float = STEP_TIMEOUT_S) -> subprocess.CompletedProcess:
        """Run a PostgreSQL binary as the server's user; output goes to files (a daemon keeps no pipe open)."""
        out_path = self.root / f"{args[0]}.out"
        kwargs = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        env = {**os.environ, "HOME": str(self.root), "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
        env.pop("PGDATA", None)
        with open(out_path, "wb") as out:
            proc = subprocess.run([str(self.bin_dir / args[0]), *args[1:]], stdin=subprocess.DEVNULL,
                                  stdout=out, stderr=subprocess.STDOUT, cwd=self.root, env=env,
                                  timeout=timeout, check=False, **kwargs)
        proc.stdout = out_path.read_text(errors="replace")
        if self.user is not None:
            try:
                os.chown(out_path, self.user.pw_uid, self.user.pw_gid)
            except OSError:
                pass
        return proc

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            try:
                self.run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "20", timeout=30)
            except (subprocess.TimeoutExpired, OSError):
                pass
            _kill_postmaster(self.data_dir)
        shutil.rmtree(self.root, ignore_errors=True)


def find_bin_dir() -> Path | None:
    """Directory with initdb, pg_ctl and postgres: PATH first, then the newest /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("initdb")
    candidates = [Path(os.path.realpath(on_path)).parent] if on_path else []
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                      key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
                      reverse=True)
    candidates += [Path(p) for p in versions]
    for cand in candidates:
        if all((cand / exe).is_file() and os.access(cand / exe, os.X_OK) for exe in ("initdb", "pg_ctl",
                                                                                    "postgres")):
            return cand
    return None


def _server_user() -> pwd.struct_passwd | None:
    """None when not root; else an unprivileged account to run PostgreSQL as."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresUnavailable("running as root and neither user 'postgres' nor 'nobody' exists to run "
                              "PostgreSQL as")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_postmaster(data_dir: Path) -> None:
    """Last resort when pg_ctl stop failed: SIGQUIT, then SIGKILL the postmaster of ``data_dir``."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    for sig in (signal.SIGQUIT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        for _ in range(50):
            time.sleep(0.1)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def start_postgres() -> PostgresServer:
    """Start a throwaway server and create database DB_NAME; raise PostgresUnavailable saying why not."""
    try:
        import psycopg
    except ImportError:
        raise PostgresUnavailable("psycopg 3 is not installed (pip install 'psycopg[binary]')") from None
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise PostgresUnavailable("PostgreSQL server binaries not found (initdb/pg_ctl/postgres on PATH or in "
                                  "/usr/lib/postgresql/*/bin; apt-get install postgresql-15)")
    user = _server_user()
    base = "/tmp" if os.path.isdir("/tmp") else None  # short path: unix socket paths are limited to ~100 bytes
    root = Path(tempfile.mkdtemp(prefix="tpsx-pg-", dir=base))
    server = PostgresServer(bin_dir=bin_dir, root=root, port=0, user=user)
    try:
        os.chmod(root, 0o700)
        if user is not None:
            os.chown(root, user.pw_uid, user.pw_gid)
        try:
            init = server.run("initdb", "-D", str(server.data_dir), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8",
                              "--no-sync")
        except subprocess.TimeoutExpired:
            raise PostgresUnavailable(f"initdb did not finish within {STEP_TIMEOUT_S} s") from None
        if init.returncode != 0:
            raise PostgresUnavailable(f"initdb failed (exit {init.returncode}): {_tail(init.stdout)}")
        last = ""
        for _attempt in range(3):  # the free port may be taken between probing and binding
            server.port = _free_port()
            options = (f"-c listen_addresses=127.0.0.1 -p {server.port} -c unix_socket_directories={root} "
                       "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=40")
            try:
                start = server.run("pg_ctl", "start", "-D", str(server.data_dir), "-l", str(root / "server.log"),
                                   "-w", "-t", "30", "-o", options, timeout=45)
            except subprocess.TimeoutExpired:
                _kill_postmaster(server.data_dir)
                raise PostgresUnavailable("pg_ctl start did not return within 45 s") from None
            if start.returncode == 0:
                break
            log = (root / "server.log").read_text(errors="replace") if (root / "server.log").exists() else ""
            last = _tail(log or start.stdout)
            _kill_postmaster(server.data_dir)
        else:
            raise PostgresUnavailable(f"pg_ctl start failed: {last}")
        try:
            with psycopg.connect(host="127.0.0.1", port=server.port, user=SUPERUSER, dbname="postgres",
                                 connect_timeout=10, autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {DB_NAME}")
        except psycopg.Error as e:
            raise PostgresUnavailable(f"cannot create database {DB_NAME}: {' '.join(str(e).split())}") from None
        return server
    except BaseException:
        server.stop()
        raise


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of an empty database on a throwaway local PostgreSQL server (skips if none can be started)."""
    try:
        server = start_postgres()
    except PostgresUnavailable as e:
        if os.environ.get("TPSX_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL test server unavailable (TPSX_REQUIRE_POSTGRES=1): {e}")
        pytest.skip(f"PostgreSQL test server unavailable: {e}")
    try:
        yield server.url()
    finally:
        server.stop()
