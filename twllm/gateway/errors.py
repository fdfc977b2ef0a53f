"""Errors as OpenAI's API gives them: what the gateway says when something goes wrong.

LiteLLM reports an engine's refusal as ``litellm.BadRequestError: Hosted_vllmException - {...}``
with the engine's own JSON inside, a connection failure with the engine's URL and a Python
object's repr, and its own refusals with a numeric ``code``. A client written for OpenAI (or
for the engine itself) expects ``{"error": {"message", "type", "param", "code"}}``, the
engine's status code, and nothing of the machinery behind the gateway. ``public_error`` turns
any error body the proxy produced into that shape:

- the engine's refusal: its status and its own message (4xx are never retried: see the router's
  ``retry_policy`` in twllm.render.litellm_config);
- a prompt longer than the context: 400 ``context_length_exceeded``;
- no engine can be reached (refused, reset, every replica cooled down): 503
  ``engine_unavailable`` with ``Retry-After``;
- an unknown model: 404 ``model_not_found``;
- twllm's own refusals (auth, limits, guard): passed as they are.

Whatever is left of a message after the engine's text is pulled out is scrubbed of class
names, provider prefixes, URLs, ports and tracebacks; a message that still shows any of them is
replaced by a plain sentence for its status.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from typing import Any

RETRY_AFTER_S = 5
"""What ``Retry-After`` says when no engine of a model can be reached."""

TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}
"""``error.type`` by status, as OpenAI's API uses them (anything 5xx: server_error)."""

PLAIN = {
    400: "The request is not valid.",
    401: "Incorrect API key provided.",
    403: "This key is not allowed to do that.",
    404: "Not found.",
    405: "Method not allowed.",
    408: "The request timed out.",
    413: "The request body is too large.",
    422: "The request is not valid.",
    429: "Too many requests; retry later.",
    500: "The server had an error while processing your request.",
    502: "The model's engine sent an answer that could not be read.",
    503: "The model is not available right now; retry later.",
    504: "The model's engine did not answer in time.",
}

# What must never reach a client: a Python class name of the proxy, LiteLLM's name, a provider
# prefix, a traceback, an internal URL or port.
INTERNALS = re.compile(
    r"(?i:litellm|hosted_vllm|ollama_chat|traceback|file \"|https?://|127\.0\.0\.1|localhost"
    r"|\b(?:api_base|deployment|model_group|model group)\b|<[a-z_.]+ object at 0x)"
    r"|\b[A-Z]\w*(?:Error|Exception)\b"
)
FORBIDDEN = re.compile(INTERNALS.pattern + r"|(?i:\bsk-[a-z0-9_-]{16,})")
"""INTERNALS, or anything shaped like a whole key (twllm's own messages name a key by its
12-character prefix, which the client sent)."""

_CONTEXT = re.compile(
    r"maximum context length|context length|context window|too many tokens|is too long|"
    r"exceeds the (?:model'?s? )?max|max_model_len|longer than the maximum",
    re.IGNORECASE,
)
UNAVAILABLE = re.compile(
    r"Cannot connect|Connect call failed|stopped before the answer was complete|Response payload is not completed|"
    r"TransferEncodingError|ClientPayloadError|Connection refused|ConnectError|All connection attempts failed|"
    r"Server disconnected|RemoteProtocolError|ConnectionReset|Connection reset|No deployments available|"
    r"No healthy deployment|ServiceUnavailable|peer closed connection|incomplete chunked read|ReadError",
    re.IGNORECASE,
)
TIMEOUT = re.compile(r"\bTimeout\b|timed out|ReadTimeout", re.IGNORECASE)
_UNKNOWN_MODEL = re.compile(
    r"Invalid model name passed in model=([^\s.,'\"]+)|model[= ]'?([^\s'\"]+)'? (?:does not|not) "
    r"(?:exist|found)",
    re.IGNORECASE,
)
REJECTED_FIELD = "Rejected Request: "
"""How LiteLLM's auth starts its refusal of a request field only its admin may set."""
_REJECTED = re.compile(REJECTED_FIELD + r"([^\n]*?)(?:\.\s|\.?$)", re.MULTILINE)
_PREFIX = re.compile(r"^(?:litellm\.)?[A-Za-z_]*(?:Error|Exception)\s*[:\-]\s*", re.IGNORECASE)
_PROVIDER = re.compile(r"^\s*[A-Za-z_]*Exception\s*-\s*")
_STATUS_PREFIX = re.compile(r"^Error code:\s*\d{3}\s*-\s*")
_LITELLM_TAIL = re.compile(
    r"\.?\s*(?:Received Model Group|Available Model Group Fallbacks|LiteLLM Retried|"
    r"model_group|No fallback model group found).*$",
    re.IGNORECASE | re.DOTALL,
)


