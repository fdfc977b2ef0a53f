"""`twllm eval zh-tw` against a real vLLM CPU engine serving twllm's tiny demo chat model.

The engine is started the way tests/integration/test_vllm_engine.py does (VllmDriver from a real
plan); the command talks to its OpenAI-compatible endpoint with the engine key.
"""

from __future__ import annotations

import csv
import json
import socket

import pytest
import typer
from test_vllm_engine import ENGINE_KEY, engine_of, serving, tiny_chat_yaml
from typer.testing import CliRunner

from twllm.cli.app import main
from twllm.cli.eval_cmds import eval_app
from twllm.zh_tw.evaluate import EndpointUnreachable
from twllm.zh_tw.report import ANSWER_COLUMNS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

PROMPTS = 20


def test_eval_against_the_tiny_model_writes_csvs_and_a_chart(
    vllm_cpu_env, tiny_chat_model, tmp_path, monkeypatch, capsys
):
    proc = engine_of(tiny_chat_yaml(tiny_chat_model), tmp_path)
    monkeypatch.setenv("TINY_ENGINE_KEY", ENGINE_KEY)
    out = tmp_path / "eval"
    with serving(proc, vllm_cpu_env, tmp_path / "vllm.log") as running:
        code = main(
            [
                "eval",
                "zh-tw",
                "--endpoint",
                running.base,
                "--model",
                "tiny-chat",
                "--limit",
                str(PROMPTS),
                "--max-tokens",
                "16",
                "--concurrency",
                "4",
                "--api-key-env",
                "TINY_ENGINE_KEY",
                "--out",
                str(out),
                "--json",
            ]
        )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    (figures,) = json.loads(captured.out)["models"]
    assert figures["model"] == "tiny-chat"
    assert (figures["prompts"], figures["answers"], figures["errors"]) == (PROMPTS, PROMPTS, 0)
    for name in ("simplified_before", "simplified_after", "mainland_before", "mainland_after"):
        assert 0.0 <= figures[name] <= 1.0, name
    assert figures["simplified_after"] == 0.0  # whatever the random model says, normalize leaves no Simplified
    assert 0 < figures["latency_p50_ms"] <= figures["latency_p90_ms"]

    with (out / "zh_tw_eval.csv").open(encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert tuple(reader.fieldnames or ()) == ANSWER_COLUMNS
    assert len(rows) == PROMPTS
    assert [row["prompt_id"] for row in rows[:2]] == ["cs-001", "cs-002"]
    assert all(row["ok"] == "1" and int(row["answer_chars"]) > 0 for row in rows)
    with (out / "zh_tw_summary.csv").open(encoding="utf-8") as handle:
        (summary,) = list(csv.DictReader(handle))
    assert summary["model"] == "tiny-chat" and 0 <= float(summary["simplified_before"]) <= 1
    assert (out / "zh_tw_eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for path in out.iterdir():
        assert ENGINE_KEY not in path.read_text(encoding="utf-8", errors="replace")
    assert ENGINE_KEY not in captured.out + captured.err


def test_an_unreachable_endpoint_is_a_clear_error_naming_the_url():
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = typer.Typer()
    app.add_typer(eval_app, name="eval")
    result = CliRunner().invoke(app, ["eval", "zh-tw", "--endpoint", f"http://127.0.0.1:{port}", "--model", "m"])
    assert isinstance(result.exception, EndpointUnreachable)
    assert result.exception.exit_code == 3
    assert f"http://127.0.0.1:{port}/v1/models" in result.exception.message
