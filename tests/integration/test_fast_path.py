"""The gateway's own forwarding (``twllm.gateway.forward``) against the engine behind it.

A real vLLM (CPU build) serves twllm's demo chat model (two replicas) and all-MiniLM-L6-v2; the
real gateway runs the config twllm renders from a spec without a Safety Guard, so plain requests
with a tenant key take the fast path, against a real PostgreSQL. The oracle is the engine: the
same request goes to one replica directly and through the gateway, and the answers must be the
same JSON apart from the fields that are new on every call (``id``, ``created``), and streams
the same events. LiteLLM's path re-serialises every answer (it adds and reorders fields), so
byte-level sameness is also what shows that the fast path served it.

The ledger, the checks of a tenant key and the failure paths (a replica killed, a stream whose
engine dies, every replica down) are checked here too; the killing tests run last.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from pgutil import Postgres, sql
from stackutil import ENGINE_KEY, Stack

from twllm.accounting import store

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MASTER = "sk-fastpath-master-0123456789"
SPEC = """
name: fastpath
gateway: {{port: @GATEWAY_PORT@, master_key: "${{TWLLM_MASTER_KEY}}", num_retries: 1, workers: 1}}
engines: {{port_base: @ENGINE_PORT@}}
models:
  - name: chat
    source: {{path: "{chat}"}}
    device: cpu
    task: chat
    dtype: float32
    max_model_len: 512
    replicas: 2
    price: {{input_per_1m: 1, output_per_1m: 2}}
    engine_args: {{enforce-eager: true, kv-cache-memory-bytes: 64M}}
  - name: embed
    source: {{path: "{embed}"}}
    device: cpu
    task: embed
    dtype: float32
    engine_args: {{enforce-eager: true, kv-cache-memory-bytes: 64M}}
"""
MESSAGES = [{"role": "user", "content": "請介紹台灣的夜市。"}]
FRESH = ("id", "created")
"""What differs between two answers to the same request, engine or gateway."""
FORBIDDEN = re.compile(r"(?i:litellm|hosted_vllm|traceback|https?://|127\.0\.0\.1|sk-fastpath|sk-engine)")


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, vllm_cpu_env, demo_models: Path, postgres: Postgres
) -> Iterator[Stack]:
    spec = SPEC.format(chat=demo_models / "twllm-demo-chat", embed=demo_models / "all-MiniLM-L6-v2")
    running = Stack.start(
        spec,
        tmp_path_factory.mktemp("fastpath"),
        master_key=MASTER,
        vllm_python=Path(vllm_cpu_env.python),
        database_url=postgres.url,
    )
    try:
        yield running
    finally:
        running.stop()


_tenants = itertools.count()


def new_key(postgres: Postgres, name: str = "fast", **settings: Any) -> tuple[int, str]:
    """A key of a tenant of its own: each test counts its own key's rows."""
    name = f"{name}-{next(_tenants)}"
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        store.create_tenant(conn, name)
        record, secret = store.create_key(conn, name, store.KeySettings(**settings))
    return record.id, secret


@pytest.fixture(scope="module")
def tenant_key(postgres: Postgres) -> tuple[int, str]:
    return new_key(postgres, "fast")


def post(url: str, key: str, path: str, body: dict[str, Any], timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)


def without_fresh(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: without_fresh(v) for k, v in data.items() if k not in FRESH}
    if isinstance(data, list):
        return [without_fresh(v) for v in data]
    return data


