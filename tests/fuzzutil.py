"""Fuzzed requests against the real gateway: one copy of the strategies, the gateway and the checks.

Used by tests/integration/test_request_fuzz.py (2,000 cases in CI) and benchmarks/request_fuzz.py
(10,000 cases, a table). Stdlib, httpx, hypothesis, yaml and psycopg only.

``start`` runs what the tests run: the config twllm renders for a spec with a chat, an embedding
and a rerank model, every deployment's ``api_base`` pointed at ``echo_upstream`` (a stand-in
OpenAI engine, named as such: chat, completions, embeddings and responses answer; rerank and
score 404 as an engine without them does), twllm's entry point (``twllm.gateway.serve``, the
shield in front of LiteLLM), the Safety Guard's PII stage on input, custom auth and the ledger
against a real PostgreSQL, and keys made by ``twllm.accounting.store``.

A ``Case`` is one request: a method, a path, raw body bytes, headers, and a key *kind*
(``KeySpec``) resolved to a secret only when it is sent (the secrets exist once the gateway
runs; the strategies are built at import). ``send`` sends it and ``Outcome.problems`` says
what broke the gateway's promise:

- a 5xx the gateway made (a 502/503/504 is the engine's when the stand-in engine received the
  request and failed or dropped it: ``Outcome.upstream_5xx``);
- an error (status >= 400, or an error event in a stream) not in OpenAI's shape
  ``{"error": {"message": str, "type": str, "param": str|null, "code": str|null}}``;
- an error message that shows the machinery (LiteLLM, a class name, a traceback, an URL) which
  the request itself did not contain;
- no answer at all (connection dropped, timeout).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import psycopg
import yaml
from echo_upstream import EchoUpstream
from hypothesis import strategies as st
from proxyutil import ProxyHandle, start_proxy

from twllm.accounting import store
from twllm.plan.build import ENGINE_KEY_ENV, make_plan
from twllm.plan.placement import GpuInventory
from twllm.render.litellm_config import render
from twllm.spec.resolve import parse_spec

MASTER = "sk-fuzz-master-0123456789abcdef"
SPEC = """
name: fuzz
gateway:
  master_key: ${TWLLM_MASTER_KEY}
  num_retries: 0
guard:
  input: [pii]
models:
  - {name: chat, model: llama-3.2-1b-instruct}
  - {name: embed, model: bge-m3, task: embed}
  - {name: rerank, model: bge-reranker-v2-m3}
"""
MODELS = ("chat", "embed", "rerank")
CASES_ENV = "TWLLM_FUZZ_CASES"
DEFAULT_CASES = 2000
WEIGHTS: Mapping[str, int] = {"json": 10, "raw": 4, "headers": 3, "keys": 3}
"""Each strategy's share of the cases (CI: 1,000 / 400 / 300 / 300 of 2,000)."""


def shares(total: int) -> dict[str, int]:
    """Cases per strategy for ``total`` cases in all (the last takes the rounding)."""
    whole = sum(WEIGHTS.values())
    out = {name: total * weight // whole for name, weight in WEIGHTS.items()}
    out[next(reversed(WEIGHTS))] += total - sum(out.values())
    return out


# --- what is sent ------------------------------------------------------------------------------

KeySpec = tuple[Any, ...]
"""("none",) | ("bearer", who) | ("truncated", who, n) | ("suffix", who, junk) |
("template", who, format) | ("raw", bytes) | ("header", name, who) | ("twice", who, who)."""


@dataclasses.dataclass(frozen=True)
class Case:
    group: str
    """The strategy that made it: json, raw, headers, keys."""
    method: str
    path: str
    endpoint: str
    """The route it is counted under (chat, completions, embeddings, rerank, score, responses, models)."""
    body: bytes | None
    headers: tuple[tuple[bytes, bytes], ...] = ()
    key: KeySpec = ("bearer", "tenant")
    content_type: bytes | None = b"application/json"

    def describe(self) -> str:
        body = (self.body or b"")[:600]
        return (
            f"{self.method} {self.path} key={self.key!r} content-type={self.content_type!r} "
            f"headers={[(k, v[:80]) for k, v in self.headers]!r} body={body!r}"
        )


ENDPOINTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("chat", "POST", ("/v1/chat/completions", "/chat/completions", "/v1/chat/completions/")),
    ("completions", "POST", ("/v1/completions", "/completions")),
    ("embeddings", "POST", ("/v1/embeddings", "/embeddings")),
    ("rerank", "POST", ("/v1/rerank", "/v2/rerank", "/rerank")),
    ("score", "POST", ("/score", "/v1/score")),
    ("responses", "POST", ("/v1/responses", "/responses")),
    ("models", "GET", ("/v1/models", "/models")),
)
POST_PATHS = tuple(path for _, method, paths in ENDPOINTS if method == "POST" for path in paths)
ENDPOINT_OF = {path: name for name, _, paths in ENDPOINTS for path in paths}

