"""The gateway's ASGI app: LiteLLM's proxy behind a thin shield that makes it look like OpenAI.

LiteLLM's FastAPI app serves ~700 routes (an admin UI, Prisma-backed key, team and spend
management, provider pass-throughs) and answers errors in its own words. Clients of twllm get
the OpenAI API and nothing else. ``Shield`` wraps the app as plain ASGI (no per-request
objects, so streams pass at the engine's pace) and:

- serves only the routes in ``ROUTES``; LiteLLM's management routes answer 404 with a pointer
  to ``twllm keys`` / ``twllm usage``, anything else a plain 404 — all in OpenAI's error shape;
- refuses a body over ``max_request_bytes`` with 413 before the body is read or parsed;
- rewrites every error — a response with status >= 400, or an error event inside a stream —
  into OpenAI's shape with the engine's status (``errors.public_error``);
- answers ``GET /metrics`` itself (``scrape.MetricsRoute``, behind the master key) when the
  spec serves metrics on the gateway's port; LiteLLM's own unauthenticated /metrics is never reached;
- hands every path under ``/console`` to the web console (``MOUNTS``; its own routes, auth
  and headers), before the allowlist and LiteLLM, with the same body limit;
- drops response headers that show the machinery (``x-litellm-*``, ``llm_provider-*``) and
  LiteLLM's blanket CORS headers; CORS is answered for the configured origins only (default none).

Settings come from the rendered gateway.json (``http`` section), found through
``TWLLM_GATEWAY_SETTINGS``; the proxy itself reads the LiteLLM config from ``CONFIG_FILE_PATH``,
both set by ``twllm.gateway.serve``.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import orjson

from twllm.gateway import (
    errors,
    failfast,
    forward,
    journal,
    lean,
    readiness,
    rerank,
    responses,
    score,
    scrape,
    spread,
    startup,
    streams,
)
from twllm.gateway.replay import replaying
from twllm.gateway.settings import GatewaySettings, HttpSettings
from twllm.settings import GATEWAY_SETTINGS_ENV

log = logging.getLogger("twllm.gateway")

Scope = MutableMapping[str, Any]  # as starlette.types has them, so its apps and middleware fit
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ROUTES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (method, re.compile(pattern))
    for method, pattern in (
        ("POST", r"/(?:v1/)?chat/completions"),
        ("POST", r"/(?:v1/)?completions"),
        ("POST", r"/(?:v1/)?embeddings"),
        ("POST", r"/(?:v1/|v2/)?rerank"),  # rerankers (task: rerank): Cohere v1/v2 and Jina shape
        ("POST", r"/(?:v1/)?score"),  # vLLM's score API, served as a rerank (twllm.gateway.score)
        ("POST", r"/(?:v1/)?responses"),
        ("GET", r"/(?:v1/)?models"),
        ("GET", r"/(?:v1/)?models/[^/]+(?:/[^/]+)*"),
        ("GET", r"/health/liveliness"),
        ("GET", r"/health/liveness"),
        ("GET", r"/health/readiness"),
    )
)
"""The OpenAI API the gateway serves (and the probes the supervisor uses); nothing else."""

MANAGEMENT = re.compile(
    r"/(?:ui|key|keys|user|users|team|teams|spend|global|customer|end_user|organization|budget|model|"
    r"sso|login|logout|onboarding|credentials|audit|tag|guardrails|callbacks|config|settings|"
    r"internal_user|invitation|fallback|health)(?:/.*)?"
)
MANAGEMENT_MESSAGE = (
    "Not found. This gateway is managed with the twllm command line, not over HTTP: "
    "tenants and API keys with `twllm tenants` and `twllm keys`, spend and usage with `twllm usage`, "
    "the deployment's health with `twllm status`."
)
HOP_HEADERS = (b"x-litellm-", b"llm_provider-", b"access-control-")
CALL_ID_HEADER = b"x-litellm-call-id"
ANSWERS = tuple(pattern for method, pattern in ROUTES if method == "POST")
"""The routes whose answers are ledger rows: their end waits for the row (``journal``)."""
STREAM_END = b"data: [DONE]"
MOUNTS: Mapping[str, str] = {"/console": "twllm.console.app:build_app"}
"""Path prefix -> the factory of the ASGI app served there instead of LiteLLM. Loaded by name,
as LiteLLM loads our hooks: the console imports the accounting hooks, which import this
package, so importing it here would make the packages import each other."""


def load_mounts(mounts: Mapping[str, str] = MOUNTS) -> dict[str, ASGIApp]:
    """Each prefix's app, built by calling its factory (``module:function``)."""
    apps: dict[str, ASGIApp] = {}
    for prefix, target in mounts.items():
        module, _, name = target.partition(":")
        apps[prefix] = getattr(importlib.import_module(module), name)()
    return apps


