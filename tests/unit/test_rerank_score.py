"""Rerank and score, without engines: the spec, plan and rendered config of ``task: rerank``, the
registry's rerankers, tenant-key routes, the shield's /score translation, the Safety Guard's PII
stage on a rerank's query and documents, the ledger's tokens, and rerank errors that keep our code.

The real engine and gateway are in tests/integration/test_rerank.py. The inner app here is a
stand-in ASGI app (named as such) that answers a rerank the way LiteLLM's rerank route does.
"""

from __future__ import annotations

import asyncio
import json
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from twllm.accounting.auth import route_kind
from twllm.accounting.gateway_config import Price
from twllm.accounting.ledger import rerank_tokens, row_from_logging
from twllm.errors import SpecError
from twllm.gateway import rerank as rerank_route
from twllm.gateway import score
from twllm.gateway.asgi import HttpSettings, Shield, allowed
from twllm.guard.gateway import RERANK_CALLS, _rerank_texts, _screen_rerank
from twllm.guard.pipeline import GuardPipeline
from twllm.model_registry import load_registry
from twllm.plan.build import make_plan
from twllm.plan.placement import GpuInventory
from twllm.render.litellm_config import gateway_settings, litellm_config
from twllm.spec.resolve import parse_spec
from twllm.spec.schema import GuardSpec

ENV = {"TWLLM_MASTER_KEY": "sk-rerank-unit"}
TW_ID = "A123456789"


def loaded_of(models_yaml: str):
    text = f"name: t\ngateway: {{master_key: '${{TWLLM_MASTER_KEY}}'}}\nmodels:\n{models_yaml}"
    return parse_spec(text, "t.yaml", ENV)


def flag(argv, name):
    argv = list(argv)
    return argv[argv.index(name) + 1]


# --- registry, spec, plan, rendered config ------------------------------------------------------


def test_the_registry_lists_rerankers_for_the_pooling_runner() -> None:
    registry = load_registry()
    m3 = registry.get("bge-reranker-v2-m3")
    assert (m3.task, m3.hf_repo, m3.architecture) == (
        "rerank",
        "BAAI/bge-reranker-v2-m3",
        "XLMRobertaForSequenceClassification",
    )
    assert (m3.context_length, m3.license, m3.engine_args) == (8192, "Apache-2.0", {"runner": "pooling"})
    rerankers = [e for e in registry.entries if e.task == "rerank"]
    assert {e.id for e in rerankers} >= {"bge-reranker-v2-m3", "bge-reranker-base", "bge-reranker-large"}
    for entry in rerankers:
        assert entry.family == "rerank" and entry.ollama_tag is None and entry.embedding_dim is None
        assert entry.engine_args.get("runner") == "pooling"


def test_a_registry_reranker_is_served_on_the_pooling_runner_with_a_rerank_route() -> None:
    loaded = loaded_of("  - {name: rr, model: bge-reranker-v2-m3, price: {input_per_1m: 20}}\n")
    assert loaded.model("rr").task == "rerank"  # from the registry
    plan = make_plan(loaded, GpuInventory(1, 80, "test"), Path("/srv/s"))
    argv = plan.engines[0].argv
    assert flag(argv, "--runner") == "pooling" and argv[2] == "BAAI/bge-reranker-v2-m3"
    assert "--enable-prefix-caching" not in argv and "--convert" not in argv
    assert plan.routes[0].task == "rerank"
    assert plan.gateway.probe_model is None and plan.gateway.probe_embed_model is None
    deployment = litellm_config(plan, loaded.spec)["model_list"][0]
    # LiteLLM's rerank for vLLM (hosted_vllm/…, api_base …/v1 → POST …/v1/rerank, behind the engine key)
    assert deployment["litellm_params"]["model"] == "hosted_vllm/rr"
    assert deployment["litellm_params"]["api_base"].endswith("/v1")
    assert deployment["model_info"]["input_cost_per_token"] == pytest.approx(20e-6)
    assert deployment["model_info"]["mode"] == "rerank"  # the background health check reranks
    assert gateway_settings(plan, loaded.spec).models["rr"].task == "rerank"


