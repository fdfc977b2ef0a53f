"""The Responses API's pure parts: what the gateway refuses, what it forwards, how the guard reads it.

Stream events are built by LiteLLM's own vLLM config from the JSON vLLM 0.32 sends (as the proxy
builds them); the real engine and proxy are in tests/integration/test_responses_api.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from twllm.gateway import responses
from twllm.gateway.asgi import HttpSettings, Shield
from twllm.guard import responses as guard
from twllm.guard.gateway import _combine
from twllm.guard.pipeline import GuardPipeline
from twllm.guard.streaming import StreamBlocked
from twllm.spec.schema import GuardSpec

TW_ID = "A123456789"
ROUTE = "/v1/responses"


# --- what the gateway refuses -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"conversation": {"id": "conv_1"}}, "conversation"),
        ({"background": True}, "background"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"tools": [{"type": "function", "name": "f"}, {"type": "mcp", "server_url": "http://x"}]}, "tools"),
    ],
)
def test_what_needs_a_stored_response_or_a_hosted_tool_is_refused(body: dict[str, Any], param: str) -> None:
    found = responses.unsupported(ROUTE, {"model": "chat", "input": "hi", **body})
    assert found is not None and found[0] == param
    assert "input" in found[1] or "function" in found[1]


@pytest.mark.parametrize(
    "body",
    [
        {"background": False, "previous_response_id": None, "store": True},
        {"tools": [{"type": "function", "name": "f", "parameters": {}}]},
        {"conversation": ""},
    ],
)
def test_what_the_engines_can_answer_passes(body: dict[str, Any]) -> None:
    assert responses.unsupported(ROUTE, {"model": "chat", "input": "hi", **body}) is None
    assert responses.unsupported("/responses", {"model": "chat", "input": "hi", **body}) is None


def test_other_routes_are_not_looked_at() -> None:
    assert (
        responses.unsupported("/v1/chat/completions", {"previous_response_id": "x", "tools": [{"type": "x"}]}) is None
    )


def test_the_routes_of_stored_responses_answer_501_without_reaching_the_proxy() -> None:
    calls = []

    async def proxy(scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=Shield(proxy, HttpSettings()))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            return [
                await client.get("/v1/responses/resp_abc"),
                await client.delete("/v1/responses/resp_abc"),
                await client.get("/v1/responses/resp_abc/input_items"),
                await client.post("/v1/responses/resp_abc/cancel"),
                await client.post("/responses/input_tokens", json={}),
                await client.post("/v1/responses", json={}),
                await client.get("/v1/responses"),
            ]

    *unserved, served, listing = asyncio.run(go())
    for answer in unserved:
        assert answer.status_code == 501
        error = answer.json()["error"]
        assert error["code"] == "not_implemented" and "POST /v1/responses" in error["message"]
    assert served.status_code == 200 and listing.status_code == 405
    assert calls == ["/v1/responses"]


def test_an_engine_failing_mid_stream_is_told_in_public_words() -> None:
    from twllm.gateway.asgi import rewrite_stream_errors

    # What LiteLLM (1.108) sent when a vLLM engine was killed mid-way through a Responses stream.
    message = (
        "litellm.APIConnectionError: Hosted_vllmException - <ClientPayloadError: TransferEncodingError: 400, "
        "message='Not enough data to satisfy transfer length header.'>"
    )
    event = {
        "type": "response.failed",
        "sequence_number": 9,
        "response": {"id": "resp_x", "object": "response", "status": "failed", "output": [], "model": "chat"},
    }
    event["response"]["error"] = {"code": "server_error", "message": message}
    body = b"data: " + json.dumps(event).encode() + b"\n\ndata: [DONE]\n\n"
    out = rewrite_stream_errors(body)
    failed = json.loads(out.split(b"\n")[0][6:])
    assert failed["response"]["error"]["code"] == "engine_unavailable"
    assert "litellm" not in out.decode().lower() and "Error" not in out.decode()
    assert (failed["type"], failed["sequence_number"], failed["response"]["id"]) == ("response.failed", 9, "resp_x")
    completed = b'data: {"type": "response.completed", "response": {"error": null, "output": []}}'
    assert rewrite_stream_errors(completed) == completed


# --- what the gateway forwards ------------------------------------------------------------------


def test_vllms_own_fields_travel_in_extra_body() -> None:
    data: dict[str, Any] = {
        "model": "chat",
        "input": "hi",
        "structured_outputs": {"regex": "a+"},
        "top_k": 5,
        "request_id": "mine",  # the deployment's business: left for LiteLLM to drop
        "extra_body": {"top_k": 7},
    }
    responses.forward_engine_params(data)
    assert data == {
        "model": "chat",
        "input": "hi",
        "request_id": "mine",
        "extra_body": {"structured_outputs": {"regex": "a+"}, "top_k": 7},
    }
    plain = {"model": "chat", "input": "hi"}
    responses.forward_engine_params(plain)
    assert plain == {"model": "chat", "input": "hi"}


def test_max_output_tokens_reaches_vllm_as_given() -> None:
    from litellm.llms.hosted_vllm.responses.transformation import HostedVLLMResponsesAPIConfig

    responses.install()
    assert HostedVLLMResponsesAPIConfig().map_openai_params({"max_output_tokens": 5}, "chat", True) == {
        "max_output_tokens": 5
    }


# --- the guard on requests and answers ----------------------------------------------------------


def pipeline(input_: list[str], output: list[str], **extra: Any) -> GuardPipeline:
    return GuardPipeline.from_spec(GuardSpec.model_validate({"input": input_, "output": output, **extra}))


def test_the_last_user_turn_gets_every_input_stage_earlier_turns_pii() -> None:
    data: dict[str, Any] = {
        "instructions": "客戶電話 0912-345-678",
        "input": [
            {"role": "user", "content": f"我的身分證是{TW_ID}"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": TW_ID}]},
            {"type": "function_call_output", "call_id": "c1", "output": TW_ID},
            {"role": "user", "content": [{"type": "input_text", "text": f"再說一次 {TW_ID}"}, {"type": "input_image"}]},
        ],
    }
    original = json.dumps(data)
    result = guard.screen_request(pipeline(["pii"], []), data, _combine)
    assert result.verdict == "mask"
    assert data["instructions"] == "客戶電話 [tw_phone]"
    items = data["input"]
    assert items[0]["content"] == "我的身分證是[tw_national_id]"
    assert items[1]["content"][0]["text"] == TW_ID, "an earlier answer is not screened, as in chat"
    assert items[2]["output"] == TW_ID, "a tool's result is not screened, as in chat"
    assert items[3]["content"] == [{"type": "input_text", "text": "再說一次 [tw_national_id]"}, {"type": "input_image"}]
    assert json.loads(original)["input"][0]["content"].endswith(TW_ID), "the client's own object is not changed"


def test_a_string_input_is_one_user_turn_and_a_block_is_a_block() -> None:
    data: dict[str, Any] = {"input": f"ID {TW_ID}"}
    assert guard.screen_request(pipeline(["pii"], []), data, _combine).verdict == "mask"
    assert data["input"] == "ID [tw_national_id]"
    strict = pipeline(["pii"], [], pii={"action": "block"})
    blocked = guard.screen_request(strict, {"input": [{"role": "user", "content": TW_ID}]}, _combine)
    assert blocked.blocked and blocked.categories == ["tw_national_id"]


def test_the_models_system_prompt_becomes_instructions_when_none_is_given() -> None:
    data: dict[str, Any] = {"input": "hi"}
    guard.add_system_prompt(data, "請使用臺灣繁體中文回答。")
    assert data["instructions"] == "請使用臺灣繁體中文回答。"
    own = {"input": "hi", "instructions": "mine"}
    guard.add_system_prompt(own, "x")
    assert own["instructions"] == "mine"
    developer = {"input": [{"role": "developer", "content": "mine"}, {"role": "user", "content": "hi"}]}
    guard.add_system_prompt(developer, "x")
    assert "instructions" not in developer
    assert guard.conversation({"instructions": "s", "input": [{"role": "user", "content": "q"}]}) == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
    ]


def test_an_answers_text_is_screened_its_tool_calls_are_not() -> None:
    from litellm.types.llms.openai import ResponsesAPIResponse

    response = ResponsesAPIResponse.model_validate(
        {
            "id": "resp_1",
            "object": "response",
            "created_at": 1,
            "status": "completed",
            "model": "chat",
            "output": [
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": '{"q": "这个软件"}', "id": "fc"},
                {
                    "type": "message",
                    "id": "m",
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": "这个软件很好用", "annotations": []}],
                },
            ],
        }
    )
    assert guard.is_response(response)
    result = guard.screen_response(pipeline([], ["zh_tw"]), response, [], _combine)
    assert result.verdict == "mask"
    assert response.output[1].content[0].text == "這個軟體很好用"
    assert response.output[0].arguments == '{"q": "这个软件"}'


# --- the guard on a stream ------------------------------------------------------------------------


def vllm_events(pieces: list[str], *, done_text: str | None = None) -> list[Any]:
    """A vLLM answer's stream events as LiteLLM builds them (one message, one text part)."""
    from litellm.llms.hosted_vllm.responses.transformation import HostedVLLMResponsesAPIConfig

    text = done_text if done_text is not None else "".join(pieces)
    message = {"id": "msg_1", "role": "assistant", "status": "completed", "type": "message"}
    part = {"annotations": [], "text": text, "type": "output_text"}
    raw: list[dict[str, Any]] = [
        {
            "type": "response.created",
            "response": {
                "id": "r",
                "object": "response",
                "created_at": 1,
                "status": "in_progress",
                "model": "chat",
                "output": [],
            },
        },
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**message, "content": [], "status": "in_progress"},
        },
        {
            "type": "response.content_part.added",
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": 0,
            "part": {**part, "text": ""},
        },
    ]
    raw += [
        {
            "type": "response.output_text.delta",
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": 0,
            "delta": p,
            "logprobs": [],
        }
        for p in pieces
    ]
    raw += [
        {
            "type": "response.output_text.done",
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": 0,
            "text": text,
            "logprobs": [],
        },
        {"type": "response.content_part.done", "item_id": "msg_1", "output_index": 0, "content_index": 0, "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": {**message, "content": [part]}},
        {
            "type": "response.completed",
            "response": {
                "id": "r",
                "object": "response",
                "created_at": 1,
                "status": "completed",
                "model": "chat",
                "output": [{**message, "content": [part]}],
            },
        },
    ]
    config = HostedVLLMResponsesAPIConfig()
    return [
        config.transform_streaming_response("chat", {**event, "sequence_number": i}, None)
        for i, event in enumerate(raw)
    ]


