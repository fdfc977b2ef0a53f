"""Fuzzed requests against the real gateway: no 5xx of ours, no traceback, every error in OpenAI's shape.

One real gateway for the module — twllm's entry point (LiteLLM's proxy behind the shield), custom
auth and the ledger against a real PostgreSQL, the PII guard stage — in front of
``echo_upstream``, a stand-in OpenAI engine (chat, completions, embeddings and responses answer;
rerank and score 404 as an engine without them does). The strategies, the gateway and the checks
live in tests/fuzzutil.py (benchmarks/request_fuzz.py runs the same at 10,000 cases):

- ``json``: each endpoint's shape with random field values: wrong types, negative and huge
  numbers, odd unicode, nulls, nested junk, unknown fields and LiteLLM's own knobs, huge
  ``max_tokens`` and ``n``, streams, junk tools and content parts;
- ``raw``: bodies that are not a JSON object: malformed, truncated, not UTF-8, empty, arrays and
  scalars, deep nesting, huge integers, NaN, a BOM, UTF-16;
- ``headers``: valid requests with long header values, odd and doubled content types,
  duplicate headers, non-ASCII bytes, LiteLLM's control headers;
- ``keys``: valid requests with random, truncated, empty, revoked, doubled and odd-scheme keys.

Every answer: a status under 500 (a 502/503/504 counts as the engine's only when the stand-in
failed on that very request), an error body (and any stream error event) in OpenAI's shape
without the machinery's names; at the end, no traceback in the gateway's log. The cases are
deterministic (``derandomize``); ``TWLLM_FUZZ_CASES`` (default 2,000) sets how many in all.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import fuzzutil
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from pgutil import Postgres

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

CASES = fuzzutil.shares(int(os.environ.get(fuzzutil.CASES_ENV) or fuzzutil.DEFAULT_CASES))
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[fuzzutil.Gateway]:
    from twllm.accounting.migrate import migrate

    folder = tmp_path_factory.mktemp("reqfuzz")
    pg = Postgres(folder)
    pg.start()
    try:
        migrate(pg.url)
        started = fuzzutil.start(folder, pg.url)
        try:
            yield started.gateway
            traces = fuzzutil.tracebacks(started.gateway.proxy.log_text())
            assert not traces, f"{len(traces)} tracebacks in the gateway's log; the first:\n{traces[0]}"
        finally:
            started.stop()
    finally:
        pg.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def client(gateway: fuzzutil.Gateway) -> Iterator[httpx.Client]:
    with gateway.client() as c:
        yield c


def check(client: httpx.Client, gateway: fuzzutil.Gateway, case: fuzzutil.Case) -> None:
    outcome = fuzzutil.send(client, gateway, case)
    assert not outcome.problems, f"{outcome.status} {outcome.problems}\n{case.describe()}"


@settings(FUZZ, max_examples=CASES["json"])
@given(case=fuzzutil.json_requests())
def test_requests_with_random_field_values(client, gateway, case) -> None:
    check(client, gateway, case)


@settings(FUZZ, max_examples=CASES["raw"])
@given(case=fuzzutil.raw_bodies())
def test_bodies_that_are_not_a_json_object(client, gateway, case) -> None:
    check(client, gateway, case)


@settings(FUZZ, max_examples=CASES["headers"])
@given(case=fuzzutil.odd_headers())
def test_odd_headers(client, gateway, case) -> None:
    check(client, gateway, case)


@settings(FUZZ, max_examples=CASES["keys"])
@given(case=fuzzutil.api_keys())
def test_random_and_truncated_keys(client, gateway, case) -> None:
    check(client, gateway, case)


# --- what the fuzzing found, each once (fixed in twllm/gateway/asgi.py and errors.py) ------------

FOUND = {
    # LiteLLM's auth reads fields off the body: a JSON array or scalar was a 500 with a traceback.
    "array body": ("/v1/rerank", b"[]", "revoked", 400, "invalid_json"),
    "boolean body": ("/v1/chat/completions", b"true", "tenant", 400, "invalid_json"),
    # LiteLLM's own rerank route parses the body itself: an empty one was a 500.
    "empty body": ("/v2/rerank", b"", "tenant", 400, "invalid_json"),
    # Not UTF-8, too deep, a huge integer: a traceback each, then LiteLLM went on with an empty body.
    "not utf-8": ("/v1/embeddings", b'{"model": "embed", "input": "\xff"}', "tenant", 400, "invalid_json"),
    "deep nesting": ("/v1/chat/completions", b"[" * 5000 + b"]" * 5000, "tenant", 400, "invalid_json"),
    "huge integer": (
        "/v1/chat/completions",
        b'{"model": "chat", "n": ' + b"9" * 5000 + b"}",
        "tenant",
        400,
        "invalid_json",
    ),
    # The score route re-reads the body with the json module: 600 levels (orjson reads 1,024) were a 500.
    "deep object": ("/score", b'{"a":' * 600 + b"1" + b"}" * 600, "tenant", 400, "invalid_json"),
    # Read as infinity / NaN, then LiteLLM could not send it to the engine: a 500.
    "infinite number": (
        "/v1/embeddings",
        b'{"model": "embed", "input": "x", "dimensions": 1e999}',
        "tenant",
        400,
        "invalid_json",
    ),
    "NaN": (
        "/v1/chat/completions",
        b'{"model": "chat", "messages": [], "temperature": NaN}',
        "master",
        400,
        "invalid_json",
    ),
    # A lone surrogate: the score route failed to encode it again (a 500).
    "lone surrogate": (
        "/score",
        b'{"model": "rerank", "text_1": "\\ud800", "text_2": ["x"]}',
        "tenant",
        400,
        "invalid_json",
    ),
    # A model that is not a string: LiteLLM's auth failed on it (unhashable type: a traceback, 401).
    "model list": ("/v1/chat/completions", b'{"model": ["chat"], "api_key": "x"}', "tenant", 400, "invalid_type"),
    # A field only LiteLLM's admin may set: a 401 "Incorrect API key" and a traceback.
    "api_base": (
        "/v1/chat/completions",
        b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "api_base": "http://127.0.0.1:1/v1"}',
        "tenant",
        400,
        "unsupported_parameter",
    ),
    # LiteLLM's request validation (a rerank query that is not a string): a 500 and a traceback.
    "rerank query list": (
        "/v2/rerank",
        b'{"model": "rerank", "query": [[]], "documents": ["x"]}',
        "master",
        400,
        "invalid_type",
    ),
    # LiteLLM passes `messages` twice to its text completion: a 500 and a traceback.
    "completions messages": (
        "/v1/completions",
        b'{"model": "chat", "prompt": "x", "messages": [{"role": "user", "content": "hi"}]}',
        "tenant",
        400,
        "unsupported_parameter",
    ),
    # LiteLLM's failure hook updates `metadata` in place: with a refused key, null or a list was a 500.
    "metadata null": (
        "/v1/completions",
        b'{"metadata": null, "model": "chat", "prompt": ""}',
        "revoked",
        401,
        "revoked_api_key",
    ),
    "metadata list": (
        "/v1/chat/completions",
        b'{"metadata": [], "model": "chat", "messages": []}',
        "revoked",
        400,
        "invalid_type",
    ),
    # A chat-only field sent to /v1/completions: LiteLLM's call failed with a TypeError (a 500).
    "completions response_format": (
        "/v1/completions",
        b'{"model": "chat", "prompt": "x", "response_format": {"type": "json_object"}}',
        "tenant",
        400,
        "unsupported_parameter",
    ),
    # LiteLLM's text completion cannot map an empty or object prompt: a 500 and a traceback.
    "completions empty prompt": ("/v1/completions", b'{"model": "chat", "prompt": []}', "tenant", 400, "invalid_type"),
}


@pytest.mark.parametrize("name", sorted(FOUND))
def test_what_the_fuzzing_found(client, gateway, name) -> None:
    path, body, who, status, code = FOUND[name]
    case = fuzzutil.Case("found", "POST", path, fuzzutil.ENDPOINT_OF.get(path, "chat"), body, key=("bearer", who))
    outcome = fuzzutil.send(client, gateway, case)
    assert not outcome.problems and outcome.status == status, (outcome.status, outcome.problems)
    reply = client.post(path, content=body, headers={"Authorization": f"Bearer {gateway.secrets[who]}"})
    assert reply.json()["error"]["code"] == code, reply.text


@pytest.mark.parametrize(
    "header",
    [
        # Junk in LiteLLM's control headers was a 500 (float("aaa")); they are not the client's to set.
        (b"x-litellm-timeout", b"aaa"),
        (b"x-litellm-num-retries", b"-x"),
        # A JSON body under another content type: LiteLLM read it as a form or upload (a 500 for some).
        (b"content-type", b"multipart/form-data; boundary=xyz"),
        (b"content-type", "台/灣".encode()),
        (b"content-type", b"*/*"),
    ],
)
def test_litellms_control_headers_and_odd_content_types(client, gateway, header) -> None:
    bodies = {
        "/v1/chat/completions": b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}]}',
        "/v1/rerank": b'{"model": "rerank", "query": "q", "documents": ["x"]}',
    }
    for path, body in bodies.items():
        headers = [(b"authorization", f"Bearer {gateway.secrets['tenant']}".encode()), header]
        reply = client.post(path, content=body, headers=headers)
        assert reply.status_code < 500, reply.text
        if path.endswith("completions"):
            assert reply.status_code == 200, reply.text