def test_a_local_cross_encoder_on_cpu_like_the_demo() -> None:
    loaded = loaded_of(
        "  - {name: demo-rerank, source: {path: /m/twllm-demo-rerank}, device: cpu, task: rerank, dtype: float32}\n"
    )
    plan = make_plan(loaded, GpuInventory(0), Path("/srv/s"))
    engine = plan.engines[0]
    assert flag(engine.argv, "--runner") == "pooling" and engine.env["VLLM_TARGET_DEVICE"] == "cpu"
    assert flag(engine.argv, "--kv-cache-memory-bytes") == "1G"


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("{name: x, model: bge-reranker-v2-m3, task: chat}", "is a reranker (cross-encoder); set task: rerank"),
        ("{name: x, model: bge-reranker-v2-m3, task: embed}", "is a reranker (cross-encoder); set task: rerank"),
        ("{name: x, model: bge-m3, task: rerank}", "is a embed model, not a reranker"),
        ("{name: x, model: llama-3.2-1b-instruct, task: rerank}", "not a reranker"),
        ("{name: x, source: {ollama: 'qllama/bge-reranker-v2-m3'}, task: rerank}", "Ollama has no rerank API"),
    ],
)
def test_a_reranker_spec_that_cannot_work_is_refused(model: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        loaded_of(f"  - {model}\n")
    assert message in str(info.value)


# --- routes and tenant keys --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank", "/score", "/v1/score"])
def test_rerank_and_score_are_served_for_post_only(path: str) -> None:
    assert allowed("POST", path) is True
    assert allowed("GET", path) is False
    assert allowed("POST", "/v3/rerank") is None and allowed("POST", "/v2/score") is None


@pytest.mark.parametrize("route", ["/rerank", "/v1/rerank", "/v2/rerank"])
def test_a_tenant_key_may_call_rerank(route: str) -> None:
    assert route_kind(route) == ("inference", None)
    assert route_kind("/v1/rerank/x") == (None, None)


# --- /score as a rerank ----------------------------------------------------------------------


def test_a_score_request_becomes_a_rerank_request() -> None:
    body = {
        "model": "rr",
        "text_1": "q",
        "text_2": ["a", "b"],
        "truncate_prompt_tokens": 32,
        "priority": 3,
        "use_activation": True,
    }
    assert score.rerank_request(body) == {
        "model": "rr",
        "query": "q",
        "documents": ["a", "b"],
        "truncate_prompt_tokens": 32,
    }
    for q, d in score.SIDES:
        assert score.rerank_request({"model": "rr", q: ["q"], d: "a"})["documents"] == ["a"]


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "rr", "text_1": ["a", "b"], "text_2": ["c", "d"]}, "text_1", "unsupported_parameter"),
        ({"model": "rr", "text_1": "q", "text_2": []}, "text_2", None),
        ({"model": "rr", "text_2": ["a"]}, "text_1", None),
        ({"model": "rr", "text_1": {"content": []}, "text_2": ["a"]}, "text_1", None),
        ({"model": "rr", "text_1": "q", "text_2": ["a"], "use_activation": False}, "use_activation", None),
        (
            {"model": "rr", "text_1": "q", "text_2": ["a"], "chat_template_kwargs": {"x": 1}},
            "chat_template_kwargs",
            None,
        ),
    ],
)
def test_what_a_rerank_cannot_ask_is_a_clear_400(body: dict, param: str, code: str | None) -> None:
    with pytest.raises(score.ScoreRequestError) as info:
        score.rerank_request(body)
    error = info.value.public()
    assert (error.status, error.param) == (400, param)
    if code:
        assert error.code == code


def test_a_rerank_answer_becomes_vllms_score_answer() -> None:
    rerank = {
        "id": "score-1",
        "results": [{"index": 1, "relevance_score": 0.9}, {"index": 0, "relevance_score": 0.2}],
        "meta": {"billed_units": {"total_tokens": 17}, "tokens": {"input_tokens": 17}},
    }
    answer = score.score_response(rerank, "rr", 2)
    assert answer["data"] == [
        {"index": 0, "object": "score", "score": 0.2},
        {"index": 1, "object": "score", "score": 0.9},
    ]
    assert (answer["object"], answer["model"], answer["id"]) == ("list", "rr", "score-1")
    assert answer["usage"]["prompt_tokens"] == answer["usage"]["total_tokens"] == 17
    with pytest.raises(ValueError):
        score.score_response({**rerank, "results": rerank["results"][:1]}, "rr", 2)