async def _aiter(items: list[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


def through(p: GuardPipeline, events: list[Any]) -> list[Any]:
    async def call(fn: Any, *args: Any) -> Any:
        return fn(*args)

    async def go() -> list[Any]:
        stream = guard.ResponseStream(p, [], 200, call)
        return [event async for event in stream.events(_aiter(events))]

    return asyncio.run(go())


def _part_text(part: Any) -> str:
    return part["text"] if isinstance(part, dict) else part.text


def test_a_streamed_answer_is_normalised_and_every_event_agrees() -> None:
    pieces = ["这", "个软", "件的信", "息很完整"]
    out = through(pipeline([], ["zh_tw"]), vllm_events(pieces))
    deltas = "".join(e.delta for e in out if e.type == "response.output_text.delta")
    assert deltas == "這個軟體的資訊很完整"
    done = next(e for e in out if e.type == "response.output_text.done")
    part = next(e for e in out if e.type == "response.content_part.done")
    item = next(e for e in out if e.type == "response.output_item.done")
    final = next(e for e in out if e.type == "response.completed")
    assert done.text == _part_text(part.part) == _part_text(item.item.content[0]) == deltas
    assert _part_text(final.response.output[0].content[0]) == deltas
    assert [e.sequence_number for e in out] == list(range(len(out)))
    assert [e.type for e in out][-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]


def test_an_id_split_across_deltas_is_masked_and_held_text_comes_before_done() -> None:
    pieces = ["身分證 A12", "3456", "789"]
    out = through(pipeline([], ["pii"]), vllm_events(pieces))
    kinds = [e.type for e in out]
    done = kinds.index("response.output_text.done")
    assert out[done - 1].type == "response.output_text.delta" and out[done - 1].delta.endswith("[tw_national_id]")
    deltas = [e.delta for e in out if e.type == "response.output_text.delta"]
    assert "".join(deltas) == out[done].text == "身分證 [tw_national_id]"
    final = out[-1].response.output[0].content[0]
    assert _part_text(final) == "身分證 [tw_national_id]"
    assert [e.sequence_number for e in out] == list(range(len(out)))


def test_text_passes_unchanged_without_stages_that_rewrite_it() -> None:
    pieces = ["hello ", "world"]
    out = through(pipeline([], ["zh_tw"]), vllm_events(pieces))
    assert [e.delta for e in out if e.type == "response.output_text.delta"] == pieces
    assert len(out) == len(vllm_events(pieces))


def test_a_blocked_answer_raises_before_the_entity_leaves() -> None:
    events = vllm_events(["身分證 A12", "3456789 好"])
    with pytest.raises(StreamBlocked) as caught:
        through(pipeline([], ["pii"], pii={"action": "block"}), events)
    assert caught.value.result.categories == ["tw_national_id"]
    event = json.loads(guard.error_event("pii_blocked", "blocked", 7).model_dump_json(exclude_none=True))
    assert event == {"type": "error", "code": "pii_blocked", "message": "blocked", "sequence_number": 7}
