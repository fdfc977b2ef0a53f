"""The console's ASGI app: ``/console`` (the page), its static files, and ``/console/api/``.

Static files come from this package (``static/``, shipped as package data), a fixed list read
once: no path from a request ever reaches the file system. Every response carries a strict
Content-Security-Policy (scripts, styles and fetches from this origin only; no inline script,
no frames, no forms posting elsewhere), ``nosniff``, ``no-referrer``, and ``no-store`` for the
API. No response sets a cookie and no request's cookies are read.

``build_app`` is what the gateway's shield mounts (``twllm.gateway.asgi``); it reads the master
key and the database from the gateway's environment (``twllm.accounting.gateway_config``) and
the state folder from gateway.json.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl

from twllm.accounting.gateway_config import GatewayConfig
from twllm.console import PREFIX
from twllm.console.api import ConsoleApi
from twllm.gateway.settings import GatewaySettings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

API = PREFIX + "/api/"
MAX_BODY_BYTES = 64 * 1024
"""The API takes small JSON forms only."""
STATIC: dict[str, tuple[str, str]] = {
    "": ("index.html", "text/html; charset=utf-8"),
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
    "/vendor/chart.umd.min.js": ("vendor/chart.umd.min.js", "text/javascript; charset=utf-8"),
}
"""Path after /console -> (file under static/, content type)."""
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
)


def load_static() -> dict[str, tuple[bytes, str]]:
    """Each served path's bytes and content type, read from the package once."""
    root = resources.files("twllm.console") / "static"
    return {path: ((root / name).read_bytes(), kind) for path, (name, kind) in STATIC.items()}


class ConsoleApp:
    """See the module docstring."""

    def __init__(self, api: ConsoleApi, static: dict[str, tuple[bytes, str]] | None = None) -> None:
        self.api = api
        self.static = static if static is not None else load_static()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if path.startswith(API):
            if method not in ("GET", "POST"):
                await respond(send, *_error(405, "method_not_allowed", f"Method {method} is not allowed here."))
                return
            body = await read_body(receive, MAX_BODY_BYTES) if method == "POST" else b""
            if body is None:
                await respond(send, *_error(413, "request_too_large", "The request body is too large."))
                return
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            status, payload = await self.api.handle(method, path[len(API) :], _authorization(scope), query, body)
            await respond(send, status, json.dumps(payload, ensure_ascii=False).encode(), "application/json")
            return
        found = self.static.get(path[len(PREFIX) :])
        if found is None:
            await respond(send, *_error(404, "not_found", f"Nothing at {path}."))
            return
        if method not in ("GET", "HEAD"):
            await respond(send, *_error(405, "method_not_allowed", f"Method {method} is not allowed here."))
            return
        content, kind = found
        await respond(send, 200, content, kind, cache=b"no-cache", head=method == "HEAD")


def _error(status: int, code: str, message: str) -> tuple[int, bytes, str]:
    return status, json.dumps({"error": {"message": message, "code": code}}).encode(), "application/json"


def _authorization(scope: Scope) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == b"authorization":
            return str(value.decode("latin-1"))
    return None


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body (None when it is over ``limit`` bytes or the client left)."""
    chunks: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def respond(
    send: Send, status: int, body: bytes, kind: str, *, cache: bytes = b"no-store", head: bool = False
) -> None:
    headers = [
        (b"content-type", kind.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", cache),
        *SECURITY_HEADERS,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


def build_app(settings_path: str | None = None) -> ConsoleApp:
    """The console as the gateway serves it, configured from the gateway's environment."""
    config = GatewayConfig.from_env()
    path = settings_path or (str(config.settings_path) if config.settings_path is not None else None)
    state_dir = GatewaySettings.load(path).state_dir if path else None
    return ConsoleApp(ConsoleApi(config.master_key, config.database_url, state_dir))
