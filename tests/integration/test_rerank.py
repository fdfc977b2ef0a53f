"""Rerank and score through the real gateway: the engine's own scores and order, with keys and the ledger.

The oracle is the engine itself. A real vLLM (CPU build) serves twllm's demo reranker — a
random-weights cross-encoder of bge-reranker-v2-m3's architecture (XLMRobertaForSequenceClassification,
one label), built on the spot by ``twllm demo build`` — with the flags the plan gives ``task:
rerank`` (the pooling runner). The real gateway (twllm's entry point, the rendered LiteLLM config,
auth, ledger and the Safety Guard's PII stage on input) runs in front of it against a real
PostgreSQL. Each request goes to the engine directly (with the engine key) and to the gateway
(with a tenant key): the relevance scores and their order must be the engine's, and every request
a ledger row with the engine's token count, priced per the spec.

Scores are compared to 1e-5: the CPU build's float32 scores of one pair differ in the 7th digit
from one batch to the next (the same request sent twice to the engine does too).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from pgutil import Postgres
from stackutil import ENGINE_KEY, Stack

from twllm.accounting import store

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MASTER = "sk-rerank-master-0123456789"
PRICE_PER_1M = 250  # TWD per million tokens
SPEC = """
name: rerank
gateway: {{port: @GATEWAY_PORT@, master_key: "${{TWLLM_MASTER_KEY}}", num_retries: 0}}
engines: {{port_base: @ENGINE_PORT@}}
guard:
  input: [pii]
  pii: {{action: mask, actions: {{credit_card: block}}}}
models:
  - name: rerank
    source: {{path: "{rerank}"}}
    device: cpu
    task: rerank
    dtype: float32
    price: {{input_per_1m: {price}}}
    engine_args: {{enforce-eager: true, kv-cache-memory-bytes: 64M}}
"""
QUERY = "臺北的捷運每天載運多少旅客？"
DOCUMENTS = [
    "Taipei is the capital of Taiwan. The MRT carries about two million passengers every day.",
    "The weather today is sunny with a chance of afternoon showers.",
    "臺灣位於東亞，臺北是首都。捷運系統四通八達，每天載運約兩百萬人次的旅客。",
    "請在星期五之前把會議紀錄整理好，列出決議事項。",
    "Bring your ID card to any branch of the public library and fill in the form.",
    "週末很多人到夜市吃小吃、逛街，也有人去陽明山健行。",
]
TW_ID = "A123456789"
CARD = "4111 1111 1111 1111"
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, vllm_cpu_env, demo_models: Path, postgres: Postgres
) -> Iterator[Stack]:
    spec = SPEC.format(rerank=demo_models / "twllm-demo-rerank", price=PRICE_PER_1M)
    running = Stack.start(
        spec,
        tmp_path_factory.mktemp("rerank"),
        master_key=MASTER,
        vllm_python=Path(vllm_cpu_env.python),
        database_url=postgres.url,
    )
    try:
        yield running
    finally:
        running.stop()


def make_key(url: str, tenant: str, **settings: Any) -> tuple[int, str]:
    with psycopg.connect(url, autocommit=True) as conn:
        store.create_tenant(conn, tenant)
        record, secret = store.create_key(conn, tenant, store.KeySettings(**settings))
    return record.id, secret


@pytest.fixture(scope="module")
def tenant_key(postgres: Postgres, stack: Stack) -> tuple[int, str]:
    return make_key(postgres.url, "retrieval-app", models=("rerank",))


@pytest.fixture(scope="module")
def gateway(stack: Stack, tenant_key: tuple[int, str]) -> Iterator[httpx.Client]:
    base = stack.url.removesuffix("/v1")
    headers = {"Authorization": f"Bearer {tenant_key[1]}"}
    with httpx.Client(base_url=base, headers=headers, timeout=120, trust_env=False) as client:
        yield client


@pytest.fixture(scope="module")
def engine(stack: Stack) -> Iterator[httpx.Client]:
    base = stack.engine_url("rerank").removesuffix("/v1")
    with httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {ENGINE_KEY}"}, timeout=120, trust_env=False
    ) as client:
        yield client


def ranking(answer: dict[str, Any]) -> list[tuple[int, float]]:
    """(index, relevance score) of a rerank answer's results, in the order given."""
    return [(r["index"], r["relevance_score"]) for r in answer["results"]]


