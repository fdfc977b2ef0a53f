"""The fast path's choices, without a network: which models it serves, which requests it leaves
to LiteLLM, and which replica it picks. (Its answers are compared with a real engine's in
tests/integration/test_fast_path.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from twllm.gateway import forward, readiness
from twllm.plan.build import make_plan
from twllm.plan.placement import GpuInventory
from twllm.render.litellm_config import litellm_config
from twllm.spec.resolve import parse_spec

ENV = {"TWLLM_MASTER_KEY": "sk-forward-master-0123", "TWLLM_ENGINE_API_KEY": "sk-engine-key-0123"}
SPEC = """
name: fwd
gateway:
  master_key: ${TWLLM_MASTER_KEY}
  num_retries: 2
  aliases: {taide: taide-8b}
  fallbacks: {llama: [taide-8b]}
models:
  - {name: taide-8b, model: llama-3.1-taide-lx-8b-chat, replicas: 2}
  - {name: llama, model: llama-3.2-1b-instruct}
  - {name: limited, model: llama-3.2-1b-instruct, rpm: 60}
  - {name: phi, model: phi-4-mini-instruct, engine: ollama}
  - {name: bge, model: bge-m3, task: embed}
"""
GUARDED = SPEC.replace("models:", "guard: {input: [pii]}\nmodels:", 1)


def config_of(text: str) -> dict[str, Any]:
    loaded = parse_spec(text, "fwd.yaml", ENV)
    plan = make_plan(loaded, GpuInventory(8, 80, "test"), Path("/state"))
    return litellm_config(plan, loaded.spec)


def test_the_table_holds_plain_vllm_models_and_their_aliases() -> None:
    table = forward.load_table(config_of(SPEC), ENV)
    assert table.num_retries == 2
    # llama has fallbacks, limited a per-model rate limit, phi is Ollama's: LiteLLM serves them
    assert set(table.groups) == {"taide-8b", "taide", "bge"}
    taide = table.groups["taide-8b"]
    assert table.groups["taide"] is taide and taide.mode == "chat" and table.groups["bge"].mode == "embedding"
    assert [r.served for r in taide.replicas] == ["taide-8b", "taide-8b"]
    assert [r.api_key for r in taide.replicas] == ["sk-engine-key-0123"] * 2
    assert len({r.url for r in taide.replicas}) == 2 and all(r.url.endswith("/v1") for r in taide.replicas)


def test_a_guard_or_a_mock_answer_leaves_everything_to_litellm() -> None:
    assert not forward.load_table(config_of(GUARDED), ENV)
    config = config_of(SPEC)
    for entry in config["model_list"]:
        if entry["model_name"] == "bge":
            entry["litellm_params"]["mock_response"] = "x"
    assert "bge" not in forward.load_table(config, ENV).groups


class Accounts:
    """The accounting, standing in: admits every key but the master key, records nothing."""

    def __init__(self) -> None:
        self.admitted: list[tuple[str, str, str]] = []

    async def admit(self, api_key: str, route: str, model: str) -> forward.Admission | None:
        if api_key == ENV["TWLLM_MASTER_KEY"]:
            return None
        self.admitted.append((api_key, route, model))
        raise forward.Refused(forward.errors.make(401, "no", "invalid_api_key"))

    def settle(self, outcome: forward.Outcome) -> None:
        raise AssertionError("nothing is forwarded here")


@pytest.mark.parametrize(
    ("path", "body", "key", "served"),
    [
        ("/v1/chat/completions", {"model": "taide", "messages": []}, "sk-t", True),
        ("/chat/completions", {"model": "taide-8b", "messages": [], "stream": True}, "sk-t", True),
        ("/v1/embeddings", {"model": "bge", "input": "x"}, "sk-t", True),
        ("/v1/chat/completions", {"model": "taide", "messages": []}, ENV["TWLLM_MASTER_KEY"], False),
        ("/v1/chat/completions", {"model": "taide", "messages": []}, None, False),
        ("/v1/chat/completions", {"model": "taide", "messages": [], "metadata": {}}, "sk-t", False),
        ("/v1/chat/completions", {"model": "taide", "messages": [], "stream": 1}, "sk-t", False),
        ("/v1/chat/completions", {"model": "taide", "stream_options": {"include_usage": True}}, "sk-t", False),
        ("/v1/chat/completions", {"model": "llama", "messages": []}, "sk-t", False),
        ("/v1/chat/completions", {"model": "bge", "messages": []}, "sk-t", False),
        ("/v1/embeddings", {"model": "bge", "input": "x", "stream": False}, "sk-t", False),
        ("/v1/chat/completions", {"model": ["taide"], "messages": []}, "sk-t", False),
        ("/v1/responses", {"model": "taide", "input": "x"}, "sk-t", False),
    ],
)
def test_what_the_fast_path_takes(path: str, body: dict, key: str | None, served: bool) -> None:
    """``served``: the fast path answers (here: the stand-in accounting's 401); else it leaves the
    request untouched to LiteLLM (nothing sent, no key checked)."""
    import orjson

    accounts = Accounts()
    forward.register(accounts)
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    fw = forward.Forwarder(forward.load_table(config_of(SPEC), ENV))
    try:
        took = asyncio.run(fw.serve(path, {"headers": headers}, orjson.dumps(body), receive, send))
    finally:
        forward._accounts = None
    assert took is served
    assert (sent[0]["status"] if sent else None) == (401 if served else None)
    assert bool(accounts.admitted) is served


def test_bearer_reads_only_the_bearer_scheme() -> None:
    assert forward.bearer({"headers": [(b"Authorization", b"Bearer  sk-abc ")]}) == "sk-abc"
    assert forward.bearer({"headers": [(b"authorization", b"bearer sk-abc")]}) == "sk-abc"
    assert forward.bearer({"headers": [(b"authorization", b"Basic eDp5")]}) is None
    assert forward.bearer({"headers": [(b"x-api-key", b"sk-abc")]}) is None


def test_pick_prefers_the_least_busy_replica_that_answers_its_probe_and_takes_turns() -> None:
    table = forward.load_table(config_of(SPEC), ENV)
    group = table.groups["taide-8b"]
    a, b = (r.id for r in group.replicas)
    ready = readiness.Readiness()
    fw = forward.Forwarder(table, ready)
    assert [fw.pick(group, set()).id for _ in range(4)] == [a, b, a, b]
    fw.in_flight[a] = 1
    assert {fw.pick(group, set()).id for _ in range(4)} == {b}
    fw.in_flight[a] = 0
    ready.record(b, readiness.FAILED, "test")
    assert {fw.pick(group, set()).id for _ in range(4)} == {a}
    assert fw.pick(group, {a}).id == a  # a retry, too, goes only where the probe answers
    ready.record(b, "up")
    assert fw.pick(group, {a}).id == b  # a retry tries the other one
    fw.in_flight[b] = 1
    assert fw.pick(group, {a, b}).id == a  # every one tried: the least busy again


def test_the_workers_shutdown_closes_the_connections_to_the_engines() -> None:
    """Left open, aiohttp logs 'Unclosed client session' as the worker exits."""
    from twllm.gateway.asgi import _lifespan

    fw = forward.Forwarder(forward.load_table(config_of(SPEC), ENV))
    reported: list[dict] = []

    async def send(message: dict) -> None:
        reported.append(message)

    async def go() -> bool:
        session = fw.session()
        await _lifespan(send, fw)({"type": "lifespan.shutdown.complete"})
        return bool(session.closed)

    assert asyncio.run(go()) is True
    assert reported == [{"type": "lifespan.shutdown.complete"}]
