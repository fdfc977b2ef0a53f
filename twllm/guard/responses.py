"""The Safety Guard on the Responses API (``/v1/responses``): its request's texts and its answer's.

``gateway.TwllmGuardrail`` runs the same policy on a Responses request as on a chat request;
this module knows where the texts are:

- input: ``input`` is a string (one user turn) or a list of items. Message items
  (``{"role", "content"}``, ``type`` "message" or none) hold a string or a list of parts whose
  ``input_text``/``output_text``/``text`` parts are text. As in chat, the input stages run on the
  last user turn, and the PII stage alone on earlier user, system and developer turns and on
  ``instructions`` (a client resending history resends its PII). Tool results
  (``function_call_output``) and earlier answers are not screened, as chat's tool and assistant
  turns are not. The model's zh-TW system prompt becomes ``instructions`` when the request has
  neither ``instructions`` nor a system or developer turn.
- output: the ``output_text`` parts of the answer's message items (never tool calls or their
  arguments), rewritten in place; with a JSON ``text.format`` the zh_tw stage keeps keys and
  fixed values (``twllm.zh_tw.structured``).
- streams (``guard_stream``): each ``response.output_text.delta`` passes through an
  ``OutputStream`` per (output item, content part), so masking and normalising work chunk by
  chunk as in chat; a delta whose text a stage still holds is dropped, and what a stage held at
  the part's end goes out as one more delta just before ``response.output_text.done``. The
  events that repeat the whole text (``output_text.done``, ``content_part.done``,
  ``output_item.done`` and the final ``response.completed``) carry what was released, so they
  agree with the deltas; ``sequence_number`` is counted again over what is sent. A block ends the
  stream with an ``error`` event (the Responses API's own), whose ``code`` is the guard's; the
  rest of the engine's answer is read but never sent, so LiteLLM logs the call with its usage and
  the ledger row is 400 GuardBlocked with the tokens it cost.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from litellm.types.llms.openai import ErrorEvent, ResponsesAPIStreamEvents

from twllm.guard.pipeline import GuardPipeline, GuardResult
from twllm.guard.streaming import OutputStream, StreamBlocked
from twllm.zh_tw.structured import JsonFormat

TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
"""Content parts that hold text a person wrote or a model said."""
FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})

Combine = Callable[[list[GuardResult]], GuardResult]


def is_request(data: Mapping[str, Any]) -> bool:
    """Whether a request body is a Responses API request (``input``, no ``messages``)."""
    return isinstance(data.get("input"), (str, list)) and "messages" not in data and "prompt" not in data


def is_response(obj: Any) -> bool:
    """Whether an answer is a Responses API response object."""
    return _get(obj, "object") == "response" and isinstance(_get(obj, "output"), list)


# --- request ------------------------------------------------------------------------------------


def _is_message(item: Any) -> bool:
    return isinstance(item, dict) and item.get("type", "message") == "message" and "role" in item


def _texts(content: Any) -> list[tuple[Any, str]]:
    """(setter key, text) pairs of an item's content: a string, or a list of parts."""
    if isinstance(content, str):
        return [(None, content)]
    if isinstance(content, list):
        return [
            (i, part.get("text") or "")
            for i, part in enumerate(content)
            if isinstance(part, Mapping) and part.get("type") in TEXT_PARTS and isinstance(part.get("text"), str)
        ]
    return []


def _set_text(item: dict[str, Any], key: Any, text: str) -> None:
    if key is None:
        item["content"] = text
    else:
        item["content"][key] = {**item["content"][key], "text": text}


