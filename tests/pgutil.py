"""The embedded PostgreSQL for integration tests, started and stopped as the supervisor does it."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import psycopg

from twllm.deploy.database import STOP_SIGNAL, EmbeddedPostgres, short_socket_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """One embedded PostgreSQL server in ``folder``."""

    def __init__(self, folder: Path) -> None:
        data = folder / "postgres"
        self.pg = EmbeddedPostgres(data, _free_port(), short_socket_dir(data))
        self.log = folder / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.pg.url

    def start(self) -> None:
        self.pg.initialize()
        launch = self.pg.launch()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(launch.argv, env={**os.environ, **launch.env}, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while not self.pg.ready():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()[-2000:]
            time.sleep(0.05)

    def stop(self, sig: int = STOP_SIGNAL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(15)
        self.proc = None


def sql(url: str, query: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []
