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
import os
import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from twllm.gateway import errors, failfast, lean, rerank, responses, score, scrape, spread, streams
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
    ) -> None:
        self.app = app
        self.settings = settings
        self.mounts = dict(mounts or {})
        """Path prefix -> app served there instead of LiteLLM (``MOUNTS``)."""
        self.metrics = metrics
        """/metrics on this port (None: not served here, a plain 404)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
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
            receive = limited
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
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class _Rewriter:
    """Wraps ``send``: errors into OpenAI's shape, internal headers out, stream errors rewritten."""

    __slots__ = ("_send", "_start", "_error_body", "_stream", "_method", "_path")

    def __init__(self, send: Send, method: str = "", path: str = "") -> None:
        self._send = send
        self._method = method
        self._path = path
        self._start: Message | None = None
        self._error_body: list[bytes] | None = None
        self._stream = False

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            status = message["status"]
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
            return record.exc_info is not None and _status_of(record.exc_info[1]) not in range(400, 500)
        if self.CALL not in msg:
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        exc = next((a for a in args if isinstance(a, BaseException)), None)
        if exc is None and record.exc_info and isinstance(record.exc_info, tuple):
            exc = record.exc_info[1]
        status = _status_of(exc)
        if status is not None and status < 500:
            return False
        text = str(exc)
        if status is None or errors.UNAVAILABLE.search(text) or errors.TIMEOUT.search(text):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
            record.msg, record.args = (
                "twllm gateway: a model's engine could not answer (%s, %s): %s",
                (
                    type(exc).__name__,
                    "unreachable" if errors.UNAVAILABLE.search(text) else "timeout",
                    errors.scrub(text)[:200] or "-",
                ),
            )
        return True


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

    verbose_proxy_logger.addFilter(ClientErrorLogFilter())
    streams.install()
    failfast.install()
    spread.install()  # least-busy routing takes turns among idle replicas
    rerank.install()  # the Safety Guard's codes survive LiteLLM's rerank route
    responses.install()
    lean.install(proxy_app)  # LiteLLM's per-request work that twllm does not need, off

    gateway = scrape.settings_from_env()
    settings = settings or gateway.http
    shielded: ASGIApp = Shield(
        proxy_app, settings, scrape.route(gateway.metrics, scrape.master_key(gateway)), load_mounts()
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