def mounted(mounts: Mapping[str, ASGIApp], path: str) -> ASGIApp | None:
    """The app mounted at ``path``'s prefix (the prefix itself or anything below it)."""
    for prefix, app in mounts.items():
        if path == prefix or path.startswith(prefix + "/"):
            return app
    return None


def http_settings_from_env() -> HttpSettings:
    """gateway.json's ``http`` section, from the file the environment names (defaults without one)."""
    path = os.environ.get(GATEWAY_SETTINGS_ENV)
    return GatewaySettings.load(path).http if path else HttpSettings()


def allowed(method: str, path: str) -> bool | None:
    """True: served; False: the path is served with another method; None: not a route of ours."""
    path = path.rstrip("/") or "/"
    hits = [m for m, pattern in ROUTES if pattern.fullmatch(path)]
    if not hits:
        return None
    return method in hits or (method == "HEAD" and "GET" in hits)


async def send_error(send: Send, error: errors.PublicError) -> None:
    body = error.encoded()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Shield:
    """See the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        settings: HttpSettings,
        metrics: ASGIApp | None = None,
        mounts: Mapping[str, ASGIApp] | None = None,
        forwarder: forward.Forwarder | None = None,
    ) -> None:
        self.app = app
        self.forwarder = forwarder
        """twllm's own forwarding of the hot routes (None: LiteLLM serves every request)."""
        self.settings = settings
        self.mounts = dict(mounts or {})
        """Path prefix -> app served there instead of LiteLLM (``MOUNTS``)."""
        self.metrics = metrics
        """/metrics on this port (None: not served here, a plain 404)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, _lifespan(send, self.forwarder))
            return
        if scope["type"] != "http":  # websockets (LiteLLM's realtime routes): not served
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        method = scope["method"]
        path = scope["path"]
        if self.metrics is not None and path.rstrip("/") == scrape.PATH:
            await self.metrics(scope, receive, send)
            return
        mount = mounted(self.mounts, path)
        if mount is not None:
            if method in ("POST", "PUT", "PATCH"):
                limited = await self._limited(scope, receive, send)
                if limited is None:
                    return
                receive = limited
            await mount(scope, receive, send)
            return
        verdict = allowed(method, path)
        if verdict is None:
            if responses.unserved(path):  # a stored response: the engines keep none
                await send_error(send, errors.make(501, responses.UNSERVED_MESSAGE, "not_implemented"))
            elif MANAGEMENT.fullmatch(path.rstrip("/") or "/"):
                await send_error(send, errors.make(404, MANAGEMENT_MESSAGE, "not_found"))
            else:
                await send_error(send, errors.make(404, f"Invalid URL ({method} {path}).", "not_found"))
            return
        if verdict is False:
            await send_error(send, errors.make(405, f"Method {method} is not allowed on {path}.", "method_not_allowed"))
            return
        if method in ("POST", "PUT", "PATCH"):
            limited = await self._limited(scope, receive, send)
            if limited is None:
                return
            checked = await _json_object(limited, send)  # LiteLLM fails on other bodies with a 500
            if checked is None:
                return
            body = checked
            # twllm's own forwarding (forward.py), for the requests that need nothing of LiteLLM's;
            # after the body, ``limited`` says when the client hangs up
            if self.forwarder is not None and await self.forwarder.serve(path, scope, body, limited, send):
                return
            receive = replaying(body, limited)
            scope = {**scope, "headers": litellm_request_headers(scope, len(body))}
        if score.is_score(path):  # vLLM's score API, answered by LiteLLM's rerank (score.py)
            await score.serve(self.app, scope, receive, _Rewriter(send, method, path).send)
            return
        await self.app(scope, receive, _Rewriter(send, method, path).send)

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """``receive`` for a body within the limit, or None once 413 has been sent."""
        limit = self.settings.max_request_bytes
        length = _header(scope, b"content-length")
        too_large = errors.make(
            413, f"The request body is larger than this gateway's limit of {limit} bytes.", "request_too_large"
        )
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                await send_error(send, errors.make(400, "The Content-Length header is not a number."))
                return None
            if size > limit:
                await send_error(send, too_large)
                return None
            return receive
        # No length given (chunked): read the body here, within the limit, and replay it.
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                await send_error(send, too_large)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return replaying(b"".join(chunks), receive)


async def _json_object(receive: Receive, send: Send) -> bytes | None:
    """The body, as LiteLLM can read it, or None once a 400 has been sent.

    Every POST route served is OpenAI's JSON API. LiteLLM answers a body that is a JSON array or
    scalar with a 500 (its auth reads fields off it) and logs a traceback for one that is not
    UTF-8, nests too deep or holds a huge integer (then goes on as if the body were empty)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    problem = body_problem(body)
    if problem is not None:
        await send_error(send, problem)
        return None
    return _without_null_metadata(body)