@dataclass
class PublicError:
    """An error as the client sees it."""

    status: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def encoded(self) -> bytes:
        return json.dumps(self.body(), ensure_ascii=False).encode("utf-8")


def type_for(status: int) -> str:
    return TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def make(
    status: int,
    message: str | None = None,
    code: str | None = None,
    param: str | None = None,
    type_: str | None = None,
    headers: dict[str, str] | None = None,
) -> PublicError:
    """An error for ``status`` (its plain sentence when no message is given)."""
    return PublicError(
        status,
        message or PLAIN.get(status, PLAIN[500 if status >= 500 else 400]),
        type_ or type_for(status),
        param,
        code,
        dict(headers or {}),
    )


def unavailable() -> PublicError:
    return make(
        503,
        "No engine of this model is available right now; retry later.",
        "engine_unavailable",
        type_="server_error",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def public_error(status: int, body: bytes | str | dict[str, Any] | None) -> PublicError:
    """The public form of an error response the proxy produced (status and body)."""
    error = _error_object(body)
    raw = str(error.get("message") or error.get("detail") or "")
    code = error.get("code")
    code_text = str(code) if code is not None else None
    rejected = _REJECTED.search(raw)
    if rejected is not None and status in (400, 401, 403):  # LiteLLM's auth refusing a body field
        return _rejected_field(rejected.group(1))
    invalid = invalid_request(raw) if status >= 500 else None
    if invalid is not None:  # LiteLLM failed on the client's request before any engine saw it
        return invalid
    ours = code_text is not None and not code_text.isdigit() and not FORBIDDEN.search(raw)
    if ours:  # twllm's own refusals (auth, limits, guard) and already-clean errors
        return PublicError(
            status,
            raw or PLAIN.get(status, PLAIN[400]),
            _clean_type(error.get("type"), status),
            _param(error.get("param")),
            code_text,
        )
    inner_status, inner = _engine_error(raw)
    if UNAVAILABLE.search(raw) and (status >= 500 or status == 429 or inner_status is None):
        return unavailable()
    if TIMEOUT.search(raw) and status >= 500:
        return make(504, code="engine_timeout")
    if inner_status is not None and 400 <= inner_status < 600:
        status = inner_status
    message = scrub(inner.get("message") if inner else raw)
    if _CONTEXT.search(raw) and status < 500:
        return make(
            400,
            message or "The prompt is longer than the model's context window.",
            "context_length_exceeded",
            _param(inner.get("param")) if inner else "messages",
        )
    unknown = _UNKNOWN_MODEL.search(raw)
    if unknown and status in (400, 404):
        name = unknown.group(1) or unknown.group(2)
        return make(404, f"The model `{name}` does not exist or you do not have access to it.", "model_not_found")
    param = _param(inner.get("param")) if inner else _param(error.get("param"))
    inner_code = inner.get("code") if inner else None
    code_out = str(inner_code) if inner_code is not None and not str(inner_code).isdigit() else None
    return make(status, message, code_out, param)


_REQUEST_VALIDATION = re.compile(r"\d+ validation errors? for \w*Request\s*\n(\S[^\n]*)\n\s+([^\[\n]+)")
_TWICE = re.compile(r"got (?:multiple values for|an unexpected) keyword argument '(\w+)'")


def invalid_request(raw: str) -> PublicError | None:
    """A 500 LiteLLM gives for the client's own error, as the 400 it is: its request model's
    validation (a rerank ``query`` that is not a string), or a field it passes twice or to a call
    without it (``messages`` or ``response_format`` sent to /v1/completions)."""
    found = _REQUEST_VALIDATION.search(raw)
    if found is not None:
        field, problem = found.group(1).strip(), found.group(2).strip()
        param = _param(field.split(".")[0])
        return make(400, scrub(f"{field}: {problem}") or None, "invalid_type", param)
    if "Unmapped prompt format" in raw:  # LiteLLM's text completion: a `prompt` of another shape
        return make(400, "`prompt` must be a string or an array of strings or token ids.", "invalid_type", "prompt")
    twice = _TWICE.search(raw)
    if twice is not None:
        name = twice.group(1)
        return make(400, f"`{name}` is not a parameter of this endpoint.", "unsupported_parameter", name)
    return None


def _rejected_field(text: str) -> PublicError:
    """LiteLLM's refusal of a request field that only its admin may set (``api_base``, ``model_list``,
    a secret reference, a URL as a fallback): the client's error, 400, never the 401 LiteLLM gives."""
    named = re.match(r"(\w+)(?:=\S*)? (?:is not allowed|holds a secret)", text)
    name = named.group(1) if named else None
    message = (
        f"`{name}` is not allowed in the request body."
        if name
        else (scrub(text) or "The request sets a field this gateway does not accept").rstrip(".") + "."
    )
    message = message[:1].upper() + message[1:]
    return make(400, message, "unsupported_parameter", name)


def _error_object(body: bytes | str | dict[str, Any] | None) -> dict[str, Any]:
    if isinstance(body, (bytes, bytearray)):
        text = body.decode("utf-8", errors="replace")
        try:
            body = json.loads(text)
        except ValueError:
            return {"message": text}
    elif isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return {"message": body}
    if not isinstance(body, dict):
        return {}
    error = body.get("error", body)
    if isinstance(error, str):
        return {"message": error}
    if not isinstance(error, dict):
        return {}
    detail = error.get("detail")
    if isinstance(detail, dict):  # FastAPI's HTTPException(detail={...})
        inner = detail.get("error", detail)
        return inner if isinstance(inner, dict) else {"message": str(inner)}
    if isinstance(detail, list):  # FastAPI's validation errors
        return {"message": "; ".join(_validation_text(d) for d in detail), "param": _validation_param(detail)}
    return error


def _validation_text(item: Any) -> str:
    if not isinstance(item, dict):
        return str(item)
    where = ".".join(str(p) for p in item.get("loc", [])[1:])
    return f"{where}: {item.get('msg', '')}" if where else str(item.get("msg", ""))


def _validation_param(detail: list[Any]) -> str | None:
    for item in detail:
        if isinstance(item, dict) and len(item.get("loc", [])) > 1:
            return str(item["loc"][1])
    return None


def _engine_error(message: str) -> tuple[int | None, dict[str, Any]]:
    """The engine's own status and error object inside a LiteLLM message, when it carries one."""
    match = re.search(r"Error code:\s*(\d{3})", message)
    status = int(match.group(1)) if match else None
    start = message.find("{")
    while start != -1:
        inner = _error_in(message[start:])
        if inner is None:  # LiteLLM sometimes appends text after the JSON: the balanced object
            end = _balanced_end(message, start)
            inner = _error_in(message[start:end]) if end is not None else None
        if inner is not None:
            code = inner.get("code")
            if status is None and isinstance(code, int) and 400 <= code < 600:
                status = code
            return status, inner
        start = message.find("{", start + 1)
    return status, {}


def _error_in(text: str) -> dict[str, Any] | None:
    """The error object of ``text`` read as JSON or as a Python literal (LiteLLM prints both)."""
    for parse in (json.loads, ast.literal_eval):
        try:
            data = parse(text)
        except (ValueError, SyntaxError, RecursionError, MemoryError):
            continue
        if not isinstance(data, dict):
            continue
        inner = data.get("error", data)
        if isinstance(inner, str):
            return {"message": inner}
        if isinstance(inner, dict) and ("message" in inner or "detail" in inner):
            return inner if "message" in inner else {"message": str(inner["detail"])}
    return None


def _balanced_end(text: str, start: int) -> int | None:
    depth = 0
    quote: str | None = None
    escaped = False
    for i in range(start, len(text)):
        ch = text[i]
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def scrub(message: Any) -> str:
    """The message without LiteLLM's prefixes and suffixes; '' when it still shows internals."""
    text = str(message or "").strip()
    for _ in range(3):
        before = text
        text = _PREFIX.sub("", text)
        text = _PROVIDER.sub("", text)
        text = _STATUS_PREFIX.sub("", text)
        if text == before:
            break
    text = _LITELLM_TAIL.sub("", text).strip()
    # LiteLLM's secret redaction reads the escaped "error:\\n" of a validation message as a
    # Windows drive path ("r:\\n...") and replaces it: put the word back.
    text = text.replace("erroREDACTED", "error:")
    if "{" in text and _engine_error(text)[1]:
        text = str(_engine_error(text)[1].get("message", "")).strip()
    if not text or FORBIDDEN.search(text):
        return ""
    return text


def _clean_type(value: Any, status: int) -> str:
    text = str(value or "")
    if not text or text == "None" or FORBIDDEN.search(text) or text[0].isupper():
        return type_for(status)
    return text


def _param(value: Any) -> str | None:
    if value is None or value in ("None", "null", ""):
        return None
    text = str(value)
    return None if FORBIDDEN.search(text) else text