# --- value strategies --------------------------------------------------------------------------

ODD_TEXT = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "\ud800",  # a lone surrogate: JSON may carry it escaped, UTF-8 cannot
        "\udfff\ud800",
        "\u202e\u200b\ufeff",
        "台灣繁體中文" * 50,
        "😀" * 100,
        "A123456789",  # a Taiwanese ID: the PII stage masks it
        "user@example.com 0912-345-678",
        "\\u0000\\",
        '{"error": {"message": "x"}}',
        "data: [DONE]\n\n",
        "${TWLLM_MASTER_KEY}",
        "%s%n%x",
        "x" * 5000,
    ]
)
TEXT = st.one_of(st.text(max_size=40), ODD_TEXT)
NUMBER = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63) - 1, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
)
SCALAR = st.one_of(st.none(), st.booleans(), NUMBER, TEXT)
JUNK = st.recursive(
    SCALAR,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=10,
)


def maybe(good: st.SearchStrategy[Any], junk_share: int = 3) -> st.SearchStrategy[Any]:
    """``good`` most of the time, junk of any type otherwise."""
    return st.one_of(*([good] * junk_share), JUNK)


MODEL = st.one_of(
    st.sampled_from(MODELS),
    st.sampled_from(["chat", "chat", "embed", "rerank", "gpt-4o", "", "chat ", "CHAT", "hosted_vllm/chat"]),
    TEXT,
    JUNK,
)
CONTENT_PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": maybe(TEXT)}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": maybe(st.just({"url": "data:,x"}))}),
    st.fixed_dictionaries({"type": maybe(TEXT)}, optional={"text": JUNK, "input_audio": JUNK}),
    JUNK,
)
MESSAGE = st.fixed_dictionaries(
    {"role": maybe(st.sampled_from(["user", "system", "assistant", "developer", "tool", "function"]), 6)},
    optional={
        "content": st.one_of(TEXT, TEXT, st.lists(CONTENT_PART, max_size=3), JUNK),
        "name": maybe(TEXT),
        "tool_calls": JUNK,
        "tool_call_id": maybe(TEXT),
        "junk": JUNK,
    },
)
MESSAGES = st.one_of(
    st.lists(MESSAGE, min_size=1, max_size=3),
    st.just([{"role": "user", "content": "hi"}]),
    st.just([]),
    JUNK,
)
TOOL = st.one_of(
    st.fixed_dictionaries(
        {"type": maybe(st.just("function")), "function": maybe(st.fixed_dictionaries({"name": maybe(TEXT)}))},
        optional={"junk": JUNK},
    ),
    JUNK,
)
SAMPLING: dict[str, st.SearchStrategy[Any]] = {
    "max_tokens": maybe(st.sampled_from([1, 4, 16, 2**31, 10**12, 0, -5])),
    "max_completion_tokens": maybe(st.sampled_from([1, 10**9, -1])),
    "n": maybe(st.sampled_from([1, 2, 0, -1, 128, 10**6])),
    "stream": maybe(st.booleans(), 5),
    "stream_options": maybe(st.just({"include_usage": True})),
    "temperature": NUMBER,
    "top_p": NUMBER,
    "stop": maybe(st.lists(TEXT, max_size=5)),
    "seed": NUMBER,
    "logprobs": maybe(st.booleans()),
    "top_logprobs": NUMBER,
    "user": maybe(TEXT),
    "response_format": maybe(st.sampled_from([{"type": "json_object"}, {"type": "json_schema"}, {"type": "text"}])),
    "logit_bias": JUNK,
    "extra_body": JUNK,
}
LITELLM_KNOBS: dict[str, st.SearchStrategy[Any]] = {
    # LiteLLM's own request fields: a client of the gateway may send them, knowingly or not.
    "mock_response": maybe(st.sampled_from(["hi", "litellm.InternalServerError", "litellm.RateLimitError"])),
    "mock_testing_fallbacks": maybe(st.booleans()),
    "api_base": maybe(st.just("http://127.0.0.1:1/v1")),
    "base_url": maybe(st.just("http://127.0.0.1:1")),
    "api_key": maybe(TEXT),
    "timeout": maybe(st.sampled_from([0.0001, -1, 0, "1", 1e9])),
    "stream_timeout": NUMBER,
    "num_retries": maybe(st.sampled_from([0, 5, -1, 10**6])),
    "fallbacks": maybe(st.lists(st.sampled_from(MODELS), max_size=2)),
    "context_window_fallbacks": JUNK,
    "metadata": JUNK,
    "litellm_metadata": JUNK,
    "caching": JUNK,
    "guardrails": JUNK,
    "tags": JUNK,
    "user_config": JUNK,
    "model_list": JUNK,
    "secret_fields": JUNK,
    "proxy_server_request": JUNK,
}