def body_problem(body: bytes) -> errors.PublicError | None:
    """The 400 for a ``body`` that is not a JSON object LiteLLM can handle (None: it is one)."""
    if not body.strip():
        return _bad_json("The request body is empty; it must be a JSON object.")
    try:  # as LiteLLM reads it: orjson, then the json module for what orjson refuses
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        try:
            data = json.loads(body.decode("utf-8"), parse_float=_finite, parse_constant=_not_finite)
            json.dumps(data, ensure_ascii=False).encode("utf-8")  # as LiteLLM checks it: no lone surrogate
        except UnicodeEncodeError:
            return _bad_json("We could not parse the JSON body of your request: it has a lone UTF-16 surrogate.")
        except UnicodeDecodeError:
            return _bad_json("We could not parse the JSON body of your request: it is not valid UTF-8.")
        except json.JSONDecodeError as exc:
            return _bad_json(
                f"We could not parse the JSON body of your request ({exc.msg} at line {exc.lineno} column {exc.colno})."
            )
        except RecursionError:
            return _bad_json("We could not parse the JSON body of your request: it nests too deep.")
        except _NotFinite as exc:  # LiteLLM would read it, then fail to send it on (a 500)
            return _bad_json(f"We could not parse the JSON body of your request: {exc} is not a finite number.")
        except ValueError:  # an integer longer than Python reads (sys.get_int_max_str_digits)
            return _bad_json("We could not parse the JSON body of your request: a number in it is too long.")
    if not isinstance(data, dict):
        return _bad_json(f"The request body must be a JSON object, not {_kind_of(data)}.")
    model = data.get("model")
    if model is not None and not isinstance(model, str):  # LiteLLM's auth fails on it (a 500 or 401)
        return errors.make(400, "`model` must be a string.", "invalid_type", "model")
    for name in METADATA:  # LiteLLM's failure hook updates it in place: a 500 for a refused key
        if data.get(name) is not None and not isinstance(data[name], dict):
            return errors.make(400, f"`{name}` must be an object.", "invalid_type", name)
    for name in OPERATOR_FIELDS:  # where and how to reach an engine is the operator's, never a client's
        if name in data:
            return errors.make(400, f"`{name}` is not allowed in the request body.", "unsupported_parameter", name)
    expected: tuple[tuple[str, type, str], ...] = (("messages", list, "a list"), ("user", str, "a string"))
    for name, of_type, what in expected:
        # LiteLLM fails on other types (a 500; its rate limiter hashes `user` after a 200)
        if data.get(name) is not None and not isinstance(data[name], of_type):
            return errors.make(400, f"`{name}` must be {what}.", "invalid_type", name)
    problem = _messages_problem(data.get("messages"))
    if problem is not None:
        return problem
    for name in OBJECT_FIELDS:  # LiteLLM fails on another type with a traceback (TypeError)
        if data.get(name) is not None and not isinstance(data[name], dict):
            return _not_an_object(name, data[name])
    for name in METADATA:
        inner = data.get(name) or {}
        for field in ("session_id", "trace_id"):  # hashed by LiteLLM's rate limiter too
            if inner.get(field) is not None and not isinstance(inner[field], str):
                return errors.make(400, f"`{name}.{field}` must be a string.", "invalid_type", f"{name}.{field}")
    tags = data.get("tags")  # LiteLLM's rate limiter and budget code hash each tag: a 500 otherwise
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        return errors.make(400, "`tags` must be a list of strings.", "invalid_type", "tags")
    guardrails = data.get("guardrails")  # names of guardrails (a list), or LiteLLM's per-name settings
    if guardrails is not None and not (
        (isinstance(guardrails, list) and all(isinstance(g, str) for g in guardrails)) or isinstance(guardrails, dict)
    ):
        return errors.make(400, "`guardrails` must be a list of guardrail names.", "invalid_type", "guardrails")
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _depth_over(data, MAX_DEPTH):
        return _bad_json(f"The request body nests deeper than {MAX_DEPTH} levels.")
    return None


def _messages_problem(messages: Any) -> errors.PublicError | None:
    """A message, or a part of a message's content, that is not an object: LiteLLM fails on it
    (a traceback, then a 400 or a 500). OpenAI answers 400 invalid_type naming the item."""
    if not isinstance(messages, list):
        return None
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return _not_an_object(f"messages[{i}]", message)
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict):
                    return _not_an_object(f"messages[{i}].content[{j}]", part)
    return None


def _not_an_object(param: str, value: Any) -> errors.PublicError:
    return errors.make(
        400,
        f"Invalid type for '{param}': expected an object, but got {_kind_of(value)} instead.",
        "invalid_type",
        param,
    )


def _kind_of(value: Any) -> str:
    """A JSON value's kind as a sentence says it (a value that is not an object)."""
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


METADATA = ("metadata", "litellm_metadata")
OBJECT_FIELDS = ("response_format", "stream_options")
"""OpenAI request fields that are objects wherever they appear (chat and completions)."""
OPERATOR_FIELDS = (
    "api_key",
    "api_base",
    "base_url",
    "api_version",
    "extra_headers",
    "headers",
    "model_list",
    "user_config",
    "secret_fields",
)
"""Request fields LiteLLM would use to reach an engine (its key, URL, headers, deployments): a
client's would bypass the engine key or inject headers (a 500 for a control character)."""


def _without_null_metadata(body: bytes) -> bytes:
    """``body`` without ``"metadata": null`` (the same as none, which LiteLLM's failure hook cannot take)."""
    if b"metadata" not in body:
        return body
    data = json.loads(body)
    if not any(name in data and data[name] is None for name in METADATA):
        return body
    kept = {k: v for k, v in data.items() if not (k in METADATA and v is None)}
    return json.dumps(kept, ensure_ascii=False).encode("utf-8")


MAX_DEPTH = 100
"""How deep a request body may nest. orjson reads 1,024 levels, but LiteLLM and the score route
go on with recursive code (the json module, deepcopy) that fails with a 500 at a few hundred."""


def _depth_over(data: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


LITELLM_REQUEST_HEADERS = (b"x-litellm-", b"litellm-")
"""Request headers that set LiteLLM's own behaviour (timeouts, retries, tags, redaction, another
key header): not the client's to set, and junk in them is a 500."""


def litellm_request_headers(scope: Scope, length: int) -> list[tuple[bytes, bytes]]:
    """The request's headers as LiteLLM gets them, once its body is known to be a JSON object: said
    so in ``Content-Type`` (LiteLLM reads any other type as a form or binary upload and fails), and
    without LiteLLM's own control headers; ``length``: the body's, as replayed."""
    headers = [
        (k, v)
        for k, v in scope.get("headers", ())
        if k.lower() not in (b"content-type", b"content-length", b"transfer-encoding")
        and not k.lower().startswith(LITELLM_REQUEST_HEADERS)
    ]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(length).encode())]
    return headers


def _bad_json(message: str) -> errors.PublicError:
    return errors.make(400, message, "invalid_json")


class _NotFinite(ValueError):
    pass


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _NotFinite(text[:40])
    return value


def _not_finite(text: str) -> float:
    raise _NotFinite(text)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class _Rewriter:
    """Wraps ``send``: errors into OpenAI's shape, internal headers out, stream errors rewritten."""

    __slots__ = ("_send", "_start", "_error_body", "_stream", "_method", "_path", "_call_id")

    def __init__(self, send: Send, method: str = "", path: str = "") -> None:
        self._send = send
        self._method = method
        self._path = path
        self._start: Message | None = None
        self._error_body: list[bytes] | None = None
        self._stream = False
        self._call_id = ""
        """An answer's call id while its end still has to wait for its ledger row."""

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            status = message["status"]
            if status < 400 and self._method == "POST" and any(p.fullmatch(self._path) for p in ANSWERS):
                self._call_id = next(
                    (v.decode("latin-1") for k, v in message.get("headers", ()) if k.lower() == CALL_ID_HEADER), ""
                )
            headers = [(k, v) for k, v in message.get("headers", ()) if not k.lower().startswith(HOP_HEADERS)]
            message = {**message, "headers": headers}
            if status >= 400:
                self._start = message
                self._error_body = []
                return
            self._stream = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)
            await self._send(message)
            return
        if kind == "http.response.body":
            if self._error_body is not None:
                self._error_body.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                await self._send_error()
                return
            if self._stream and b'"error"' in message.get("body", b""):
                message = {**message, "body": rewrite_stream_errors(message["body"])}
            if self._call_id and (
                not message.get("more_body", False) or (self._stream and STREAM_END in message.get("body", b""))
            ):
                call_id, self._call_id = self._call_id, ""
                await journal.wait(call_id)  # answered only once its ledger row is journaled
            await self._send(message)
            return
        await self._send(message)

    async def _send_error(self) -> None:
        assert self._start is not None and self._error_body is not None
        raw = b"".join(self._error_body)
        public = errors.public_error(self._start["status"], raw)
        note_error(self._method, self._path, public)
        body = public.encoded()
        keep = [
            (k, v)
            for k, v in self._start.get("headers", ())
            if k.lower() not in (b"content-length", b"content-type")
            and not (public.headers and k.lower() == b"retry-after")
        ]
        keep += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        keep += [(k.lower().encode(), v.encode()) for k, v in public.headers.items()]
        await self._send({"type": "http.response.start", "status": public.status, "headers": keep})
        await self._send({"type": "http.response.body", "body": body})


def rewrite_stream_errors(body: bytes) -> bytes:
    """Rewrite the ``data: {"error": ...}`` events of an SSE body into OpenAI's shape."""
    out = []
    for line in body.split(b"\n"):
        if line.startswith(b"data:") and b'"error"' in line:
            payload = line[5:].strip()
            try:
                data = json.loads(payload)
            except ValueError:
                data = None
            if isinstance(data, dict) and "error" in data and "choices" not in data:
                inner = data["error"] if isinstance(data["error"], dict) else {}
                code = inner.get("code")
                status = int(code) if isinstance(code, (int, str)) and str(code).isdigit() else 500
                public = errors.public_error(status, data)
                line = b"data: " + public.encoded()
            elif (failed := responses.public_failure(data)) is not None:  # a Responses stream's end
                line = b"data: " + failed
        out.append(line)
    return b"\n".join(out)


class ClientErrorLogFilter(logging.Filter):
    """LiteLLM logs every refused request (an engine's 4xx, a revoked key) as an ERROR, often
    with a traceback. A refusal is the client's error, not the gateway's: it is dropped here (the
    shield logs one line per error instead); an engine that cannot be reached becomes one
    WARNING line; anything else stays as it is."""

    CALL = "_handle_llm_api_exception()"
    AUTH = "user_api_key_auth(): Exception occured"

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if self.AUTH in msg:
            if record.exc_info is None or errors.REJECTED_FIELD in str(record.exc_info[1]):
                return False  # a refused body field is the client's error (400, errors.public_error)
            if type(record.exc_info[1]).__name__ == "TwllmAuthError":
                return False  # twllm's own refusal (a 503 too): the shield logs it in one line
            return _status_of(record.exc_info[1]) not in range(400, 500)
        if self.CALL not in msg:
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        exc = next((a for a in args if isinstance(a, BaseException)), None)
        if exc is None and record.exc_info and isinstance(record.exc_info, tuple):
            exc = record.exc_info[1]
        status = _status_of(exc)
        if exc is not None:
            text = str(exc)
        elif args:  # LiteLLM may pass it as text
            text = " ".join(str(a) for a in args[1:])
        else:  # already formatted into the message by another filter
            text = record.getMessage().partition(" - litellm_call_id=")[2].partition(" - ")[2]
        if status is not None and status < 500 and not errors.UNAVAILABLE.search(text):
            return False
        if errors.invalid_request(text) is not None:  # the client's error, answered 400
            return False
        if status is None or errors.UNAVAILABLE.search(text) or errors.TIMEOUT.search(text):
            unreachable, timeout = errors.UNAVAILABLE.search(text), errors.TIMEOUT.search(text)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
            record.msg, record.args = (
                "twllm gateway: a model's engine could not answer (%s, %s): %s"
                if unreachable or timeout
                else "twllm gateway: a request failed (%s, %s): %s",
                (
                    type(exc).__name__ if exc is not None else "-",
                    "unreachable" if unreachable else "timeout" if timeout else "no status",
                    errors.scrub(text)[:200] or "-",
                ),
            )
        return True


def _lifespan(send: Send, forwarder: forward.Forwarder | None = None) -> Send:
    """``send`` of the lifespan: the worker's start is reported once the start-up actions are
    done (``twllm.gateway.startup``), so it reads no request before; at its end the fast path's
    connections to the engines are closed."""

    async def report(message: MutableMapping[str, Any]) -> None:
        if message.get("type") == "lifespan.startup.complete":
            await startup.run()
        elif message.get("type") == "lifespan.shutdown.complete" and forwarder is not None:
            await forwarder.close()
        await send(message)

    return report


def install_log_filter(logger: logging.Logger) -> None:
    """``ClientErrorLogFilter`` on ``logger``, ahead of LiteLLM's own filters: LiteLLM's
    redaction filter formats a record into its message and drops its arguments, and with them
    the exception whose status tells a client's error from an engine's."""
    if not any(isinstance(f, ClientErrorLogFilter) for f in logger.filters):
        logger.filters.insert(0, ClientErrorLogFilter())


def _status_of(exc: Any) -> int | None:
    for name in ("status_code", "code"):
        value = getattr(exc, name, None)
        if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
            return int(value)
    return None


def note_error(method: str, path: str, error: errors.PublicError) -> None:
    """One line per error the gateway answered (its status and code, never its text)."""
    level = logging.WARNING if error.status >= 500 else logging.INFO
    log.log(level, "twllm gateway: %s %s -> %d %s", method, path, error.status, error.code or error.type)


def build(settings: HttpSettings | None = None) -> ASGIApp:
    """LiteLLM's proxy app behind the shield, with CORS for the configured origins only."""
    from litellm._logging import verbose_proxy_logger
    from litellm.proxy.proxy_server import app as proxy_app
    from starlette.middleware.cors import CORSMiddleware

    install_log_filter(verbose_proxy_logger)
    streams.install()
    failfast.install()
    spread.install()  # least-busy routing takes turns among idle replicas
    readiness.install()  # no requests to a replica that does not answer its health probe
    rerank.install()  # the Safety Guard's codes survive LiteLLM's rerank route
    responses.install()
    lean.install(proxy_app)  # LiteLLM's per-request work that twllm does not need, off

    gateway = scrape.settings_from_env()
    settings = settings or gateway.http
    forwarder = forward.Forwarder(forward.load_table_from_env()) if settings.fast_path else None
    shielded: ASGIApp = Shield(
        proxy_app, settings, scrape.route(gateway.metrics, scrape.master_key(gateway)), load_mounts(), forwarder
    )
    if settings.cors_origins:
        return CORSMiddleware(
            shielded,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            max_age=600,
        )
    return _NoCors(shielded)


class _NoCors:
    """No origin is allowed: a browser's preflight gets 403, and nothing else changes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            await send_error(
                send,
                errors.make(
                    403,
                    "Cross-origin requests are not allowed by this gateway (gateway.cors_origins).",
                    "cors_not_allowed",
                ),
            )
            return
        await self.app(scope, receive, send)


def __getattr__(name: str) -> Any:
    # ``app`` is built on first access, so importing this module (tests, tools) loads no proxy.
    if name == "app":
        value = build()
        globals()["app"] = value
        return value
    raise AttributeError(name)
