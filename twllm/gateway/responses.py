"""The Responses API (``POST /v1/responses``) through the gateway: what is served, what is refused.

LiteLLM serves ``/v1/responses`` for a ``hosted_vllm/…`` deployment natively: the request goes
to vLLM's own ``/v1/responses`` (``litellm/llms/hosted_vllm/responses``), not through LiteLLM's
responses → chat-completions bridge. The answer, its stream events and its usage are vLLM's;
LiteLLM counts the usage (so the spend ledger and the limits see it) and replaces the response
id by an encrypted one (``ResponsesIDSecurity``, AES-GCM with the master key).

What cannot work is refused up front, as a 400 or 501 in OpenAI's error shape, never passed on
to fail obscurely:

- **Nothing is stored.** vLLM keeps a response only with ``VLLM_ENABLE_RESPONSES_API_STORE=1``,
  in its process's memory, never freed, per replica; twllm's engines run without it (``store``
  is accepted and has no effect, as on vLLM). So ``previous_response_id``, ``conversation`` and
  ``background`` are 400 ``unsupported_parameter``, and the routes that read a stored response
  (``GET``/``DELETE /v1/responses/{id}``, ``/input_items``, ``/cancel``, also ``/compact`` and
  ``/input_tokens``) are 501 ``not_implemented``. A conversation goes on the stateless way: the
  client sends the earlier turns (and the previous answer's ``output`` items, tool calls and
  their results) in ``input``.
- **Function tools only.** OpenAI's hosted tools (web search, file search, code interpreter,
  MCP, computer use, image generation) would need a tool server no twllm engine has; vLLM would
  ignore them and answer without. A request naming one is 400 ``unsupported_parameter``.

Two differences between LiteLLM's OpenAI client and vLLM are undone, so a client written against
vLLM's own server gets the same answer through the gateway (``install()`` and
``forward_engine_params``, once per worker and per request):

- LiteLLM raises ``max_output_tokens`` below 16 to 16 (OpenAI's minimum); vLLM has none.
- LiteLLM drops every request field that OpenAI's API does not define; vLLM's own sampling
  fields (``ENGINE_PARAMS``: ``structured_outputs``, ``top_k``, ``seed``, ``stop``, …) are moved
  into ``extra_body``, which LiteLLM sends on as they are (chat completions pass them the same way).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, MutableMapping
from typing import Any

from twllm.gateway import errors

CALLS = frozenset({"responses", "aresponses"})
"""LiteLLM's call types of ``POST /v1/responses``."""

ROUTE = re.compile(r"/(?:v1/)?responses")
UNSERVED = re.compile(r"/(?:v1/)?responses/.+")
"""The Responses API's other routes: each reads or changes a stored response."""

NOT_STORED = (
    "This gateway does not store responses: its engines keep none. Send the conversation so far "
    "in `input` instead (earlier turns, the previous response's `output` items, tool calls and "
    "their results)."
)
UNSERVED_MESSAGE = "Only POST /v1/responses is served. " + NOT_STORED

STATEFUL = {
    "previous_response_id": "`previous_response_id` is not supported. " + NOT_STORED,
    "conversation": "`conversation` is not supported. " + NOT_STORED,
    "background": "`background` mode is not supported: it needs a stored response to poll. " + NOT_STORED,
}
"""Request fields that need a stored response, and what the 400 says."""

FUNCTION_TOOLS = frozenset({"function"})

ENGINE_PARAMS = frozenset(
    {
        "top_k",
        "min_p",
        "seed",
        "stop",
        "stop_token_ids",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "ignore_eos",
        "skip_special_tokens",
        "include_stop_str_in_output",
        "include_reasoning",
        "structured_outputs",
        "chat_template_kwargs",
        "cache_salt",
    }
)
"""vLLM's own fields of a Responses request (its ``ResponsesRequest``) that shape sampling and
output, which OpenAI's API does not define. Request ids, KV-transfer and priority fields are
the deployment's business and are not forwarded."""


def unserved(path: str) -> bool:
    """Whether ``path`` is one of the Responses API's routes the gateway answers with 501."""
    return UNSERVED.fullmatch(path.rstrip("/")) is not None


def unsupported(route: str, body: Mapping[str, Any]) -> tuple[str, str] | None:
    """(param, message) of the first field of a ``/v1/responses`` request the gateway cannot
    serve (see the module docstring); None for any other request, or one it serves."""
    if not ROUTE.fullmatch(route.rstrip("/")):
        return None
    for field, message in STATEFUL.items():
        value = body.get(field)
        if value is not None and value is not False and value != "":
            return field, message
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        kind = tool.get("type") if isinstance(tool, Mapping) else None
        if kind not in FUNCTION_TOOLS:
            return "tools", (
                f"Tools of type {kind!r} are not supported: this gateway's models have function tools "
                "only (type 'function'), and no hosted tool (web search, file search, code interpreter, "
                "MCP, computer use, image generation)."
            )
    return None


def public_failure(event: Any) -> bytes | None:
    """A ``response.failed`` stream event (LiteLLM ends a Responses stream with one when the
    engine fails mid-way) with its error in public words, as ``errors.public_error`` gives them
    (an engine gone: ``engine_unavailable``); None for any other event."""
    if not isinstance(event, dict) or event.get("type") != "response.failed":
        return None
    response = event.get("response")
    if not isinstance(response, dict) or not isinstance(response.get("error"), dict):
        return None
    public = errors.public_error(500, {"error": response["error"]})
    response["error"] = {"code": public.code or public.type, "message": public.message}
    return json.dumps(event, ensure_ascii=False).encode("utf-8")


def forward_engine_params(data: MutableMapping[str, Any]) -> None:
    """Move vLLM's own fields of a Responses request into ``extra_body`` (where LiteLLM, which
    drops fields OpenAI does not define, sends them on unchanged); the client's own
    ``extra_body`` wins."""
    found = {name: data.pop(name) for name in ENGINE_PARAMS & data.keys()}
    if not found:
        return
    extra = data.get("extra_body")
    data["extra_body"] = {**found, **(extra if isinstance(extra, Mapping) else {})}


_installed = False


def install() -> None:
    """Send ``max_output_tokens`` to vLLM as the client gave it (idempotent).

    LiteLLM's OpenAI Responses config raises a value below 16 to 16, OpenAI's minimum; its vLLM
    config inherits that, but vLLM has no minimum. This replaces the check on the vLLM config of
    the pinned LiteLLM (>=1.108.7,<1.109); tests/integration/test_responses_api.py proves it."""
    global _installed
    if _installed:
        return
    from litellm.llms.hosted_vllm.responses.transformation import HostedVLLMResponsesAPIConfig

    HostedVLLMResponsesAPIConfig._enforce_min_max_output_tokens = staticmethod(_as_given)  # type: ignore[method-assign]
    _installed = True


def _as_given(max_output_tokens: int | None) -> int | None:
    return max_output_tokens