def conversation(data: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The request as chat messages (role, text): what Llama Guard reads as the conversation."""
    messages: list[Mapping[str, Any]] = []
    if isinstance(data.get("instructions"), str) and data["instructions"]:
        messages.append({"role": "system", "content": data["instructions"]})
    value = data.get("input")
    if isinstance(value, str):
        messages.append({"role": "user", "content": value})
    for item in value if isinstance(value, list) else ():
        if _is_message(item):
            messages.append({"role": item["role"], "content": "".join(t for _, t in _texts(item.get("content")))})
    return messages


def add_system_prompt(data: dict[str, Any], prompt: str | None) -> None:
    """The model's system prompt as ``instructions`` when the request gives none of its own."""
    if not prompt or data.get("instructions"):
        return
    value = data.get("input")
    items = value if isinstance(value, list) else []
    if any(_is_message(item) and item.get("role") in ("system", "developer") for item in items):
        return
    data["instructions"] = prompt


def screen_request(pipeline: GuardPipeline, data: dict[str, Any], combine: Combine) -> GuardResult:
    """Input stages on the last user turn of ``input``; the PII stage alone on ``instructions``
    and earlier user, system and developer turns. Masks are written back into ``data``.
    ``combine`` makes one verdict of several (the guardrail's own)."""
    results: list[GuardResult] = []
    pii = "pii" in pipeline.stages("input")
    instructions = data.get("instructions")
    if pii and isinstance(instructions, str) and instructions:
        result = pipeline.run(instructions, "input", only=["pii"])
        results.append(result)
        if result.blocked:
            return combine(results)
        data["instructions"] = result.text
    value = data.get("input")
    if isinstance(value, str):
        result = pipeline.run(value, "input", conversation(data))
        results.append(result)
        if not result.blocked:
            data["input"] = result.text
        return combine(results)
    if not isinstance(value, list):
        return combine(results)
    items = data["input"] = copy.deepcopy(value)
    last_user = max((i for i, item in enumerate(items) if _is_message(item) and item["role"] == "user"), default=None)
    for i, item in enumerate(items):
        if i == last_user or not pii or not _is_message(item) or item["role"] not in ("user", "system", "developer"):
            continue
        for key, text in _texts(item.get("content")):
            result = pipeline.run(text, "input", only=["pii"])
            results.append(result)
            if result.blocked:
                return combine(results)
            if result.text != text:
                _set_text(item, key, result.text)
    if last_user is not None:
        item = items[last_user]
        context = conversation({**data, "input": items[: last_user + 1]})
        for key, text in _texts(item.get("content")):
            result = pipeline.run(text, "input", context)
            results.append(result)
            if result.blocked:
                return combine(results)
            if result.text != text:
                _set_text(item, key, result.text)
    return combine(results)


# --- answer -------------------------------------------------------------------------------------


def _get(obj: Any, key: str, default: Any = None) -> Any:
    return obj.get(key, default) if isinstance(obj, Mapping) else getattr(obj, key, default)


def _put(obj: Any, key: str, value: Any) -> None:
    if isinstance(obj, dict):
        obj[key] = value
    else:
        setattr(obj, key, value)


def _output_parts(output: Any) -> list[tuple[int, int, Any]]:
    """(output index, content index, part) of every text part of an answer's message items."""
    found = []
    for i, item in enumerate(output if isinstance(output, list) else ()):
        if _get(item, "type") != "message":
            continue
        for j, part in enumerate(_get(item, "content") or ()):
            if _get(part, "type") == "output_text" and isinstance(_get(part, "text"), str):
                found.append((i, j, part))
    return found


def screen_response(
    pipeline: GuardPipeline,
    response: Any,
    messages: list[Mapping[str, Any]],
    combine: Combine,
    structure: JsonFormat | None = None,
) -> GuardResult:
    """Output stages on each text part of a (whole) response; rewrites are written in place.
    ``structure``: the request's ``text.format`` asked for JSON."""
    results = []
    for _, _, part in _output_parts(_get(response, "output")):
        text = _get(part, "text")
        if not text:
            continue
        result = pipeline.run(text, "output", messages, structure=structure)
        results.append(result)
        if result.blocked:
            return combine(results)
        if result.text != text:
            _put(part, "text", result.text)
    return combine(results)


Call = Callable[..., Awaitable[Any]]


def error_event(code: str, message: str, sequence_number: int) -> ErrorEvent:
    """The Responses API's ``error`` stream event (an event object: the proxy sends it and goes on
    reading the stream, so the engine's answer can still be drained)."""
    return ErrorEvent(type=ResponsesAPIStreamEvents.ERROR, sequence_number=sequence_number, code=code, message=message)


class ResponseStream:
    """One streamed response through the output stages (see the module docstring)."""

    def __init__(
        self,
        pipeline: GuardPipeline,
        messages: list[Mapping[str, Any]],
        window: int,
        call: Call,
        structure: JsonFormat | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.structure = structure
        self.messages = messages
        self.window = window
        self.call = call
        """Runs a stage's ``feed``/``flush`` (in place, or in a worker thread for a classifier)."""
        self.parts: dict[tuple[int, int], OutputStream] = {}
        self.released: dict[tuple[int, int], str] = {}
        """Each finished part's text as sent."""
        self.sequence = 0
        """The next event's ``sequence_number``."""

    def results(self) -> list[GuardResult]:
        return [stream.result() for stream in self.parts.values()]

    def _stream(self, key: tuple[int, int]) -> OutputStream:
        stream = self.parts.get(key)
        if stream is None:
            stream = self.parts[key] = OutputStream(self.pipeline, self.messages, self.window, self.structure)
        return stream

    def _numbered(self, event: Any) -> Any:
        if _get(event, "sequence_number") is not None:
            _put(event, "sequence_number", self.sequence)
        self.sequence += 1
        return event

    async def events(self, chunks: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """The events to send for the events ``chunks``; raises StreamBlocked on a block."""
        last_delta: dict[tuple[int, int], Any] = {}
        async for event in chunks:
            kind = _get(event, "type")
            key = (_get(event, "output_index", 0) or 0, _get(event, "content_index", 0) or 0)
            if kind == "response.output_text.delta":
                text = _get(event, "delta") or ""
                last_delta[key] = event
                piece = await self.call(self._stream(key).feed, text) if text else ""
                if text and not piece:
                    continue  # all of it held for now
                _put(event, "delta", piece)
            elif kind == "response.output_text.done":
                stream = self._stream(key)
                rest = await self.call(stream.flush)
                if rest and key in last_delta:
                    extra = last_delta[key]
                    extra = (
                        {**extra, "delta": rest}
                        if isinstance(extra, dict)
                        else extra.model_copy(update={"delta": rest})
                    )
                    yield self._numbered(extra)
                self.released[key] = stream.released
                _put(event, "text", stream.released)
            elif kind == "response.content_part.done" and key in self.released:
                _put(_get(event, "part"), "text", self.released[key])
            elif kind == "response.output_item.done":
                self._restore(_get(event, "output_index", 0) or 0, _get(event, "item"))
            elif kind in FINAL_EVENTS:
                for i, item in enumerate(_get(_get(event, "response"), "output") or ()):
                    self._restore(i, item)
            yield self._numbered(event)

    def _restore(self, index: int, item: Any) -> None:
        """The released texts into an item that repeats the whole answer."""
        for _, j, part in _output_parts([item]):
            if (index, j) in self.released:
                _put(part, "text", self.released[(index, j)])


__all__ = [
    "ResponseStream",
    "StreamBlocked",
    "add_system_prompt",
    "conversation",
    "error_event",
    "is_request",
    "is_response",
    "screen_request",
    "screen_response",
]
