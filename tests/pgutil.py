"""The embedded PostgreSQL for integration tests, started and stopped as the supervisor does it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psycopg

from twllm.runtime.database import STOP_SIGNAL, EmbeddedPostgres, short_socket_dir
from twllm.runtime.ports import free_port


class Postgres:
    """One embedded PostgreSQL server in ``folder``."""

    def __init__(self, folder: Path) -> None:
        data = folder / "postgres"
        self.pg = EmbeddedPostgres(data, free_port(), short_socket_dir(data))
        self.log = folder / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.pg.url

    def start(self) -> None:
        self.pg.initialize()
        launch = self.pg.launch()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                launch.argv,
                env={**os.environ, **launch.env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while not self.pg.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self, sig: int = STOP_SIGNAL) -> None:
        """Stop it (SIGINT: a fast shutdown; SIGKILL for a crash), SIGKILL after 30 s."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


def sql(url: str, query: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []
