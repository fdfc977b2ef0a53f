"""The Safety Guard inside the LiteLLM gateway: one guardrail, on for every request.

The rendered LiteLLM config names it whenever a guard policy is active
(``twllm.render.litellm_config.litellm_config``)::

    guardrails:
      - guardrail_name: twllm-guard
        litellm_params: {guardrail: twllm.guard.gateway.TwllmGuardrail, mode: [pre_call, post_call], default_on: true}

Per request it resolves the policy (gateway-wide < the model's < the key's or tenant's, see
``policy.py``) and runs that policy's pipeline:

- pre-call (chat and text completions): the input stages on the last user turn (earlier user
  and system turns get the PII stage only: a client resending history resends its PII); a mask
  rewrites the request before it leaves for the engine; the model's zh-TW system prompt is added
  when the request has none.
- post-call: the output stages on each choice's answer (never its tool calls); a mask (or a
  zh-TW normalisation) rewrites the answer. A request for JSON (``response_format``) tells the
  zh_tw stage to keep keys and the values the schema fixes (``twllm.zh_tw.structured``).
- streams: ``streaming.OutputStream`` per choice — rewriting stages incrementally, classifier
  stages on held windows, so unsafe text never reaches the client.

Responses API requests (``/v1/responses``) get the same, where their texts are: ``input`` and
``instructions``, the answer's ``output_text`` parts and stream events (``responses.py``).

A block is HTTP 400 with an OpenAI-style error (``code`` content_blocked, pii_blocked or
guard_failed) and a message in Traditional Chinese and English; in a stream that has started, an
error event ends it. Checks run in a worker thread, never on the event loop.

What each stage decided (verdict, categories, entity and rule — never the text) is kept per call
id for the spend logger, which writes it to the ledger's ``guard`` column (``take_record``).
Embedding requests get the PII stage only (their texts are masked or refused; nothing else runs);
so do rerank requests (``/v1/rerank``, and ``/score`` which the gateway serves as a rerank): the
query and every document, before any of them reaches the engine.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any, get_args

from litellm.integrations.custom_guardrail import CustomGuardrail
from litellm.proxy._types import ProxyException, UserAPIKeyAuth

from twllm.gateway import metrics
from twllm.gateway.settings import GatewaySettings
from twllm.gateway.streams import faithful
from twllm.guard import responses as responses_guard
from twllm.guard.pipeline import PROMPT_INJECTION, GuardPipeline, GuardResult, ModelCache, Stage
from twllm.guard.policy import GuardPolicies, UnknownPolicy
from twllm.guard.streaming import OutputStream, StreamBlocked
from twllm.settings import GATEWAY_SETTINGS_ENV
from twllm.spec.schema import PiiEntity
from twllm.zh_tw.structured import JsonFormat, json_format

log = logging.getLogger(__name__)

CHAT_CALLS = frozenset({"completion", "acompletion", "text_completion", "atext_completion"})
EMBED_CALLS = frozenset({"embedding", "aembedding"})
RERANK_CALLS = frozenset({"rerank", "arerank"})
PII_ONLY_CALLS = EMBED_CALLS | RERANK_CALLS
"""Calls whose texts get the PII stage alone: no answer text comes back to screen, and a
classifier's verdict on a document is not a verdict on a user's request."""
RESPONSES_CALLS = frozenset({"responses", "aresponses"})
"""The Responses API: screened as chat is, where its texts are (``responses.py``)."""
LONG_TEXT = 20_000
"""Characters of request text beyond which even PII screening moves off the event loop."""
RECORDS_MAX = 20_000
"""Verdicts a worker keeps for the spend logger; the oldest are dropped first."""
OUTPUT_WAIT_S = 5.0
"""How long the spend logger waits, beyond the guard's own timeout, for an output verdict."""


class GuardBlocked(ProxyException):
    """A request or answer the guard refused: HTTP 400, OpenAI-style body, our ``code``."""

    def __init__(self, result: GuardResult, code: str) -> None:
        super().__init__(
            message=result.message or "blocked by the Safety Guard",
            type="invalid_request_error",
            param=None,
            code=400,
            openai_code=code,
        )
        self.status_code = 400  # what a stream's error event reads
        self.result = result

    def to_dict(self) -> dict:
        data = super().to_dict()
        data["code"] = self.openai_code
        return data


PII_ENTITIES = frozenset(get_args(PiiEntity))
METRIC_CATEGORIES = PII_ENTITIES | {PROMPT_INJECTION} | {f"S{n}" for n in range(1, 15)}
"""The categories a verdict may carry as a metric label (anything else, say a category a guard
model made up, counts as ``other``): a bounded set, never text."""


def block_code(result: GuardResult) -> str:
    """The error's ``code``: guard_failed (a check could not run, or its verdict could not be
    read), pii_blocked (personal data), content_blocked (a safety category, prompt injection)."""
    if not result.categories:
        return "guard_failed"
    if all(c in PII_ENTITIES for c in result.categories):
        return "pii_blocked"
    return "content_blocked"


def summary(result: GuardResult) -> dict[str, Any]:
    """What the ledger keeps of a verdict: no text, no offsets."""
    data: dict[str, Any] = {"verdict": result.verdict}
    if result.categories:
        data["categories"] = list(result.categories)
    rules = sorted({f"{f['entity']}:{f['rule']}" for f in result.findings})
    if rules:
        data["rules"] = rules
    if result.notes:
        data["notes"] = list(result.notes)
    return data


class GuardState:
    """What the guardrail holds in one worker: policies, pipelines, verdicts by call id."""

    def __init__(self, policies: GuardPolicies) -> None:
        self.pid = os.getpid()
        self.policies = policies
        self.cache = ModelCache()
        self.pipelines: dict[tuple[str | None, str | None], GuardPipeline] = {}
        self.records: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.pending: dict[str, asyncio.Event] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> GuardState:
        path = os.environ.get(GATEWAY_SETTINGS_ENV)
        return cls(GuardPolicies.from_settings(GatewaySettings.load(path).guard if path else None))

    def pipeline(self, model: str | None, policy: str | None) -> GuardPipeline:
        key = (model, policy)
        with self._lock:
            if key not in self.pipelines:
                spec = self.policies.resolve(model, policy)
                self.pipelines[key] = GuardPipeline(spec, remote=self.policies.remote, cache=self.cache)
            return self.pipelines[key]

    # --- verdicts for the ledger ---------------------------------------------------------------
    def note(self, call_id: str | None, stage: str, result: GuardResult) -> None:
        metrics.observe_guard(
            stage,
            [c if c in METRIC_CATEGORIES else metrics.OTHER for c in result.categories],
            result.verdict,
        )
        if not call_id:
            return
        record = self.records.setdefault(call_id, {})
        record[stage] = summary(result)
        self.records.move_to_end(call_id)
        while len(self.records) > RECORDS_MAX:
            self.records.popitem(last=False)
        if stage == "output":
            event = self.pending.pop(call_id, None)
            if event is not None:
                event.set()

    def expect_output(self, call_id: str | None) -> None:
        if call_id:
            self.pending.setdefault(call_id, asyncio.Event())

    def output_done(self, call_id: str | None) -> None:
        """No output verdict will come (the request failed or was blocked on input)."""
        event = self.pending.pop(call_id or "", None)
        if event is not None:
            event.set()

    async def take(self, call_id: str | None, wait_s: float) -> dict[str, Any] | None:
        if not call_id:
            return None
        event = self.pending.get(call_id)
        if event is not None:
            try:
                await asyncio.wait_for(event.wait(), wait_s)
            except TimeoutError:
                self.pending.pop(call_id, None)
        return self.records.pop(call_id, None)


_state: GuardState | None = None
_state_lock = threading.Lock()


def state() -> GuardState:
    global _state
    with _state_lock:
        if _state is None or _state.pid != os.getpid():
            _state = GuardState.from_env()
        return _state


async def take_record(call_id: str | None, *, failed: bool = False) -> dict[str, Any] | None:
    """The guard's verdicts on a call, for its ledger row (None when the guard is off or passed
    it by); on success waits a little for an output verdict still being decided. A failed call
    gets no output verdict (a block is noted before it is raised), and LiteLLM awaits its failure
    logging before it answers the client: never wait then."""
    if _state is None or _state.pid != os.getpid():
        return None
    if failed:
        _state.output_done(call_id)
        return await _state.take(call_id, 0)
    timeout = OUTPUT_WAIT_S + max((p.spec.llama_guard.timeout_s for p in list(_state.pipelines.values())), default=0)
    return await _state.take(call_id, timeout)


# --- request and response text ---------------------------------------------------------------


def _texts(content: Any) -> list[tuple[Any, str]]:
    """(setter key, text) pairs of a message's content: a string, or a list of parts."""
    if isinstance(content, str):
        return [(None, content)]
    if isinstance(content, list):
        return [
            (i, part.get("text") or "")
            for i, part in enumerate(content)
            if isinstance(part, Mapping) and part.get("type") == "text"
        ]
    return []


