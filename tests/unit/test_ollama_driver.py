"""OllamaDriver without a server: finding the binary, the launch command, name matching, reading
progress streams, and a readiness probe against a closed port."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import httpx
import pytest

from twllm.errors import RuntimeFailure
from twllm.plan.model import EngineProcess
from twllm.runtime.engines.base import RuntimeContext
from twllm.runtime.engines.drivers import driver_for
from twllm.runtime.engines.ollama import (
    OllamaDriver,
    _create_from_gguf,
    _error_text,
    _follow,
    canonical_name,
    missing_models,
)
from twllm.runtime.ports import free_port
from twllm.settings import Settings


def make_proc(tmp_path: Path, port: int = 11434, provision: tuple[dict[str, str], ...] = ()) -> EngineProcess:
    env = {
        "OLLAMA_HOST": f"127.0.0.1:{port}",
        "OLLAMA_KEEP_ALIVE": "-1",
        "OLLAMA_MODELS": str(tmp_path / "state" / "ollama" / "models"),
        "OLLAMA_NUM_PARALLEL": "2",
    }
    return EngineProcess(
        id="ollama",
        engine="ollama",
        device="cpu",
        models=tuple(e["name"] for e in provision),
        argv=("ollama", "serve"),
        env=env,
        secret_env={},
        host="127.0.0.1",
        port=port,
        gpus=(),
        ready_url=f"http://127.0.0.1:{port}/api/tags",
        provision=provision,
    )


def make_ctx(tmp_path: Path) -> RuntimeContext:
    return RuntimeContext(state_dir=tmp_path / "state", secrets={})


def fake_executable(path: Path) -> Path:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def ndjson(*lines: dict) -> httpx.Response:
    return httpx.Response(200, content=b"".join(json.dumps(line).encode() + b"\n" for line in lines))


def test_driver_for_returns_the_ollama_driver() -> None:
    assert isinstance(driver_for("ollama"), OllamaDriver)


def test_missing_binary_on_path_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeFailure, match="no ollama executable on PATH") as err:
        OllamaDriver().launch(make_proc(tmp_path), make_ctx(tmp_path))
    assert "https://ollama.com/download" in (err.value.hint or "")
    assert "TWLLM_OLLAMA_BIN" in (err.value.hint or "")


def test_missing_configured_binary_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWLLM_OLLAMA_BIN", str(tmp_path / "nowhere" / "ollama"))
    with pytest.raises(RuntimeFailure, match=r"TWLLM_OLLAMA_BIN=.*nowhere/ollama"):
        OllamaDriver().launch(make_proc(tmp_path), make_ctx(tmp_path))


def test_not_executable_counts_as_missing(tmp_path: Path) -> None:
    plain = tmp_path / "ollama"
    plain.write_text("not a program")
    settings = Settings.from_env({"TWLLM_OLLAMA_BIN": str(plain)})
    with pytest.raises(RuntimeFailure):
        OllamaDriver(settings).launch(make_proc(tmp_path), make_ctx(tmp_path))


def test_launch_runs_serve_with_the_plan_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bin").mkdir()
    exe = fake_executable(tmp_path / "bin" / "ollama")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    proc = make_proc(tmp_path)
    launch = OllamaDriver().launch(proc, make_ctx(tmp_path))
    assert launch.argv == [str(exe), "serve"]
    assert launch.env == proc.env
    assert Path(proc.env["OLLAMA_MODELS"]).is_dir()


def test_launch_uses_twllm_ollama_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = fake_executable(tmp_path / "my-ollama")
    monkeypatch.setenv("TWLLM_OLLAMA_BIN", str(exe))
    assert OllamaDriver().launch(make_proc(tmp_path), make_ctx(tmp_path)).argv == [str(exe), "serve"]


@pytest.mark.parametrize(
    "given, listed",
    [
        ("phi4-mini", "phi4-mini:latest"),
        ("phi4-mini:latest", "phi4-mini:latest"),
        ("Phi4-Mini", "phi4-mini:latest"),
        ("qwen2.5:0.5b", "qwen2.5:0.5b"),
        ("library/llama3.2", "llama3.2:latest"),
        ("registry.ollama.ai/library/llama3.2:1b", "llama3.2:1b"),
        ("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M", "hf.co/bartowski/llama-3.2-1b-instruct-gguf:q4_k_m"),
        ("localhost:5000/team/model", "localhost:5000/team/model:latest"),
    ],
)
def test_canonical_name(given: str, listed: str) -> None:
    assert canonical_name(given) == listed


def test_missing_models_treats_tag_and_latest_alike() -> None:
    tags = {"models": [{"name": "phi4-mini:latest", "model": "phi4-mini:latest"}, {"model": "twllm-tiny:latest"}]}
    provision = [
        {"name": "phi4-mini", "pull": "phi4-mini"},
        {"name": "twllm-tiny:latest", "gguf": "/m.gguf"},
        {"name": "bge-m3", "pull": "bge-m3"},
    ]
    assert missing_models(provision, tags) == ["bge-m3"]
    assert missing_models([], {"models": []}) == []
    assert missing_models([{"name": "x", "pull": "x"}], {"unexpected": True}) == ["x"]
    assert missing_models([{"name": "x", "pull": "x"}], ["not", "an", "object"]) == ["x"]


def test_ready_is_false_when_nothing_listens(tmp_path: Path) -> None:
    proc = make_proc(tmp_path, port=free_port())
    assert OllamaDriver().ready(proc, make_ctx(tmp_path)) is False


def test_provision_gives_up_when_nothing_listens(tmp_path: Path) -> None:
    proc = make_proc(tmp_path, port=free_port(), provision=({"name": "phi4-mini", "pull": "phi4-mini"},))
    lines: list[str] = []
    with pytest.raises(RuntimeFailure, match="did not answer"):
        OllamaDriver(server_wait_s=0.3).provision(proc, make_ctx(tmp_path), lines.append)
    assert lines and lines[0].startswith("waiting for ollama")


def test_follow_reports_status_changes_and_thinned_percentages() -> None:
    layer = {"status": "pulling abababababab", "digest": "sha256:" + "ab" * 32, "total": 1000}
    stream = ndjson(
        {"status": "pulling manifest"},
        layer,  # no `completed` until bytes arrive
        *(layer | {"completed": c} for c in range(25, 1001, 25)),
        {"status": "verifying sha256 digest"},
        {"status": "writing manifest"},
        {"status": "success"},
    )
    lines: list[str] = []
    assert _follow(stream, lines.append) is None
    percents = [line for line in lines if line.startswith("pulling abab")]
    assert percents[0] == "pulling abababababab 0%" and percents[-1] == "pulling abababababab 100%"
    assert len(percents) == 11
    assert lines[0] == "pulling manifest" and lines[-3:] == ["verifying sha256 digest", "writing manifest", "success"]


def test_follow_returns_the_error_line() -> None:
    stream = ndjson({"status": "pulling manifest"}, {"error": "pull model manifest: file does not exist"})
    assert _follow(stream, lambda _: None) == "pull model manifest: file does not exist"


def test_follow_requires_success() -> None:
    failure = _follow(ndjson({"status": "pulling manifest"}), lambda _: None)
    assert failure == "the progress stream ended before 'success'"


def test_follow_reads_errors_before_the_stream() -> None:
    response = httpx.Response(500, json={"error": "something broke"})
    assert _follow(response, lambda _: None) == "something broke"


@pytest.mark.parametrize(
    "response, text",
    [
        (httpx.Response(404, json={"error": 'model "x" not found'}), 'model "x" not found'),
        (httpx.Response(404, json={"error": {"message": "nope", "type": "not_found_error"}}), "nope"),
        (httpx.Response(502, text="bad gateway"), "HTTP 502: bad gateway"),
        (httpx.Response(503), "HTTP 503"),
    ],
)
def test_error_text(response: httpx.Response, text: str) -> None:
    assert _error_text(response) == text


def test_missing_gguf_file_fails_before_any_upload(tmp_path: Path) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"unexpected request {request.method} {request.url}")

    with httpx.Client(transport=httpx.MockTransport(refuse), base_url="http://ollama") as client:
        with pytest.raises(RuntimeFailure, match="does not exist"):
            _create_from_gguf(client, "twllm-x", tmp_path / "absent.gguf", lambda _: None)


def test_wait_until_up_refuses_a_server_that_is_not_ollama(tmp_path: Path) -> None:
    def other(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>grafana</html>") if request.url.path == "/" else httpx.Response(404)

    proc = make_proc(tmp_path)
    with httpx.Client(transport=httpx.MockTransport(other), base_url="http://127.0.0.1:11434") as client:
        with pytest.raises(RuntimeFailure, match="not as Ollama"):
            OllamaDriver()._wait_until_up(client, proc, lambda _: None)