def optional(fields: Mapping[str, st.SearchStrategy[Any]], size: int = 4) -> st.SearchStrategy[dict[str, Any]]:
    """A few of ``fields`` (0 to ``size``), each with its own value."""
    names = sorted(fields)
    return st.lists(st.sampled_from(names), max_size=size, unique=True).flatmap(
        lambda chosen: st.fixed_dictionaries({name: fields[name] for name in chosen})
    )


UNKNOWN = st.dictionaries(st.text(min_size=1, max_size=12), JUNK, max_size=2)


def body_for(endpoint: str) -> st.SearchStrategy[dict[str, Any]]:
    """A request body of ``endpoint``'s shape with random field values."""
    base: dict[str, st.SearchStrategy[Any]]
    if endpoint == "chat":
        base = {"messages": MESSAGES}
        extra = {**SAMPLING, "tools": st.lists(TOOL, max_size=2) | JUNK, "tool_choice": maybe(TEXT)}
    elif endpoint == "completions":
        base = {"prompt": st.one_of(TEXT, st.lists(TEXT, max_size=3), st.lists(st.integers(), max_size=5), JUNK)}
        extra = {**SAMPLING, "echo": JUNK, "suffix": JUNK, "best_of": NUMBER}
    elif endpoint == "embeddings":
        base = {"input": st.one_of(TEXT, st.lists(TEXT, max_size=3), st.lists(st.integers(), max_size=4), JUNK)}
        extra = {
            "encoding_format": maybe(st.sampled_from(["float", "base64"])),
            "dimensions": NUMBER,
            "user": JUNK,
        }
    elif endpoint in ("rerank", "score"):
        if endpoint == "rerank":
            base = {"query": maybe(TEXT), "documents": maybe(st.lists(maybe(TEXT), max_size=3))}
        else:
            base = {"text_1": maybe(TEXT), "text_2": maybe(st.lists(maybe(TEXT), max_size=3))}
        extra = {
            "top_n": NUMBER,
            "return_documents": JUNK,
            "queries": JUNK,
            "data_1": JUNK,
            "truncate_prompt_tokens": NUMBER,
            "use_activation": JUNK,
        }
    elif endpoint == "responses":
        base = {"input": st.one_of(TEXT, MESSAGES, st.lists(JUNK, max_size=2))}
        extra = {
            "stream": maybe(st.booleans(), 5),
            "max_output_tokens": NUMBER,
            "instructions": maybe(TEXT),
            "tools": JUNK,
            "previous_response_id": maybe(TEXT),
            "background": JUNK,
            "store": JUNK,
            "reasoning": JUNK,
            "text": JUNK,
            "conversation": JUNK,
        }
    else:
        raise ValueError(endpoint)
    model = {"model": MODEL}
    required = st.fixed_dictionaries({**model, **base}) | st.fixed_dictionaries(model, optional=base)
    return st.tuples(required, optional(extra), optional(LITELLM_KNOBS, 2), UNKNOWN).map(
        lambda parts: {**parts[3], **parts[2], **parts[1], **parts[0]}
    )


