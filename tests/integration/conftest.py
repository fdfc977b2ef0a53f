"""Fixtures for the integration tier (the engine environment and demo models live in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_chat_model(demo_models: Path) -> Path:
    """twllm's demo chat model: random weights, a tokenizer trained on the spot, head_dim 32."""
    return demo_models / "twllm-demo-chat"