class RerankStandIn:
    """Stands in for LiteLLM's rerank route: records what reached it, answers in Cohere's shape."""

    def __init__(self, status: int = 200, body: dict[str, Any] | None = None) -> None:
        self.status = status
        self.body = body
        self.seen: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, scope, receive, send) -> None:
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = json.loads(raw)
        assert dict(scope["headers"])[b"content-length"] == str(len(raw)).encode()
        self.seen.append((scope["path"], request))
        body = self.body or {
            "id": "score-x",
            "results": sorted(
                ({"index": i, "relevance_score": 1 / (i + 2)} for i in range(len(request["documents"]))),
                key=lambda r: -r["relevance_score"],
            ),
            "meta": {"tokens": {"input_tokens": 5}},
        }
        out = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"x-litellm-call-id", b"c-1")]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": out})


def post(app, path: str, body: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            return await client.post(path, json=body)

    return asyncio.run(go())


def test_the_shield_answers_score_through_the_rerank_route() -> None:
    inner = RerankStandIn()
    response = post(Shield(inner, HttpSettings()), "/score", {"model": "rr", "queries": "q", "documents": ["a", "b"]})
    assert response.status_code == 200, response.text
    assert inner.seen == [("/v1/rerank", {"model": "rr", "query": "q", "documents": ["a", "b"]})]
    data = response.json()
    assert [d["score"] for d in data["data"]] == [0.5, 1 / 3] and data["usage"]["prompt_tokens"] == 5
    assert int(response.headers["content-length"]) == len(response.content)
    assert "x-litellm-call-id" not in response.headers


def test_score_errors_leave_in_openais_shape() -> None:
    refused = RerankStandIn(403, {"error": {"message": "no", "type": "permission_error", "code": "model_not_allowed"}})
    response = post(Shield(refused, HttpSettings()), "/v1/score", {"model": "rr", "text_1": "q", "text_2": "a"})
    assert response.status_code == 403 and response.json()["error"]["code"] == "model_not_allowed"
    inner = RerankStandIn()
    response = post(
        Shield(inner, HttpSettings()), "/score", {"model": "rr", "text_1": ["a", "b"], "text_2": ["c", "d"]}
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "text_1"
    response = post(Shield(inner, HttpSettings()), "/score", [1, 2])
    assert response.status_code == 400
    assert inner.seen == []  # refused before the proxy


# --- the Safety Guard's PII stage on query and documents -------------------------------------


def pii_pipeline(**pii: Any) -> GuardPipeline:
    return GuardPipeline.from_spec(GuardSpec.model_validate({"input": ["pii"], "pii": pii}))


def test_rerank_calls_are_screened() -> None:
    assert RERANK_CALLS == {"rerank", "arerank"}


def test_personal_data_in_the_query_and_documents_is_masked() -> None:
    data = {
        "model": "rr",
        "query": f"身分證 {TW_ID} 的病歷",
        "documents": [
            "無個資",
            f"病人 {TW_ID}",
            {"text": f"ID {TW_ID}", "title": "e-mail: someone@example.tw"},
            {"content": [{"type": "text", "text": f"{TW_ID}"}, {"type": "image_url", "image_url": {"url": "x"}}]},
        ],
    }
    original = json.loads(json.dumps(data))
    documents = data["documents"]
    result = _screen_rerank(pii_pipeline(action="mask"), data, ["pii"])
    assert result.verdict == "mask" and "tw_national_id" in result.categories
    assert data["query"] == "身分證 [tw_national_id] 的病歷"
    assert data["documents"] == [
        "無個資",
        "病人 [tw_national_id]",
        {"text": "ID [tw_national_id]", "title": "e-mail: [email]"},
        {"content": [{"type": "text", "text": "[tw_national_id]"}, {"type": "image_url", "image_url": {"url": "x"}}]},
    ]
    assert documents == original["documents"]  # the client's objects are not changed in place


def test_a_blocked_entity_in_a_document_blocks_the_rerank() -> None:
    data = {"query": "q", "documents": ["ok", "卡號 4111 1111 1111 1111"]}
    result = _screen_rerank(pii_pipeline(action="mask", actions={"credit_card": "block"}), data, ["pii"])
    assert result.blocked and result.categories == ["credit_card"]


def test_a_single_document_string_is_screened_too() -> None:
    data = {"query": "q", "documents": f"ID {TW_ID}"}
    assert [t for _, _, t in _rerank_texts(data)] == ["q", f"ID {TW_ID}"]
    _screen_rerank(pii_pipeline(), data, ["pii"])
    assert data["documents"] == "ID [tw_national_id]"


# --- the ledger ---------------------------------------------------------------------------------


def rerank_payload(response: Any) -> dict[str, Any]:
    slo = {
        "litellm_call_id": "call-r",
        "model_group": "rr",
        "model_id": "vllm-rr-0",
        "prompt_tokens": 0,  # LiteLLM counts no tokens for a rerank
        "completion_tokens": 0,
        "startTime": 1_795_614_749.5,
        "endTime": 1_795_614_749.6,
        "call_type": "arerank",
        "response": response,
        "error_information": {"error_code": "", "error_class": ""},
    }
    return {"litellm_call_id": "call-r", "standard_logging_object": slo}


def test_a_rerank_row_has_the_engines_tokens_at_the_spec_price() -> None:
    response = {
        "id": "score-1",
        "results": [],
        "meta": {"billed_units": {"total_tokens": 146}, "tokens": {"input_tokens": 146}},
    }
    price = Price(Decimal("0.0001"), Decimal("0"), "TWD")
    row = row_from_logging(rerank_payload(response), success=True, tenant_id=1, key_id=2, price_of=lambda m: price)
    assert (row.model, row.deployment, row.prompt_tokens, row.completion_tokens) == ("rr", "vllm-rr-0", 146, 0)
    assert row.cost == Decimal("0.0146") and row.currency == "TWD"


def test_rerank_tokens_are_read_from_either_meta_field_and_nothing_else() -> None:
    assert rerank_tokens({"meta": {"billed_units": {"total_tokens": 9}}}) == 9
    assert rerank_tokens({"meta": {"tokens": {"input_tokens": 4}, "billed_units": {"total_tokens": 9}}}) == 4
    assert rerank_tokens({"choices": [], "usage": {"prompt_tokens": 3}}) is None
    assert rerank_tokens("redacted-by-litellm") is None and rerank_tokens(None) is None


# --- rerank errors keep twllm's code ---------------------------------------------------------


def test_the_rerank_route_raises_our_exceptions_as_they_are() -> None:
    from litellm.proxy._types import ProxyException
    from litellm.proxy.rerank_endpoints import endpoints

    from twllm.guard.gateway import GuardBlocked
    from twllm.guard.pipeline import GuardResult

    rerank_route.install()
    rerank_route.install()  # idempotent
    blocked = GuardBlocked(GuardResult("block", ["credit_card"], "", message="blocked"), "pii_blocked")

    def reraised(exc: Exception) -> Exception:
        try:
            raise exc
        except Exception as e:  # noqa: BLE001 - what the route's except block does
            try:
                raise endpoints.ProxyException(message=str(e), type="invalid_request_error", param=None, code=400)
            except Exception as out:  # noqa: BLE001
                return out
        raise AssertionError("unreachable")

    assert reraised(blocked) is blocked and blocked.to_dict()["code"] == "pii_blocked"
    other = reraised(ValueError("boom"))
    assert isinstance(other, ProxyException) and other.code == "400" and str(other) == "boom"
    theirs = reraised(ProxyException(message="x", type="t", param=None, code=429))
    assert type(theirs) is not ProxyException and theirs.code == "400"  # LiteLLM's own: rewrapped as before
    assert sys.exc_info()[1] is None
