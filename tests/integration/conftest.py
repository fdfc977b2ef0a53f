"""Fixtures for the integration tier (the engine environment and demo models live in tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from pgutil import Postgres, free_port

from twllm.runtime.database import STOP_SIGNAL, EmbeddedPostgres


@pytest.fixture(scope="session")
def tiny_chat_model(demo_models: Path) -> Path:
    """twllm's demo chat model: random weights, a tokenizer trained on the spot, head_dim 32."""
    return demo_models / "twllm-demo-chat"


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """An embedded PostgreSQL with twllm's migrations applied, one per test module."""
    from twllm.accounting.migrate import migrate

    server = Postgres(tmp_path_factory.mktemp("pg"))
    server.start()
    migrate(server.url)
    yield server
    server.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedPostgres]:
    """An embedded PostgreSQL on a free port for one test module (databases per test: ``url``).

    Its folder is not under pytest's tmp_path: as root, postgres runs as another user, and a
    concurrent pytest run resets /tmp/pytest-of-root to mode 0700, cutting a running server off."""
    root = Path(tempfile.mkdtemp(prefix="twllm-it-pg-"))
    pg = EmbeddedPostgres(root / "postgres", free_port())
    pg.initialize()
    launch = pg.launch()
    with (root / "postgres.log").open("ab") as log:
        proc = subprocess.Popen(
            launch.argv,
            env={**os.environ, **launch.env},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    began = time.monotonic()
    while not pg.ready():
        if proc.poll() is not None or time.monotonic() - began > 30:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"postgres never became ready:\n{(root / 'postgres.log').read_text()[-3000:]}")
        time.sleep(0.05)
    yield pg
    os.killpg(proc.pid, STOP_SIGNAL)
    proc.wait(30)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def url(server: EmbeddedPostgres) -> Iterator[str]:
    """A fresh, empty database of its own for one test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield server.url.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(server.url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
