"""Streams as the engine sent them: every chunk, every choice's finish reason, the usage chunk.

LiteLLM re-chunks a provider's stream in ``CustomStreamWrapper``: it drops the role chunk of
every choice but the first, keeps one finish reason for the whole stream (with ``n > 1`` the
other choices' finish reasons are lost), moves it into a chunk of its own, and gives the usage
chunk a choice with an empty delta. An application written against vLLM would see a different
protocol through the gateway than from the engine.

For OpenAI-compatible engines (vLLM) the wrapper's input is the engine's own chunks, already
parsed. ``install()`` (once per gateway worker) makes the wrapper keep a copy of each input
chunk, by call id, before it processes it; ``faithful`` still drives the wrapper to the end —
so LiteLLM's usage, cost and logging (and so the spend ledger) work as before — but hands the
client the engine's chunks, one for one, in the engine's order, as soon as the wrapper has
read them. Input of another kind (an Ollama stream) is not copied, and the wrapper's own chunks
pass unchanged.

The first of twllm's hooks that LiteLLM chains (the spend logger's or the guard's iterator
hook) calls ``faithful``; a later one gets its output and passes it on.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

from pydantic import BaseModel

PENDING_MAX = 10_000
"""Streams whose copies a worker keeps at most (a stream nobody reads is dropped oldest first)."""

FINISHING = object()
"""First in a queue whose engine ends every choice with a finish reason (a stream that ends with
one open was cut)."""
FOREIGN = object()
"""Marks an input chunk that is not an engine's OpenAI chunk: the stream is passed as LiteLLM makes it."""

FAITHFUL_KEY = "_twllm_faithful_stream"

CUT_MESSAGE = "The model's engine stopped before the answer was complete; retry the request."
CUT_STATUS = 503
FINISHING_PROVIDERS = frozenset({"hosted_vllm"})
"""Providers whose stream ends every choice with a finish reason: one that ends without is cut.
(LiteLLM's mock responses and some providers leave the finish reason to LiteLLM.)"""

_pending: OrderedDict[str, deque[Any]] = OrderedDict()
_cut: OrderedDict[str, None] = OrderedDict()
_installed = False


def install() -> None:
    """Make LiteLLM's stream wrapper keep a copy of every engine chunk it reads (idempotent).

    This wraps ``CustomStreamWrapper.chunk_creator`` of the pinned LiteLLM (>=1.108.7,<1.109);
    tests/integration/test_gateway_fidelity.py proves the streams equal the engine's."""
    global _installed
    if _installed:
        return
    from litellm.litellm_core_utils.streaming_handler import CustomStreamWrapper

    original = CustomStreamWrapper.chunk_creator

    def chunk_creator(self: Any, chunk: Any, *args: Any, **kwargs: Any) -> Any:
        call_id = getattr(getattr(self, "logging_obj", None), "litellm_call_id", None)
        if call_id:
            queue = _pending.get(call_id)
            engine_chunk = isinstance(chunk, BaseModel) and hasattr(chunk, "choices")
            if queue is None:
                queue = _pending[call_id] = deque()
                while len(_pending) > PENDING_MAX:
                    _pending.popitem(last=False)
                if getattr(self, "custom_llm_provider", None) in FINISHING_PROVIDERS:
                    queue.append(FINISHING)
                if not engine_chunk:  # not an OpenAI-compatible engine's stream
                    queue.append(FOREIGN)
            if engine_chunk:
                queue.append(chunk.model_copy(deep=True))
            # (a later item of another kind is LiteLLM's own bookkeeping: not the engine's)
        return original(self, chunk, *args, **kwargs)

    CustomStreamWrapper.chunk_creator = chunk_creator  # type: ignore[method-assign]
    _installed = True


def was_cut(call_id: str | None) -> bool:
    """Whether the stream of ``call_id`` was cut. LiteLLM may log such a stream as a success
    (with the usage so far) before or besides the failure: its ledger row must say 503 either way."""
    return bool(call_id) and str(call_id) in _cut


class EngineStreamCut(Exception):
    """Raised into LiteLLM's stream when the engine's stream ended with an answer unfinished:
    the proxy then ends the client's stream with an error event and logs a failure (a 503 row)."""

    status_code = CUT_STATUS
    code = str(CUT_STATUS)

    def __init__(self) -> None:
        super().__init__(CUT_MESSAGE)
        self.message = CUT_MESSAGE


def wants_usage(request_data: Mapping[str, Any]) -> bool:
    options = request_data.get("stream_options")
    return isinstance(options, Mapping) and bool(options.get("include_usage"))


def _is_usage_only(chunk: Any) -> bool:
    return not getattr(chunk, "choices", None) and getattr(chunk, "usage", None) is not None


async def faithful(response: Any, request_data: Mapping[str, Any]) -> AsyncIterator[Any]:
    """The engine's chunks of the stream ``response`` (LiteLLM's), once; else ``response``'s."""
    call_id = str(request_data.get("litellm_call_id") or "")
    if not _installed or not call_id or request_data.get(FAITHFUL_KEY):
        async for chunk in response:
            yield chunk
        return
    if isinstance(request_data, dict):
        request_data[FAITHFUL_KEY] = True  # a hook chained after this one gets these chunks
    usage = wants_usage(request_data)
    foreign = False
    finishing = False
    open_choices: set[int] = set()

    def drain(queue: deque[Any] | None) -> Iterator[Any]:
        """The copies waiting in ``queue``; notes which choices are still open."""
        while queue:
            chunk = queue.popleft()
            for choice in getattr(chunk, "choices", None) or ():
                index = getattr(choice, "index", 0) or 0
                (open_choices.discard if getattr(choice, "finish_reason", None) else open_choices.add)(index)
            if _is_usage_only(chunk) and not usage:
                continue  # LiteLLM asks the engine for usage itself; the client did not
            yield chunk

    try:
        async for processed in response:
            queue = _pending.get(call_id)
            if queue and queue[0] is FINISHING:
                queue.popleft()
                finishing = True
            if foreign or queue is None or (queue and queue[0] is FOREIGN):
                foreign = True
                yield processed
                continue
            for chunk in drain(queue):
                yield chunk
        if foreign:
            return
        for chunk in drain(_pending.get(call_id)):  # what the wrapper read but held back
            yield chunk
        if open_choices and finishing:
            # The engine's stream ended with an answer unfinished (its process died, the
            # connection was cut): LiteLLM takes that for the end. Say so, as an error event.
            _cut[call_id] = None
            while len(_cut) > PENDING_MAX:
                _cut.popitem(last=False)
            raise EngineStreamCut()
    finally:
        _pending.pop(call_id, None)
