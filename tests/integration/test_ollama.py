"""OllamaDriver end to end against the Ollama contract server (tests/ollama_contract.py, a fake
that follows Ollama's documented API), and against the real `ollama` binary where one is installed.

The fake runs as a process in place of the binary: TWLLM_OLLAMA_BIN points at a shell script that
execs `python tests/ollama_contract.py "$@"`, so `launch` resolves it, and the test starts the
command, provisions a pull and a GGUF upload, polls `ready` and stops the process group.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from ollama_contract import ContractServer, canned_reply

from twllm.errors import RuntimeFailure
from twllm.plan.model import EngineProcess
from twllm.runtime.engines.base import RuntimeContext
from twllm.runtime.engines.ollama import OllamaDriver
from twllm.runtime.ports import free_port

pytestmark = pytest.mark.integration

CONTRACT = Path(__file__).resolve().parents[1] / "ollama_contract.py"
READY_TIMEOUT_S = 15.0


def make_proc(state: Path, port: int, provision: tuple[dict[str, str], ...]) -> EngineProcess:
    env = {
        "OLLAMA_HOST": f"127.0.0.1:{port}",
        "OLLAMA_KEEP_ALIVE": "-1",
        "OLLAMA_MODELS": str(state / "ollama" / "models"),
        "OLLAMA_NUM_PARALLEL": "1",
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


def write_gguf(path: Path, size: int = 256 * 1024) -> Path:
    """Enough of a GGUF file for the fake: the magic, version 3, zero tensors and keys, padding."""
    header = b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") * 2
    path.write_bytes(header + bytes(size - len(header)))
    return path


@dataclass
class Running:
    driver: OllamaDriver
    proc: EngineProcess
    ctx: RuntimeContext
    popen: subprocess.Popen[bytes]
    log: Path
    progress: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proc.port}"

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not self.driver.ready(self.proc, self.ctx):
            assert self.popen.poll() is None, f"the server exited:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, f"not ready after {timeout} s:\n{self.log.read_text()}"
            time.sleep(0.1)


def start(proc: EngineProcess, tmp_path: Path) -> Running:
    driver = OllamaDriver(server_wait_s=READY_TIMEOUT_S)
    ctx = RuntimeContext(state_dir=tmp_path / "state", secrets={})
    launch = driver.launch(proc, ctx)
    log = tmp_path / "ollama.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            launch.argv,
            env={**os.environ, **launch.env},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Running(driver, proc, ctx, popen, log)


def stop(popen: subprocess.Popen[bytes]) -> None:
    if popen.poll() is None:
        os.killpg(popen.pid, signal.SIGTERM)
        try:
            popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait(timeout=5)


@pytest.fixture
def fake_ollama_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in `ollama` executable that runs the contract server; set as TWLLM_OLLAMA_BIN."""
    script = tmp_path / "bin" / "ollama"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{CONTRACT}" "$@"\n')
    script.chmod(0o755)
    monkeypatch.setenv("TWLLM_OLLAMA_BIN", str(script))
    return script


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    (tmp_path / "models").mkdir()
    return write_gguf(tmp_path / "models" / "tiny-q4.gguf")


@pytest.fixture
def launched(tmp_path: Path, fake_ollama_bin: Path, gguf: Path) -> Iterator[Running]:
    provision = ({"name": "phi4-mini", "pull": "phi4-mini"}, {"name": "twllm-tiny", "gguf": str(gguf)})
    running = start(make_proc(tmp_path / "state", free_port(), provision), tmp_path)
    try:
        yield running
    finally:
        stop(running.popen)


def test_launch_provision_and_ready(launched: Running) -> None:
    assert Path(launched.proc.env["OLLAMA_MODELS"]).is_dir()
    assert launched.driver.ready(launched.proc, launched.ctx) is False

    launched.driver.provision(launched.proc, launched.ctx, launched.progress.append)
    launched.wait_ready()

    tags = httpx.get(f"{launched.url}/api/tags", trust_env=False).json()
    assert {m["name"] for m in tags["models"]} == {"phi4-mini:latest", "twllm-tiny:latest"}
    lines = launched.progress
    assert "phi4-mini: pulling manifest" in lines
    assert any(line.startswith("phi4-mini: pulling ") and line.endswith("100%") for line in lines)
    assert "phi4-mini: success" in lines
    assert "twllm-tiny: hashing tiny-q4.gguf" in lines
    assert "twllm-tiny: uploading tiny-q4.gguf 100%" in lines
    assert "twllm-tiny: parsing GGUF" in lines and lines[-1] == "twllm-tiny: success"


def test_provision_again_pulls_and_uploads_nothing(launched: Running) -> None:
    launched.driver.provision(launched.proc, launched.ctx, launched.progress.append)
    again: list[str] = []
    launched.driver.provision(launched.proc, launched.ctx, again.append)
    assert again == ["phi4-mini: already in ollama", "twllm-tiny: already in ollama"]


def test_unknown_tag_fails_with_ollamas_message(tmp_path: Path, fake_ollama_bin: Path) -> None:
    proc = make_proc(tmp_path / "state", free_port(), ({"name": "no-such-model:7b", "pull": "no-such-model:7b"},))
    running = start(proc, tmp_path)
    try:
        with pytest.raises(RuntimeFailure, match="pull model manifest: file does not exist") as err:
            running.driver.provision(proc, running.ctx, running.progress.append)
        assert "no-such-model:7b" in str(err.value) and "ollama.com/library" in (err.value.hint or "")
        assert running.driver.ready(proc, running.ctx) is False
    finally:
        stop(running.popen)