def encode(body: Any) -> bytes:
    # allow_nan: NaN/Infinity go out as JSON's non-standard literals, as sloppy clients send them
    return json.dumps(body, ensure_ascii=bool(len(str(body)) % 2)).encode("utf-8", "surrogatepass")


# --- keys --------------------------------------------------------------------------------------

WHO = st.sampled_from(["tenant", "tenant", "master", "chat_only", "revoked"])
VALID_KEY: st.SearchStrategy[KeySpec] = st.sampled_from(
    [("bearer", "tenant"), ("bearer", "tenant"), ("bearer", "master"), ("bearer", "chat_only")]
)
HEADER_BYTES = st.binary(max_size=60).map(
    lambda b: bytes(c for c in b if c == 9 or 32 <= c <= 126 or c >= 128).strip(b" \t")
)
KEYS: st.SearchStrategy[KeySpec] = st.one_of(
    st.tuples(st.just("none")),
    st.tuples(st.just("bearer"), WHO),
    st.tuples(st.just("truncated"), WHO, st.integers(min_value=0, max_value=60)),
    st.tuples(st.just("suffix"), WHO, st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=5)),
    st.tuples(
        st.just("template"),
        WHO,
        st.sampled_from(
            [
                "bearer {k}",
                "BEARER {k}",
                "Bearer  {k}",
                "Bearer\t{k}",
                "{k}",
                "Bearer",
                "Bearer ",
                "Bearer {k} {k}",
                "Bearer {k},Bearer {k}",
                "Basic {b64}",
                "Token {k}",
                "Bearer sk-",
                "Bearer sk-tw-",
                "Bearer {k}\\",
                'Bearer "{k}"',
                "Bearer {upper}",
            ]
        ),
    ),
    st.tuples(st.just("raw"), HEADER_BYTES),
    st.tuples(st.just("raw"), HEADER_BYTES.map(lambda b: b"Bearer " + b)),
    st.tuples(st.just("raw"), st.just("Bearer 台灣金鑰".encode())),
    st.tuples(
        st.just("header"),
        st.sampled_from(["x-api-key", "api-key", "x-litellm-api-key", "Ocp-Apim-Subscription-Key", "x-goog-api-key"]),
        WHO,
    ),
    st.tuples(st.just("twice"), WHO, WHO),
)