def _set_text(message: dict[str, Any], key: Any, text: str) -> None:
    if key is None:
        message["content"] = text
    else:
        message["content"][key] = {**message["content"][key], "text": text}


def _policy_of(user: UserAPIKeyAuth | None) -> str | None:
    metadata = getattr(user, "metadata", None) or {}
    return metadata.get("twllm_guard_policy") if isinstance(metadata, Mapping) else None


def _call_id(data: Mapping[str, Any]) -> str | None:
    value = data.get("litellm_call_id")
    return str(value) if value else None


class TwllmGuardrail(CustomGuardrail):
    """LiteLLM guardrail running twllm's guard pipeline (see the module docstring)."""

    use_native_lifecycle_hooks = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Load the gateway-wide guard models in the background as the worker starts, so the
        # first request does not wait for them (a failure shows in that request's verdict).
        threading.Thread(target=_warm_up, name="twllm-guard-warm-up", daemon=True).start()

    # --- input --------------------------------------------------------------------------------
    async def async_pre_call_hook(
        self, user_api_key_dict: UserAPIKeyAuth, cache: Any, data: dict, call_type: str
    ) -> dict | None:
        if call_type not in CHAT_CALLS and call_type not in PII_ONLY_CALLS and call_type not in RESPONSES_CALLS:
            return data
        st = state()
        model = data.get("model")
        try:
            pipeline = st.pipeline(model, _policy_of(user_api_key_dict))
        except UnknownPolicy as exc:
            log.error("twllm guard: the key's guard policy %s is not defined in the spec", exc)
            raise GuardBlocked(
                GuardResult(
                    "block",
                    [],
                    "",
                    message=(
                        "此金鑰的安全政策未設定，已拒絕。 Blocked: this key's guard policy is not defined "
                        "in the deployment's spec."
                    ),
                ),
                "guard_failed",
            ) from None
        call_id = _call_id(data)
        if call_type in PII_ONLY_CALLS:  # texts to embed or rank: personal data is masked, nothing else runs
            if "pii" in pipeline.stages("input"):
                if call_type in RERANK_CALLS:
                    result = await _run(pipeline, "input", _screen_rerank, pipeline, data, ["pii"])
                else:
                    result = await _run(pipeline, "input", _screen_field, pipeline, data, "input", ["pii"])
                if result.verdict != "allow":
                    st.note(call_id, "input", result)
                else:  # an allowed input is kept out of the ledger's record, but counted
                    metrics.observe_guard("input", [], "allow")
                if result.blocked:
                    raise GuardBlocked(result, block_code(result))
            return data
        if isinstance(data.get("messages"), list):
            self._system_prompt(data, st.policies.system_prompt(model))
        elif call_type in RESPONSES_CALLS:
            responses_guard.add_system_prompt(data, st.policies.system_prompt(model))
        if pipeline.stages("input"):
            if call_type in RESPONSES_CALLS:
                result = await _run(pipeline, "input", responses_guard.screen_request, pipeline, data, _combine)
            else:
                result = await _run(pipeline, "input", self._screen_request, pipeline, data)
            if result.verdict != "allow":
                st.note(call_id, "input", result)
            else:  # an allowed input is kept out of the ledger's record, but counted
                metrics.observe_guard("input", [], "allow")
            if result.blocked:
                raise GuardBlocked(result, block_code(result))
        if pipeline.stages("output"):
            st.expect_output(call_id)
        return data

    @staticmethod
    def _system_prompt(data: dict, prompt: str | None) -> None:
        messages = data["messages"]
        if prompt and not any(isinstance(m, Mapping) and m.get("role") in ("system", "developer") for m in messages):
            data["messages"] = [{"role": "system", "content": prompt}, *messages]

    @staticmethod
    def _screen_request(pipeline: GuardPipeline, data: dict) -> GuardResult:
        if isinstance(data.get("messages"), list):
            return _screen_messages(pipeline, data)
        return _screen_field(pipeline, data, "prompt")

    async def async_post_call_failure_hook(
        self,
        request_data: dict,
        original_exception: Exception,
        user_api_key_dict: UserAPIKeyAuth,
        traceback_str: str | None = None,
    ) -> None:
        """The call failed (the engine refused it, or could not be reached): no output verdict
        will come, so the spend logger must not wait for one (it would hold the error back)."""
        if _state is not None and _state.pid == os.getpid():
            _state.output_done(_call_id(request_data))
        return None

    # --- output -------------------------------------------------------------------------------
    async def async_post_call_success_hook(self, data: dict, user_api_key_dict: UserAPIKeyAuth, response: Any) -> Any:
        choices = getattr(response, "choices", None)
        answer = responses_guard.is_response(response)  # a Responses API answer: its output items
        if not (choices or answer) or data.get("stream"):
            return response
        st = state()
        call_id = _call_id(data)
        try:
            pipeline = st.pipeline(data.get("model"), _policy_of(user_api_key_dict))
        except UnknownPolicy:
            return response  # refused before the call
        if not pipeline.stages("output"):
            return response
        messages = (
            data.get("messages")
            if isinstance(data.get("messages"), list)
            else [{"role": "user", "content": data.get("prompt") if isinstance(data.get("prompt"), str) else ""}]
        )
        try:
            if answer:
                result = await _run(
                    pipeline,
                    "output",
                    responses_guard.screen_response,
                    pipeline,
                    response,
                    responses_guard.conversation(data),
                    _combine,
                    json_format(data),
                )
            else:
                structure = json_format(data)
                result = await _run(pipeline, "output", _screen_choices, pipeline, choices, messages, structure)
        except BaseException:
            st.output_done(call_id)
            raise
        st.note(call_id, "output", result)
        if result.blocked:
            raise GuardBlocked(result, block_code(result))
        return response

    async def async_post_call_streaming_iterator_hook(
        self, user_api_key_dict: UserAPIKeyAuth, response: Any, request_data: dict
    ) -> AsyncGenerator[Any, None]:
        st = state()
        call_id = _call_id(request_data)
        chunks = faithful(response, request_data)
        try:
            pipeline = st.pipeline(request_data.get("model"), _policy_of(user_api_key_dict))
        except UnknownPolicy:
            pipeline = None
        if pipeline is None or not pipeline.stages("output"):
            async for chunk in chunks:
                yield chunk
            return
        window = pipeline.spec.stream_window
        messages = request_data.get("messages") if isinstance(request_data.get("messages"), list) else []
        streams: dict[int, OutputStream] = {}
        structure = json_format(request_data)  # a JSON answer: keys and fixed values never change
        finished = False
        # Masking and normalising a chunk take microseconds: done in place. A classifier check
        # (Llama Guard on a window) runs in a worker thread, off the event loop.
        offload = _needs_thread(pipeline, "output")

        async def call(fn: Any, *args: Any) -> Any:
            return await asyncio.to_thread(fn, *args) if offload else fn(*args)

        if responses_guard.is_request(request_data):  # Responses API events
            answer = responses_guard.ResponseStream(
                pipeline, responses_guard.conversation(request_data), window, call, structure
            )
            async for event in self._response_events(st, call_id, answer, chunks):
                yield event
            return
        try:
            async for chunk in chunks:
                choices = getattr(chunk, "choices", None) or []
                # A chunk is dropped only when all it carried was text that a stage holds back
                # for now; anything else (a role, a finish reason, tool calls, logprobs, usage)
                # goes out as the engine sent it.
                keep = not choices or getattr(chunk, "usage", None) is not None
                for choice in choices:
                    index = getattr(choice, "index", 0) or 0
                    stream = streams.get(index)
                    if stream is None:
                        stream = streams[index] = OutputStream(pipeline, messages, window, structure)
                    delta = getattr(choice, "delta", None)
                    text = getattr(delta, "content", None) if delta is not None else getattr(choice, "text", None)
                    piece = await call(stream.feed, text) if text else ""
                    finish = getattr(choice, "finish_reason", None)
                    if finish:
                        piece += await call(stream.flush)
                    if delta is not None:
                        if text is not None or piece:
                            delta.content = piece
                        keep = (
                            keep
                            or bool(piece)
                            or bool(finish)
                            or not text
                            or bool(getattr(delta, "role", None))
                            or bool(getattr(delta, "tool_calls", None))
                            or bool(getattr(choice, "logprobs", None))
                        )
                    else:
                        if text is not None or piece:
                            choice.text = piece
                        keep = (
                            keep or bool(piece) or bool(finish) or not text or bool(getattr(choice, "logprobs", None))
                        )
                if keep:
                    yield chunk
            for stream in streams.values():  # a stream that ended without a finish_reason
                rest = await call(stream.flush)
                if rest:
                    log.warning(
                        "twllm guard: a stream ended without finish_reason; %d characters held back were not sent",
                        len(rest),
                    )
            finished = True
        except StreamBlocked as blocked:
            # The stream has started: an error event ends it. Handed to the proxy as a ready SSE
            # event (it sends such a string as it is, then [DONE]), so the client gets our code;
            # the ledger row reads the block from the output verdict noted here.
            st.note(call_id, "output", blocked.result)
            error = GuardBlocked(blocked.result, block_code(blocked.result))
            yield "data: " + json.dumps({"error": error.to_dict()}, ensure_ascii=False) + "\n\n"
        finally:
            if finished:
                st.note(call_id, "output", _combine([s.result() for s in streams.values()]))
            st.output_done(call_id)

    @staticmethod
    async def _response_events(
        st: GuardState, call_id: str | None, answer: responses_guard.ResponseStream, chunks: AsyncIterator[Any]
    ) -> AsyncGenerator[Any, None]:
        """A Responses stream through the output stages. A block sends an ``error`` event, its
        verdict noted for the ledger, then reads the rest of the engine's answer without sending
        it: LiteLLM logs a Responses stream only once it has ended, and the ledger row (400
        GuardBlocked) must carry the tokens it cost."""
        finished = False
        try:
            async for event in answer.events(chunks):
                yield event
            finished = True
        except StreamBlocked as blocked:
            st.note(call_id, "output", blocked.result)
            message = blocked.result.message or "blocked by the Safety Guard"
            yield responses_guard.error_event(block_code(blocked.result), message, answer.sequence)
            async for _ in chunks:
                pass
        finally:
            if finished:
                st.note(call_id, "output", _combine(answer.results()))
            st.output_done(call_id)