def test_chat_and_embeddings_through_the_openai_api(launched: Running) -> None:
    from openai import OpenAI

    launched.driver.provision(launched.proc, launched.ctx, launched.progress.append)
    with httpx.Client(trust_env=False) as http:
        client = OpenAI(base_url=f"{launched.url}/v1", api_key="ollama", http_client=http)
        hi = [{"role": "user", "content": "hi"}]
        reply = client.chat.completions.create(model="twllm-tiny", messages=hi)
        assert reply.choices[0].message.content == canned_reply("twllm-tiny")
        streamed = client.chat.completions.create(model="phi4-mini", messages=hi, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == canned_reply("phi4-mini")
        vectors = client.embeddings.create(model="phi4-mini", input=["a", "b"])
        assert [len(d.embedding) for d in vectors.data] == [8, 8]
        missing = http.post(f"{launched.url}/v1/chat/completions", json={"model": "absent", "messages": []})
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == 'model "absent" not found, try pulling it first'


def test_sigterm_stops_the_stand_in(launched: Running) -> None:
    launched.driver.provision(launched.proc, launched.ctx, launched.progress.append)
    os.killpg(launched.popen.pid, signal.SIGTERM)
    assert launched.popen.wait(timeout=5) == 0


# --- the contract server itself keeps to Ollama's documented behaviour ----------------------


@pytest.fixture
def contract() -> Iterator[ContractServer]:
    with ContractServer(library=["phi4-mini"]) as server:
        yield server


def test_contract_blob_digest_is_checked(contract: ContractServer) -> None:
    body = b"GGUF" + bytes(100)
    right = "sha256:" + hashlib.sha256(body).hexdigest()
    wrong = "sha256:" + "0" * 64
    with httpx.Client(base_url=contract.url, trust_env=False) as http:
        assert http.head(f"/api/blobs/{right}").status_code == 404
        refused = http.post(f"/api/blobs/{wrong}", content=body)
        assert refused.status_code == 400 and refused.json()["error"].startswith("digest mismatch")
        assert http.post(f"/api/blobs/{right}", content=body).status_code == 201
        assert http.post(f"/api/blobs/{right}", content=body).status_code == 200
        assert http.head(f"/api/blobs/{right}").status_code == 200
        assert http.head("/api/blobs/sha256:short").status_code == 400


def test_contract_create_needs_uploaded_gguf_blobs(contract: ContractServer) -> None:
    text = b"not a gguf"
    digest = "sha256:" + hashlib.sha256(text).hexdigest()
    with httpx.Client(base_url=contract.url, trust_env=False) as http:
        missing = http.post("/api/create", json={"model": "m", "files": {"m.gguf": digest}})
        assert missing.status_code == 400 and "not found" in missing.json()["error"]
        http.post(f"/api/blobs/{digest}", content=text)
        wrong = http.post("/api/create", json={"model": "m", "files": {"m.gguf": digest}})
        assert wrong.json() == {"error": "supplied file was not in GGUF format"}
        neither = http.post("/api/create", json={"model": "m"})
        assert neither.json() == {"error": "neither 'from' or 'files' was specified"}
        absolute = http.post("/api/create", json={"model": "m", "files": {"/etc/m.gguf": digest}})
        assert absolute.json() == {"error": "file path must be relative"}


def test_contract_pull_and_native_chat(contract: ContractServer) -> None:
    with httpx.Client(base_url=contract.url, trust_env=False) as http:
        assert http.get("/").text == "Ollama is running"
        assert "version" in http.get("/api/version").json()
        absent = http.post("/api/chat", json={"model": "phi4-mini", "messages": [{"role": "user", "content": "hi"}]})
        assert absent.status_code == 404
        assert absent.json() == {"error": 'model "phi4-mini" not found, try pulling it first'}
        unknown = http.post("/api/pull", json={"model": "nope", "stream": False})
        assert unknown.status_code == 500 and unknown.json() == {"error": "pull model manifest: file does not exist"}
        pulled = http.post("/api/pull", json={"name": "phi4-mini"})  # the older field name still works
        lines = [json.loads(line) for line in pulled.text.splitlines()]
        assert lines[0] == {"status": "pulling manifest"} and lines[-1] == {"status": "success"}
        chat = http.post(
            "/api/chat",
            json={"model": "phi4-mini:latest", "stream": False, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert chat.json()["message"]["content"] == canned_reply("phi4-mini:latest")
        models = http.get("/api/tags").json()["models"]
        assert [(m["name"], m["model"]) for m in models] == [("phi4-mini:latest", "phi4-mini:latest")]


# --- the real binary ------------------------------------------------------------------------


@pytest.mark.ollama
@pytest.mark.skipif(shutil.which("ollama") is None, reason="needs the ollama binary, not installable here")
def test_real_ollama_serves_and_answers(tmp_path: Path) -> None:
    running = start(make_proc(tmp_path / "state", free_port(), ()), tmp_path)
    try:
        running.driver.provision(running.proc, running.ctx, running.progress.append)
        running.wait_ready(timeout=60)
        version = httpx.get(f"{running.url}/api/version", trust_env=False, timeout=5)
        assert version.status_code == 200 and version.json()["version"]
    finally:
        stop(running.popen)
