"""The gateway's entry point: what it hands uvicorn and its workers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from twllm.gateway import serve


def test_workers_inherit_the_fault_handler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that dies in C code leaves its Python stack in the gateway's log."""
    import uvicorn

    config = tmp_path / "litellm_config.yaml"
    config.write_text("model_list: []\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    monkeypatch.setattr(os, "environ", env)  # what main sets stays in this test
    ran: list[tuple[str, dict]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: ran.append((app, options)))
    monkeypatch.setattr(serve.sys, "path", list(serve.sys.path))
    serve.main(["--config", str(config), "--port", "4999", "--workers", "2"])
    assert ran and ran[0][0] == "twllm.gateway.asgi:app" and ran[0][1]["workers"] == 2
    assert env["PYTHONFAULTHANDLER"] == "1" and env["NUM_WORKERS"] == "2"