MODEL_STAGES = frozenset({"llama_guard", "prompt_guard"})


def _needs_thread(pipeline: GuardPipeline, stage: Stage) -> bool:
    return any(name in MODEL_STAGES for name in pipeline.stages(stage))


async def _run(pipeline: GuardPipeline, stage: Stage, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a worker thread when a guard model runs or the text is long, else in
    place (PII and zh-TW take microseconds on ordinary text; a thread hop would cost more)."""
    if _needs_thread(pipeline, stage) or _text_size(args) > LONG_TEXT:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def _text_size(args: tuple) -> int:
    """Characters of text in the request among ``args`` (without serialising it)."""
    data = next((a for a in args if isinstance(a, dict)), None)
    if data is None:
        return 0
    messages = data.get("messages")
    if isinstance(messages, list):
        return sum(len(text) for m in messages if isinstance(m, Mapping) for _, text in _texts(m.get("content")))
    if "documents" in data:  # a rerank: its query and documents
        return sum(len(text) for _, _, text in _rerank_texts(data))
    value = data.get("prompt", data.get("input"))
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return sum(len(item) for item in items if isinstance(item, str))


def _screen_field(pipeline: GuardPipeline, data: dict, key: str, only: list[str] | None = None) -> GuardResult:
    """Input stages (or ``only`` these) on each text of ``data[key]``, a string or a list (a
    completion's prompt, an embeddings input); masks are written back, token-id items pass."""
    value = data.get(key)
    if isinstance(value, list):
        value = data[key] = list(value)
    texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    results = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            continue
        result = pipeline.run(text, "input", [{"role": "user", "content": text}], only=only)
        results.append(result)
        if result.blocked:
            break
        if result.text != text:
            if isinstance(value, list):
                value[i] = result.text
            else:
                data[key] = result.text
    return _combine(results)


def _rerank_texts(data: Mapping[str, Any]) -> list[tuple[Any, Any, str]]:
    """(where, key, text) of every text of a rerank request: the query, then each document. A
    query or document is a string, a Cohere-style object (its ``text``; with ``rank_fields``, the
    other string fields too) or vLLM's multimodal ``{"content": [parts]}`` (its text parts);
    ``where`` is "query" or the document's index, ``key`` what ``_set_rerank_text`` needs."""
    found: list[tuple[Any, Any, str]] = []
    items: list[tuple[Any, Any]] = [("query", data.get("query"))]
    documents = data.get("documents")
    items += list(enumerate(documents)) if isinstance(documents, list) else [(0, documents)]
    for where, item in items:
        if isinstance(item, str):
            found.append((where, None, item))
        elif isinstance(item, Mapping):
            for key, value in item.items():
                if isinstance(value, str) and key not in ("type", "role"):
                    found.append((where, key, value))
                elif key == "content" and isinstance(value, list):
                    found += [(where, ("content", i), text) for i, text in _texts(value)]
    return found


def _set_rerank_text(data: dict, where: Any, key: Any, text: str) -> None:
    """Write a masked text back where ``_rerank_texts`` found it (copying what it changes)."""
    holder: Any = data
    slot: Any = "query" if where == "query" else "documents"
    if where != "query" and isinstance(data.get("documents"), list):
        holder = data["documents"] = list(data["documents"])
        slot = where
    if key is None:
        holder[slot] = text
        return
    item = dict(holder[slot])
    if isinstance(key, tuple):  # ("content", index of a text part)
        parts = item["content"] = list(item["content"])
        parts[key[1]] = {**parts[key[1]], "text": text}
    else:
        item[key] = text
    holder[slot] = item


def _screen_rerank(pipeline: GuardPipeline, data: dict, only: list[str] | None = None) -> GuardResult:
    """Input stages (or ``only`` these) on a rerank's query and each of its documents; masks are
    written back into the request, so the engine ranks (and returns) the masked texts."""
    results = []
    for where, key, text in _rerank_texts(data):
        result = pipeline.run(text, "input", [{"role": "user", "content": text}], only=only)
        results.append(result)
        if result.blocked:
            break
        if result.text != text:
            _set_rerank_text(data, where, key, result.text)
    return _combine(results)


def _warm_up() -> None:
    try:
        # The zh-TW normaliser's phrase tables take ~80 ms to build: not on the first answer's path.
        from twllm.zh_tw import normalize

        normalize("这个软件")
        pipeline = state().pipeline(None, None)
        for name in dict.fromkeys([*pipeline.stages("input"), *pipeline.stages("output")]):
            if name in ("llama_guard", "prompt_guard"):
                pipeline._model(name)
    except Exception as exc:  # noqa: BLE001 - the requests will meet the failure policy
        log.warning("twllm guard: could not load the guard models ahead of requests: %s", exc)


def _screen_messages(pipeline: GuardPipeline, data: dict) -> GuardResult:
    """Input stages on the last user turn; the PII stage alone on earlier user/system turns."""
    messages = data["messages"] = copy.deepcopy(data["messages"])
    last_user = max(
        (i for i, m in enumerate(messages) if isinstance(m, Mapping) and m.get("role") == "user"), default=None
    )
    results: list[GuardResult] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "system", "developer"):
            continue
        if i == last_user:
            continue
        if "pii" not in pipeline.stages("input"):
            continue
        for key, text in _texts(message.get("content")):
            result = pipeline.run(text, "input", only=["pii"])
            results.append(result)
            if result.blocked:
                return _combine(results)
            if result.text != text:
                _set_text(message, key, result.text)
    if last_user is not None:
        message = messages[last_user]
        for key, text in _texts(message.get("content")):
            result = pipeline.run(text, "input", messages[: last_user + 1])
            results.append(result)
            if result.blocked:
                return _combine(results)
            if result.text != text:
                _set_text(message, key, result.text)
    return _combine(results)


def _screen_choices(
    pipeline: GuardPipeline,
    choices: list[Any],
    messages: list[Mapping[str, Any]],
    structure: JsonFormat | None = None,
) -> GuardResult:
    """Output stages on each choice's text (never its tool calls); ``structure``: the request
    asked for JSON."""
    results = []
    for choice in choices:
        message = getattr(choice, "message", None)
        text = getattr(message, "content", None) if message is not None else getattr(choice, "text", None)
        if not isinstance(text, str) or not text:
            continue
        result = pipeline.run(text, "output", messages, structure=structure)
        results.append(result)
        if result.blocked:
            return _combine(results)
        if result.text != text:
            if message is not None:
                message.content = result.text
            else:
                choice.text = result.text
    return _combine(results)


def _combine(results: list[GuardResult]) -> GuardResult:
    """One verdict for several texts: the strictest, with every category, finding and note."""
    if not results:
        return GuardResult("allow", [], "")
    order = {"allow": 0, "mask": 1, "block": 2}
    worst = max(results, key=lambda r: order[r.verdict])
    categories: list[str] = []
    for r in results:
        categories += [c for c in r.categories if c not in categories]
    latency: dict[str, float] = {}
    for r in results:
        for k, v in r.latency_ms.items():
            latency[k] = latency.get(k, 0.0) + v
    return GuardResult(
        worst.verdict,
        categories,
        worst.text,
        [f for r in results for f in r.findings],
        [n for r in results for n in r.notes],
        latency,
        worst.message,
    )