def key_headers(spec: KeySpec, secrets: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """The headers that carry the key ``spec`` names (values stripped: HTTP does not carry the ends' blanks)."""
    return [(name, value.strip(b" \t")) for name, value in _key_headers(spec, secrets)]


def _key_headers(spec: KeySpec, secrets: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    kind = spec[0]
    auth = b"authorization"
    if kind == "none":
        return []
    if kind == "raw":
        return [(auth, spec[1])]
    if kind == "header":
        return [(spec[1].lower().encode(), secrets[spec[2]].encode())]
    secret = secrets[spec[1]]
    if kind == "bearer":
        return [(auth, f"Bearer {secret}".encode())]
    if kind == "truncated":
        return [(auth, f"Bearer {secret[: spec[2]]}".strip().encode())]
    if kind == "suffix":
        return [(auth, f"Bearer {secret}{spec[2]}".encode())]
    if kind == "template":
        b64 = base64.b64encode(f"user:{secret}".encode()).decode()
        return [(auth, spec[2].format(k=secret, b64=b64, upper=secret.upper()).encode())]
    if kind == "twice":
        return [(auth, f"Bearer {secret}".encode()), (auth, f"Bearer {secrets[spec[2]]}".encode())]
    raise ValueError(spec)


# --- the four strategies -------------------------------------------------------------------------


@st.composite
def json_requests(draw: st.DrawFn) -> Case:
    """Requests of each endpoint's shape with random, wrong-typed, huge, odd or unknown values."""
    endpoint, method, paths = draw(st.sampled_from(ENDPOINTS))
    path = draw(st.sampled_from(paths))
    key = draw(st.one_of(VALID_KEY, VALID_KEY, VALID_KEY, VALID_KEY, KEYS))
    if method == "GET":
        model_id = draw(st.one_of(st.none(), st.sampled_from(MODELS), st.text(max_size=20)))
        if model_id is not None:
            path = f"{path}/{_quote(model_id)}" if model_id else f"{path}/"
        return Case("json", method, path, endpoint, None, key=key, content_type=None)
    body = draw(st.one_of(body_for(endpoint), body_for(endpoint), body_for(endpoint), JUNK))
    return Case("json", method, path, endpoint, encode(body), key=key)


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


VALID_BODIES = {
    "chat": {"model": "chat", "messages": [{"role": "user", "content": "台灣"}], "max_tokens": 4},
    "completions": {"model": "chat", "prompt": "台灣", "max_tokens": 4},
    "embeddings": {"model": "embed", "input": ["台灣", "x"]},
    "rerank": {"model": "rerank", "query": "台北", "documents": ["捷運", "夜市"]},
    "score": {"model": "rerank", "text_1": "台北", "text_2": ["捷運", "夜市"]},
    "responses": {"model": "chat", "input": "台灣", "max_output_tokens": 4},
}


@st.composite
def raw_bodies(draw: st.DrawFn) -> Case:
    """Bodies that are not a JSON object: malformed, truncated, not UTF-8, empty, arrays, scalars."""
    path = draw(st.sampled_from(POST_PATHS))
    endpoint = ENDPOINT_OF[path]
    valid = json.dumps(VALID_BODIES[endpoint], ensure_ascii=False).encode()
    kind = draw(
        st.sampled_from(
            [
                "empty",
                "binary",
                "truncated",
                "bad_utf8",
                "scalar",
                "nested",
                "bigint",
                "bom",
                "utf16",
                "dupkeys",
                "nan",
                "trailing",
                "text",
            ]
        )
    )
    if kind == "empty":
        body = draw(st.sampled_from([b"", b" ", b"\n", b"{}", b"null"]))
    elif kind == "binary":
        body = draw(st.binary(max_size=300))
    elif kind == "truncated":
        body = valid[: draw(st.integers(min_value=1, max_value=len(valid) - 1))]
    elif kind == "bad_utf8":
        at = draw(st.integers(min_value=0, max_value=len(valid)))
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xe5\x8f", b"\xed\xa0\x80", b"\xc0\xaf", b"\x80\x80"]))
        body = valid[:at] + bad + valid[at:]
    elif kind == "scalar":
        body = encode(draw(st.one_of(SCALAR, st.lists(JUNK, max_size=3))))
    elif kind == "nested":
        depth = draw(st.sampled_from([50, 1000, 5000, 100_000]))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        inner = opener * depth + b"1" + closer * depth
        body = valid[:-1] + b', "messages": ' + inner + b"}" if draw(st.booleans()) else inner
    elif kind == "bigint":
        digits = draw(st.sampled_from([4301, 5000, 20_000]))
        field = draw(st.sampled_from(["max_tokens", "n", "temperature", "top_n", "seed"]))
        body = valid[:-1] + f', "{field}": {"9" * digits}'.encode() + b"}"
    elif kind == "bom":
        body = b"\xef\xbb\xbf" + valid
    elif kind == "utf16":
        body = valid.decode().encode(draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32"])))
    elif kind == "dupkeys":
        body = b'{"model": 1, "model": null, ' + valid[1:]
    elif kind == "nan":
        literal = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999999", b"-0", b"1E400"]))
        field = draw(st.sampled_from([b"max_tokens", b"temperature", b"n", b"top_n"]))
        body = valid[:-1] + b', "' + field + b'": ' + literal + b"}"
    elif kind == "trailing":
        body = valid + draw(st.sampled_from([b"}", b",", b"garbage", b"\x00", b"\n\n{}", valid]))
    else:
        body = draw(st.text(max_size=80)).encode("utf-8", "surrogatepass")
    content_type = draw(st.sampled_from([b"application/json", b"application/json", None, b"text/plain"]))
    return Case("raw", "POST", path, endpoint, body, key=draw(VALID_KEY), content_type=content_type)


CONTENT_TYPES = st.sampled_from(
    [
        None,
        b"",
        b"application/json; charset=utf-8",
        b"application/json; charset=latin-1",
        b"application/json; charset=utf-16",
        b"text/plain",
        b"application/x-www-form-urlencoded",
        b"multipart/form-data; boundary=xyz",
        b"multipart/form-data",
        b"application/xml",
        b"*/*",
        b"application/json, text/plain",
        b"\xe5\x8f\xb0/\xe7\x81\xa3",
    ]
)
HEADER_NAMES = st.sampled_from(
    [
        "x-fuzz",
        "user-agent",
        "accept",
        "accept-encoding",
        "accept-language",
        "content-encoding",
        "cookie",
        "referer",
        "origin",
        "x-forwarded-for",
        "x-real-ip",
        "forwarded",
        "traceparent",
        "x-request-id",
        "openai-organization",
        "openai-project",
        "x-litellm-timeout",
        "x-litellm-stream-timeout",
        "x-litellm-num-retries",
        "x-litellm-tags",
        "x-litellm-spend-logs-metadata",
        "x-litellm-enable-message-redaction",
        "litellm-disable-message-redaction",
        "x-litellm-end-user-id",
        "x-litellm-trace-id",
        "x-litellm-session-id",
        "anthropic-version",
        "x-stainless-retry-count",
        "expect",
        "range",
        "if-none-match",
    ]
)
HEADER_VALUES = st.one_of(
    HEADER_BYTES,
    st.sampled_from(
        [
            b"gzip",
            b"br",
            b"deflate",
            b"identity",
            b"-1",
            b"0",
            b"1e9",
            b"NaN",
            b"true",
            b"null",
            b"[]",
            b"{",
            b"100-continue",
        ]
    ),
    st.sampled_from(["台灣", "é", "😀"]).map(lambda s: s.encode("utf-8")),
    st.integers(min_value=1, max_value=7000).map(lambda n: b"a" * n),  # long, within uvicorn's header limit
)


@st.composite
def odd_headers(draw: st.DrawFn) -> Case:
    """A valid request with odd headers: long values, odd content types, duplicates, non-ASCII bytes."""
    path = draw(st.sampled_from(POST_PATHS + ("/v1/models",)))
    endpoint = ENDPOINT_OF[path]
    headers = draw(st.lists(st.tuples(HEADER_NAMES.map(str.encode), HEADER_VALUES), max_size=4))
    if draw(st.booleans()):  # the same header twice with different values
        name = draw(HEADER_NAMES).encode()
        headers += [(name, draw(HEADER_VALUES)), (name, draw(HEADER_VALUES))]
    content_type = draw(CONTENT_TYPES)
    if draw(st.integers(0, 5)) == 0:
        headers.append((b"content-type", b"application/json"))  # two content types
    if endpoint == "models":
        return Case("headers", "GET", path, endpoint, None, tuple(headers), draw(VALID_KEY), content_type)
    body = dict(VALID_BODIES[endpoint])
    if endpoint in ("chat", "completions", "responses") and draw(st.booleans()):
        body["stream"] = True
    return Case("headers", "POST", path, endpoint, encode(body), tuple(headers), draw(VALID_KEY), content_type)


@st.composite
def api_keys(draw: st.DrawFn) -> Case:
    """A valid request with a random, truncated, empty, revoked, doubled or odd-scheme key."""
    path = draw(st.sampled_from(POST_PATHS + ("/v1/models",)))
    endpoint = ENDPOINT_OF[path]
    key = draw(KEYS)
    if endpoint == "models":
        return Case("keys", "GET", path, endpoint, None, key=key, content_type=None)
    return Case("keys", "POST", path, endpoint, encode(VALID_BODIES[endpoint]), key=key)


STRATEGIES: Mapping[str, Callable[[], st.SearchStrategy[Case]]] = {
    "json": json_requests,
    "raw": raw_bodies,
    "headers": odd_headers,
    "keys": api_keys,
}


# --- the gateway ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Gateway:
    proxy: ProxyHandle
    upstream: EchoUpstream
    secrets: dict[str, str]
    upstream_failures: list[str]
    """One entry per request the stand-in engine failed on (its handler raised)."""

    @property
    def url(self) -> str:
        return self.proxy.base_url

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, trust_env=False)


def make_keys(database_url: str) -> dict[str, str]:
    """Secrets by name: a tenant key for every model, one for `chat` only, a revoked one, the master key."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        tenant = store.create_tenant(conn, f"fuzz-{os.getpid()}-{int(time.time())}").name
        _, every = store.create_key(conn, tenant)
        _, chat_only = store.create_key(conn, tenant, store.KeySettings(models=("chat",)))
        revoked_record, revoked = store.create_key(conn, tenant)
        store.revoke_key(conn, str(revoked_record.id))
    return {"tenant": every, "chat_only": chat_only, "revoked": revoked, "master": MASTER}


@dataclasses.dataclass
class Started:
    gateway: Gateway
    stop: Callable[[], None]


def start(folder: Path, database_url: str) -> Started:
    """The gateway (one worker) in front of the echo stand-in, keys in ``database_url``."""
    env = {"TWLLM_MASTER_KEY": MASTER}
    loaded = parse_spec(SPEC, str(folder / "fuzz.yaml"), env)
    plan = make_plan(loaded, GpuInventory(8, 80, "test"), folder / "state")
    render(plan, loaded.spec, folder)
    upstream = EchoUpstream()
    failures: list[str] = []

    def handle_error(request: object, client_address: object) -> None:  # the stand-in's handler raised
        import sys

        failures.append(repr(sys.exc_info()[1]))

    upstream.server.handle_error = handle_error  # type: ignore[method-assign]
    path = folder / "litellm_config.yaml"
    config = yaml.safe_load(path.read_text())
    for deployment in config["model_list"]:  # answered by the echo stand-in, through vLLM's provider
        deployment["litellm_params"]["api_base"] = upstream.base_url
    config["general_settings"]["background_health_checks"] = False
    # The stand-in fails (drops the connection) on some junk a real engine answers with a 400, and
    # rerank/score answer 404: no cooldown, or later valid requests would get 503s for them.
    config["router_settings"]["disable_cooldowns"] = True
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    upstream.__enter__()
    try:
        proxy = start_proxy(
            path,
            env={
                **env,
                ENGINE_KEY_ENV: "sk-engine-fuzz",
                "TWLLM_GATEWAY_SETTINGS": str(folder / "gateway.json"),
                "TWLLM_DATABASE_URL": database_url,
                "TWLLM_SPOOL_DIR": str(folder / "spool"),
            },
            workers=1,
            timeout=300,
        )
    except BaseException:
        upstream.__exit__()
        raise

    def stop() -> None:
        try:
            proxy.stop()
        finally:
            upstream.__exit__()

    return Started(Gateway(proxy, upstream, make_keys(database_url), failures), stop)


# --- sending and judging -----------------------------------------------------------------------

LEAK = re.compile(
    r"(?i:litellm|hosted_vllm|traceback|file \"|https?://|127\.0\.0\.1|localhost|<[a-z_.]+ object at 0x|"
    r"sk-fuzz-master|sk-engine)|\b[A-Z]\w*(?:Error|Exception)\b"
)


@dataclasses.dataclass
class Outcome:
    case: Case
    status: int | None
    """None: no answer (connection dropped or timed out)."""
    problems: list[str]
    upstream_5xx: bool = False
    """A 502/503/504 after the stand-in engine failed on the request (the engine's, not ours)."""
    stream: bool = False


def shape_problems(body: Any, sent: bytes) -> list[str]:
    """What is wrong with ``body`` as OpenAI's error shape (``sent``: the request, for leaks)."""
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return [f"not OpenAI's error shape: {str(body)[:300]}"]
    error = body["error"]
    problems = []
    if not isinstance(error.get("message"), str) or not error["message"]:
        problems.append(f"error.message is not a non-empty string: {error!r:.300}")
    if not isinstance(error.get("type"), str) or not error["type"]:
        problems.append(f"error.type is not a non-empty string: {error!r:.300}")
    for name in ("param", "code"):
        if name not in error:
            problems.append(f"error.{name} is missing: {error!r:.300}")
        elif error[name] is not None and not isinstance(error[name], str):
            problems.append(f"error.{name} is not a string or null: {error!r:.300}")
    for match in LEAK.finditer(str(error.get("message", ""))):
        if match.group(0).encode().lower() not in sent.lower():
            problems.append(f"error.message shows the machinery ({match.group(0)!r}): {error['message'][:300]!r}")
            break
    return problems


def stream_problems(lines: Iterator[str], endpoint: str, sent: bytes) -> list[str]:
    problems = []
    for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            continue
        try:
            data = json.loads(payload)
        except ValueError:
            problems.append(f"a stream event is not JSON: {payload[:200]!r}")
            continue
        if not isinstance(data, dict):
            problems.append(f"a stream event is not an object: {payload[:200]!r}")
        elif endpoint == "responses":
            if data.get("type") == "error" and not isinstance(data.get("message"), str):
                problems.append(f"a Responses error event without a message: {payload[:300]}")
            if data.get("type") == "response.failed":
                error = (data.get("response") or {}).get("error") or {}
                if not isinstance(error.get("message"), str) or "code" not in error:
                    problems.append(f"a response.failed event without code and message: {payload[:300]}")
        elif "error" in data and "choices" not in data:
            problems += shape_problems({"error": data["error"]}, sent)
    return problems


def send(client: httpx.Client, gateway: Gateway, case: Case) -> Outcome:
    headers = key_headers(case.key, gateway.secrets)
    if case.content_type is not None:
        headers.append((b"content-type", case.content_type))
    headers += list(case.headers)
    sent = (case.body or b"") + case.path.encode() + b"".join(v for _, v in headers)
    failed_before = len(gateway.upstream_failures)
    request = client.build_request(case.method, case.path, content=case.body, headers=headers)
    try:
        reply = client.send(request, stream=True)
    except httpx.HTTPError as exc:
        return Outcome(case, None, [f"no answer: {type(exc).__name__}: {exc}"])
    try:
        streamed = reply.headers.get("content-type", "").startswith("text/event-stream")
        problems: list[str] = []
        if streamed and reply.status_code < 400:
            try:
                problems += stream_problems(reply.iter_lines(), case.endpoint, sent)
            except httpx.HTTPError as exc:
                problems.append(f"the stream broke: {type(exc).__name__}: {exc}")
        else:
            try:
                raw = reply.read()
            except httpx.HTTPError as exc:
                return Outcome(case, reply.status_code, [f"the body broke: {type(exc).__name__}: {exc}"])
            if reply.status_code >= 400:
                try:
                    problems += shape_problems(json.loads(raw), sent)
                except ValueError:
                    problems.append(f"error body is not JSON: {raw[:300]!r}")
    finally:
        reply.close()
    status = reply.status_code
    upstream = status in (502, 503, 504) and len(gateway.upstream_failures) > failed_before
    if status >= 500 and not upstream:
        problems.insert(0, f"{status} from the gateway")
    return Outcome(case, status, problems, upstream, streamed)


def tracebacks(log_text: str) -> list[str]:
    """Each traceback in the gateway's log, with a few lines after it."""
    lines = log_text.splitlines()
    return ["\n".join(lines[i : i + 30]) for i, line in enumerate(lines) if "Traceback" in line]