def same_ranking(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [i for i, _ in got] == [i for i, _ in want]
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, abs=TOLERANCE)


def rerank_of(client: httpx.Client, path: str = "/v1/rerank", **body: Any) -> dict[str, Any]:
    reply = client.post(path, json={"model": "rerank", "query": QUERY, "documents": DOCUMENTS, **body})
    assert reply.status_code == 200, reply.text
    return reply.json()


def ledger_rows(url: str, key_id: int) -> list[dict[str, Any]]:
    """The key's ledger rows, oldest first."""
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute("SELECT * FROM spend_ledger WHERE key_id = %s ORDER BY ts", (key_id,))
        names = [c.name for c in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def new_rows(url: str, key_id: int, since: datetime, count: int) -> list[dict[str, Any]]:
    """The key's rows of requests that started at or after ``since``, once there are ``count`` of
    them (15 s at most). By start time, not by position: an earlier test's rows may still be
    reaching the ledger (the writer batches; a failure waits for its request's outcome)."""
    deadline = time.monotonic() + 15
    while len([r for r in ledger_rows(url, key_id) if r["ts"] >= since]) < count:
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    time.sleep(0.5)  # and nothing more arrives
    return [r for r in ledger_rows(url, key_id) if r["ts"] >= since]


# --- the engine's scores and order ---------------------------------------------------------------


def test_the_demo_reranker_ranks_with_distinct_scores(engine) -> None:
    """The oracle is usable: the random weights give every document its own score."""
    scores = [s for _, s in ranking(rerank_of(engine))]
    assert len(scores) == len(DOCUMENTS) and scores == sorted(scores, reverse=True)
    assert min(a - b for a, b in zip(scores, scores[1:])) > 100 * TOLERANCE


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank"])
def test_rerank_equals_the_engines_scores_and_order(engine, gateway, path) -> None:
    want = rerank_of(engine)
    got = rerank_of(gateway, path)
    same_ranking(ranking(got), ranking(want))
    # Cohere's shape, as LiteLLM gives it: each document's text, the tokens in meta
    texts = {r["index"]: r["document"]["text"] for r in got["results"]}
    assert texts == dict(enumerate(DOCUMENTS))
    assert got["meta"]["tokens"]["input_tokens"] == want["usage"]["prompt_tokens"]


def test_top_n_keeps_the_engines_best(engine, gateway) -> None:
    want = rerank_of(engine, top_n=3)
    got = rerank_of(gateway, top_n=3)
    assert len(got["results"]) == 3
    same_ranking(ranking(got), ranking(want))


@pytest.mark.parametrize("path", ["/score", "/v1/score"])
def test_score_equals_the_engines_score(engine, gateway, path) -> None:
    body = {"model": "rerank", "text_1": QUERY, "text_2": DOCUMENTS}
    want = engine.post("/score", json=body).json()
    reply = gateway.post(path, json=body)
    assert reply.status_code == 200, reply.text
    got = reply.json()
    assert got.keys() == want.keys() and got["object"] == "list" and got["model"] == "rerank"
    assert [d["index"] for d in got["data"]] == [d["index"] for d in want["data"]] == list(range(len(DOCUMENTS)))
    for a, b in zip(got["data"], want["data"], strict=True):
        assert a["object"] == "score" and a["score"] == pytest.approx(b["score"], abs=TOLERANCE)
    assert got["usage"] == want["usage"]
    # the other spellings of a score request: queries/documents, a one-item list of queries
    other = gateway.post(path, json={"model": "rerank", "queries": [QUERY], "documents": DOCUMENTS}).json()
    assert [d["score"] for d in other["data"]] == pytest.approx([d["score"] for d in want["data"]], abs=TOLERANCE)


def test_score_of_n_queries_paired_one_to_one_is_refused_clearly(gateway) -> None:
    reply = gateway.post("/score", json={"model": "rerank", "text_1": ["a", "b"], "text_2": ["c", "d"]})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == "unsupported_parameter" and error["param"] == "text_1"


def test_an_overlong_pair_is_the_engines_400(gateway) -> None:
    reply = gateway.post("/v1/rerank", json={"model": "rerank", "query": "臺北 " * 600, "documents": ["a"]})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["code"] == "context_length_exceeded"


# --- keys and the ledger -------------------------------------------------------------------------


def test_a_key_without_the_reranker_gets_403(postgres, stack) -> None:
    _, secret = make_key(postgres.url, "chat-only", models=("some-chat-model",))
    base = stack.url.removesuffix("/v1")
    headers = {"Authorization": f"Bearer {secret}"}
    for path, body in (
        ("/v1/rerank", {"model": "rerank", "query": QUERY, "documents": DOCUMENTS}),
        ("/score", {"model": "rerank", "text_1": QUERY, "text_2": DOCUMENTS}),
    ):
        reply = httpx.post(base + path, json=body, headers=headers, timeout=60, trust_env=False)
        assert reply.status_code == 403, reply.text
        assert reply.json()["error"]["code"] == "model_not_allowed"
    listed = httpx.get(base + "/v1/models", headers=headers, timeout=60, trust_env=False).json()
    assert "rerank" not in [m["id"] for m in listed["data"]]


def test_no_key_is_401(stack) -> None:
    base = stack.url.removesuffix("/v1")
    reply = httpx.post(
        base + "/v1/rerank", json={"model": "rerank", "query": "q", "documents": ["d"]}, timeout=60, trust_env=False
    )
    assert reply.status_code == 401


def test_each_request_is_a_ledger_row_with_the_engines_tokens_and_cost(engine, gateway, postgres, tenant_key) -> None:
    key_id, _ = tenant_key
    before = datetime.now(UTC)
    tokens = rerank_of(engine)["usage"]["prompt_tokens"]
    rerank_of(gateway)
    score = gateway.post("/score", json={"model": "rerank", "text_1": QUERY, "text_2": DOCUMENTS[:2]}).json()
    rows = new_rows(postgres.url, key_id, before, 2)
    assert [r["status_code"] for r in rows] == [200, 200]
    assert [r["prompt_tokens"] for r in rows] == [tokens, score["usage"]["prompt_tokens"]]
    for row in rows:
        assert row["model"] == "rerank" and row["deployment"] == "vllm-rerank-0"
        assert row["completion_tokens"] == 0 and row["currency"] == "TWD"
        assert row["cost"] == Decimal(row["prompt_tokens"] * PRICE_PER_1M) / 1_000_000
        assert row["prompt_tokens"] > 0


# --- the Safety Guard's PII stage ------------------------------------------------------------------


def test_personal_data_is_masked_before_the_engine_sees_it(engine, gateway, postgres, tenant_key) -> None:
    raw = [f"病歷：身分證 {TW_ID}，住臺北。", DOCUMENTS[0], DOCUMENTS[1]]
    masked = ["病歷：身分證 [tw_national_id]，住臺北。", DOCUMENTS[0], DOCUMENTS[1]]
    query = f"{TW_ID} 的病歷"
    before = datetime.now(UTC)
    got = rerank_of(gateway, query=query, documents=raw)
    # what the engine ranked is the masked text: the gateway's scores are the engine's for it
    as_masked = rerank_of(engine, query="[tw_national_id] 的病歷", documents=masked)
    as_raw = rerank_of(engine, query=query, documents=raw)
    same_ranking(ranking(got), ranking(as_masked))
    assert dict(ranking(got))[0] != pytest.approx(dict(ranking(as_raw))[0], abs=TOLERANCE)
    assert {r["index"]: r["document"]["text"] for r in got["results"]}[0] == masked[0]
    assert TW_ID not in str(got)
    rows = new_rows(postgres.url, tenant_key[0], before, 1)
    assert len(rows) == 1 and rows[-1]["guard"]["input"]["verdict"] == "mask"
    assert "tw_national_id" in rows[-1]["guard"]["input"]["categories"]


def test_a_blocked_entity_in_a_document_refuses_the_request(gateway) -> None:
    for path, body in (
        ("/v1/rerank", {"model": "rerank", "query": QUERY, "documents": [DOCUMENTS[0], f"卡號 {CARD}"]}),
        ("/score", {"model": "rerank", "text_1": QUERY, "text_2": [DOCUMENTS[0], f"卡號 {CARD}"]}),
    ):
        reply = gateway.post(path, json=body)
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["code"] == "pii_blocked"
