"""vLLM's score API (``POST /score``, ``/v1/score``) through the gateway, served as a rerank.

LiteLLM has no score route, and a route of its own in the shield would need its own copy of
everything a request goes through: tenant-key auth, the key's models, rate limits and budget, the
Safety Guard, replica routing and retries, the ledger. A cross-encoder's score of a pair is the
relevance score its rerank gives the same pair (vLLM runs one classification per pair for both,
``ServingScores``), so the shield turns a score request into a rerank request to LiteLLM's
``/v1/rerank`` — the same path, hooks and ledger row as any rerank — and the rerank's answer
back into vLLM's score answer (``data[i].score`` for document ``i``, in document order; usage).

What a score request may hold (vLLM's names for the two sides: ``text_1``/``text_2``,
``queries``/``documents``, ``queries``/``items``, ``data_1``/``data_2``): one query (a string,
or a list of one) and one or more documents. vLLM also pairs N queries with N documents one to
one; a rerank has one query, so that form is refused (400 ``unsupported_parameter``): send one
request per query. Truncation settings and ``instruction`` are passed on; ``use_activation:
false`` (raw logits), ``chat_template_kwargs`` and ``mm_processor_kwargs`` cannot be, and are
refused; other fields vLLM ignores or that only schedule (``priority``, ``request_id``) are
dropped.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from twllm.gateway import errors
from twllm.gateway.replay import replaying

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PATH = re.compile(r"/(?:v1/)?score")
"""The score routes (vLLM serves both; ``/v1/score`` is its deprecated spelling)."""
RERANK_PATH = "/v1/rerank"
"""Where a score request is sent inside the gateway (LiteLLM's rerank route)."""
SIDES = (("text_1", "text_2"), ("queries", "documents"), ("queries", "items"), ("data_1", "data_2"))
"""vLLM's names for the query side and the document side of a score request."""
FORWARDED = (
    "user",
    "truncate_prompt_tokens",
    "truncation_side",
    "max_tokens_per_query",
    "max_tokens_per_doc",
    "instruction",
)
"""Fields of a score request that a rerank request takes as they are."""
REFUSED = ("chat_template_kwargs", "mm_processor_kwargs")
"""Fields that would change the scores but that LiteLLM's rerank does not pass on to vLLM."""


class ScoreRequestError(ValueError):
    """A score request the gateway cannot serve: 400 with this message and param."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def public(self) -> errors.PublicError:
        return errors.make(400, self.message, self.code, self.param)


def is_score(path: str) -> bool:
    return PATH.fullmatch(path.rstrip("/")) is not None


def rerank_request(score: Any) -> dict[str, Any]:
    """The rerank request that asks what ``score`` (a parsed score request) asks; raises
    ScoreRequestError for what a rerank cannot ask."""
    if not isinstance(score, Mapping):
        raise ScoreRequestError("The request body must be a JSON object.")
    given = [(q, d) for q, d in SIDES if q in score and d in score]
    if not given:
        raise ScoreRequestError(
            "A score request needs text_1 and text_2 (or queries and documents, queries and items, data_1 and data_2).",
            "text_1",
        )
    q_name, d_name = given[0]
    query = score[q_name]
    documents = score[d_name]
    if isinstance(documents, (str, Mapping)):
        documents = [documents]
    if not isinstance(documents, list) or not documents:
        raise ScoreRequestError("At least one text_pair element must be given", d_name)
    if isinstance(query, list):
        if len(query) != 1:
            raise ScoreRequestError(
                f"This gateway scores one query against its documents ({q_name} must be one text); "
                f"pairing {len(query)} queries with {len(documents)} documents one to one is not supported: "
                "send one request per query.",
                q_name,
                "unsupported_parameter",
            )
        query = query[0]
    if not isinstance(query, str):
        raise ScoreRequestError(f"{q_name} must be a text: this gateway scores text only.", q_name)
    if score.get("use_activation") is False:
        raise ScoreRequestError(
            "use_activation: false (raw logits) is not supported by this gateway; scores are the model's "
            "activated relevance scores.",
            "use_activation",
            "unsupported_parameter",
        )
    for name in REFUSED:
        if score.get(name):
            raise ScoreRequestError(f"{name} is not supported by this gateway.", name, "unsupported_parameter")
    rerank: dict[str, Any] = {"query": query, "documents": list(documents)}
    if "model" in score:
        rerank = {"model": score["model"], **rerank}
    rerank.update({name: score[name] for name in FORWARDED if score.get(name) is not None})
    return rerank


def score_response(rerank: Any, model: Any, documents: int) -> dict[str, Any]:
    """vLLM's score answer from the gateway's rerank answer (results in any order, each with its
    document's ``index`` and ``relevance_score``)."""
    if not isinstance(rerank, Mapping) or not isinstance(rerank.get("results"), list):
        raise ValueError("the rerank answer has no results")
    scores: dict[int, float] = {}
    for result in rerank["results"]:
        scores[int(result["index"])] = float(result["relevance_score"])
    if sorted(scores) != list(range(documents)):
        raise ValueError(f"the rerank answer scored {len(scores)} of {documents} documents")
    tokens = _tokens(rerank)
    return {
        "id": str(rerank.get("id") or ""),
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": [{"index": i, "object": "score", "score": scores[i]} for i in range(documents)],
        "usage": {
            "prompt_tokens": tokens,
            "total_tokens": tokens,
            "completion_tokens": 0,
            "prompt_tokens_details": None,
            "completion_tokens_details": None,
        },
    }


def _tokens(rerank: Mapping[str, Any]) -> int:
    meta = rerank.get("meta") if isinstance(rerank.get("meta"), Mapping) else {}
    for section, name in (("tokens", "input_tokens"), ("billed_units", "total_tokens")):
        part = meta.get(section) if isinstance(meta, Mapping) else None
        if isinstance(part, Mapping) and isinstance(part.get(name), int):
            return int(part[name])
    usage = rerank.get("usage")  # a rerank answer in vLLM's (Jina's) own shape
    if isinstance(usage, Mapping) and isinstance(usage.get("prompt_tokens"), int):
        return int(usage["prompt_tokens"])
    return 0


async def serve(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer a score request with ``app`` (LiteLLM's proxy) answering it as a rerank. ``send``
    is the shield's error-rewriting send: an error (ours, or the rerank's) leaves through it."""
    body = await _read(receive)
    if body is None:  # the client went away
        return
    try:
        request = json.loads(body)
    except ValueError:
        await _send_error(send, errors.make(400, "We could not parse the JSON body of your request."))
        return
    try:
        rerank = rerank_request(request)
    except ScoreRequestError as refused:
        await _send_error(send, refused.public())
        return
    payload = json.dumps(rerank, ensure_ascii=False).encode("utf-8")
    headers = [
        (k, v) for k, v in scope.get("headers", ()) if k.lower() not in (b"content-length", b"transfer-encoding")
    ]
    headers.append((b"content-length", str(len(payload)).encode()))
    inner = {**scope, "path": RERANK_PATH, "raw_path": RERANK_PATH.encode(), "headers": headers}
    captured = _Captured()
    await app(inner, replaying(payload, receive), captured.send)
    if captured.start is None:
        return
    if captured.start["status"] >= 400:  # the shield's send rewrites it into OpenAI's shape
        await send(captured.start)
        await send({"type": "http.response.body", "body": captured.body(), "more_body": False})
        return
    try:
        answer = score_response(json.loads(captured.body()), request.get("model"), len(rerank["documents"]))
    except (ValueError, KeyError, TypeError):
        await _send_error(send, errors.make(502))
        return
    out = json.dumps(answer, ensure_ascii=False).encode("utf-8")
    keep = [
        (k, v) for k, v in captured.start.get("headers", ()) if k.lower() not in (b"content-length", b"content-type")
    ]
    keep += [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]
    await send({"type": "http.response.start", "status": captured.start["status"], "headers": keep})
    await send({"type": "http.response.body", "body": out, "more_body": False})


class _Captured:
    """A send that keeps the response instead of sending it."""

    def __init__(self) -> None:
        self.start: Message | None = None
        self.chunks: list[bytes] = []

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.start = message
        elif message["type"] == "http.response.body":
            self.chunks.append(message.get("body", b""))

    def body(self) -> bytes:
        return b"".join(self.chunks)


async def _read(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _send_error(send: Send, error: errors.PublicError) -> None:
    body = error.encoded()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
