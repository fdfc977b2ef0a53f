"""Fixtures for the integration tier (the engine environment and demo models live in tests/conftest.py)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgutil import Postgres


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