def events(response: httpx.Response) -> list[Any]:
    """An SSE answer's events: the JSON of each ``data:`` line, and "[DONE]"."""
    out: list[Any] = []
    for line in response.text.split("\n"):
        if line.startswith("data: "):
            payload = line[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def assembled(stream: list[Any]) -> dict[str, Any]:
    """What a stream says, whatever its events' boundaries: vLLM merges the tokens a busy reader
    has not taken yet into one event, so two streams of the same answer may be cut differently.
    Per choice its role, text and finish reason; which fields the events have; the fingerprint
    of each choice's last event; the usage event; and that it ends with [DONE]."""
    choices: dict[int, dict[str, Any]] = {}
    fields = set()
    usage = []
    for event in stream[:-1]:
        fields.add(tuple(sorted(event)))
        if not event["choices"]:
            usage.append(without_fresh(event))
        for choice in event["choices"]:
            seen = choices.setdefault(choice["index"], {"role": None, "text": "", "finish": None, "fingerprint": None})
            seen["role"] = seen["role"] or choice["delta"].get("role")
            seen["text"] += choice["delta"].get("content") or ""
            if choice["finish_reason"] is not None:
                seen["finish"] = choice["finish_reason"]
                seen["fingerprint"] = event.get("system_fingerprint")
    return {"choices": choices, "fields": fields, "usage": usage, "end": stream[-1]}


def rows_of(postgres: Postgres, key_id: int, at_least: int, timeout: float = 15.0) -> list[dict[str, Any]]:
    columns = (
        "model, requested_model, deployment, prompt_tokens, completion_tokens, cost, status_code, error_class, stream"
    )
    deadline = time.monotonic() + timeout
    while True:
        rows = sql(postgres.url, f"SELECT {columns} FROM spend_ledger WHERE key_id = %s ORDER BY ts", (key_id,))
        if len(rows) >= at_least or time.monotonic() > deadline:
            return [dict(zip(columns.split(", "), row, strict=True)) for row in rows]
        time.sleep(0.2)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param("/chat/completions", {"messages": MESSAGES, "max_tokens": 16, "temperature": 0}, id="chat"),
        pytest.param(
            "/chat/completions",
            {
                "messages": MESSAGES,
                "max_tokens": 6,
                "temperature": 0.8,
                "seed": 7,
                "n": 2,
                "logprobs": True,
                "top_logprobs": 2,
            },
            id="chat-n-logprobs",
        ),
        pytest.param("/completions", {"prompt": "台北是", "max_tokens": 12, "temperature": 0}, id="completions"),
    ],
)
def test_answers_are_the_engines_own(stack: Stack, postgres: Postgres, path: str, body: dict) -> None:
    key_id, key = new_key(postgres)
    request = {"model": "chat", **body}
    direct = post(stack.engine_url("chat"), ENGINE_KEY, path, request)
    through = post(stack.url, key, path, request)
    assert direct.status_code == through.status_code == 200, through.text
    assert through.headers["content-type"] == direct.headers["content-type"]
    assert through.headers["x-content-type-options"] == "nosniff"
    assert without_fresh(through.json()) == without_fresh(direct.json())
    usage = through.json()["usage"]
    [row] = rows_of(postgres, key_id, 1)
    assert (row["model"], row["requested_model"], row["status_code"], row["error_class"], row["stream"]) == (
        "chat",
        "chat",
        200,
        None,
        False,
    )
    assert (row["prompt_tokens"], row["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    expected = (usage["prompt_tokens"] * 1 + usage["completion_tokens"] * 2) / 1_000_000
    assert float(row["cost"]) == pytest.approx(expected)
    assert row["deployment"] in {e.id for e in stack.plan.engines if "chat" in e.models}


@pytest.mark.parametrize(
    "include_usage",
    [
        pytest.param(False, id="no-usage-first"),  # its fingerprint unknown yet: the last event waits for it
        pytest.param(True, id="usage"),
        pytest.param(False, id="no-usage-again"),  # the fingerprint known
    ],
)
def test_streams_are_the_engines_events(stack: Stack, postgres: Postgres, include_usage: bool) -> None:
    key_id, key = new_key(postgres)
    request: dict[str, Any] = {
        "model": "chat",
        "messages": MESSAGES,
        "max_tokens": 12,
        "temperature": 0,
        "stream": True,
    }
    if include_usage:
        request["stream_options"] = {"include_usage": True}
    direct = post(stack.engine_url("chat"), ENGINE_KEY, "/chat/completions", request)
    through = post(stack.url, key, "/chat/completions", request)
    assert direct.status_code == through.status_code == 200
    assert through.headers["content-type"].startswith("text/event-stream")
    assert assembled(events(through)) == assembled(events(direct))
    # the gateway asked the engine for usage either way: the ledger has the stream's tokens
    [row] = rows_of(postgres, key_id, 1)
    assert row["stream"] is True and row["status_code"] == 200
    assert 1 <= row["completion_tokens"] <= 12 and row["prompt_tokens"] > 0
    if include_usage:
        [usage] = [e["usage"] for e in events(through) if e != "[DONE]" and not e["choices"]]
        assert (row["prompt_tokens"], row["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    else:
        assert all(e == "[DONE]" or e["choices"] for e in events(through))


def test_embeddings_are_the_engines_own(stack: Stack, tenant_key) -> None:
    request = {"model": "embed", "input": ["台北的夜市", "高雄的港口"], "encoding_format": "float"}
    direct = post(stack.engine_url("embed"), ENGINE_KEY, "/embeddings", request)
    through = post(stack.url, tenant_key[1], "/embeddings", request)
    assert direct.status_code == through.status_code == 200
    assert without_fresh(through.json()) == without_fresh(direct.json())


def test_the_engines_refusal_is_answered_in_openais_shape(stack: Stack, postgres: Postgres) -> None:
    key_id, key = new_key(postgres)
    request = {"model": "chat", "messages": MESSAGES, "max_tokens": 5000}  # over max_model_len 512
    direct = post(stack.engine_url("chat"), ENGINE_KEY, "/chat/completions", request)
    through = post(stack.url, key, "/chat/completions", request)
    assert (direct.status_code, through.status_code) == (400, 400), (direct.text[:300], through.text[:300])
    error = through.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and not FORBIDDEN.search(through.text)
    assert error["message"]
    [row] = rows_of(postgres, key_id, 1)
    assert row["status_code"] == 400 and row["error_class"] and row["completion_tokens"] == 0


def test_a_tenant_keys_checks_hold_on_the_fast_path(stack: Stack, postgres: Postgres) -> None:
    limited_id, limited = new_key(postgres, "fast-limited", rpm=2, models=("chat",))
    body = {"model": "chat", "messages": MESSAGES, "max_tokens": 2}
    second = time.time() % 60  # rate windows are calendar minutes: start well inside one
    if second > 40:
        time.sleep(60 - second + 0.2)
    statuses = [post(stack.url, limited, "/chat/completions", body).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    refused = post(stack.url, limited, "/chat/completions", body)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    not_allowed = post(stack.url, limited, "/embeddings", {"model": "embed", "input": "x"})
    assert not_allowed.status_code == 403 and not_allowed.json()["error"]["code"] == "model_not_allowed"
    unknown = post(stack.url, "sk-tw-" + "z" * 40, "/chat/completions", body)
    assert unknown.status_code == 401 and unknown.json()["error"]["code"] == "invalid_api_key"
    rows = rows_of(postgres, limited_id, 5)
    # a known key's refusals are rows, as on LiteLLM's path; the unknown key's is no one's
    assert sorted(r["status_code"] for r in rows) == [200, 200, 403, 429, 429]


def test_what_the_fast_path_leaves_to_litellm_still_works(stack: Stack, tenant_key) -> None:
    key = tenant_key[1]
    body = {"model": "chat", "messages": MESSAGES, "max_tokens": 4, "temperature": 0}
    # LiteLLM's own fields, the master key, an unknown model: LiteLLM's path, as before
    assert post(stack.url, key, "/chat/completions", {**body, "metadata": {"a": "b"}}).status_code == 200
    assert post(stack.url, MASTER, "/chat/completions", body).status_code == 200
    missing = post(stack.url, key, "/chat/completions", {**body, "model": "no-such-model"})
    assert missing.status_code in (400, 404) and not FORBIDDEN.search(missing.text)


def test_z1_a_killed_replica_fails_no_request(stack: Stack, tenant_key) -> None:
    key = tenant_key[1]
    victim = [e.id for e in stack.plan.engines if "chat" in e.models][1]
    body = {"model": "chat", "messages": MESSAGES, "max_tokens": 2}
    stack.kill_engine(victim)
    answers = [post(stack.url, key, "/chat/completions", body).status_code for _ in range(8)]
    assert answers == [200] * 8


def test_z2_a_stream_whose_engine_dies_ends_with_an_error_event(stack: Stack, postgres: Postgres) -> None:
    key_id, key = new_key(postgres, "fast-cut")
    survivor = [e.id for e in stack.plan.engines if "chat" in e.models and stack.engines[e.id].poll() is None][0]
    body = {
        "model": "chat",
        "messages": MESSAGES,
        "max_tokens": 400,
        "temperature": 1.0,
        "n": 8,
        "logprobs": True,
        "top_logprobs": 20,
        "stream": True,
    }
    seen: list[Any] = []
    with httpx.stream(
        "POST", f"{stack.url}/chat/completions", json=body, timeout=60, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        assert response.status_code == 200
        stack.kill_engine(survivor)
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                seen.append(json.loads(line[6:]))
    errors = [e["error"] for e in seen if "error" in e]
    assert len(errors) == 1 and errors[0]["code"] == "engine_unavailable", seen[-2:]
    [row] = rows_of(postgres, key_id, 1)
    assert row["status_code"] == 503 and row["error_class"] == "EngineStreamCut"


def test_z3_every_replica_down_is_503_with_retry_after(stack: Stack, tenant_key) -> None:
    for stream in (False, True):
        body = {"model": "chat", "messages": MESSAGES, "max_tokens": 2, "stream": stream}
        response = post(stack.url, tenant_key[1], "/chat/completions", body, timeout=30)
        assert response.status_code == 503, response.text
        assert int(response.headers["retry-after"]) > 0
        assert response.json()["error"]["code"] == "engine_unavailable"
