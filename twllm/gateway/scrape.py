"""Serving /metrics: the one scrape of every gateway worker's series, behind the master key or alone.

Two ways, chosen by gateway.json's ``metrics`` section (the spec's ``monitoring.metrics``):

- no port: the shield (``asgi.py``) answers ``GET /metrics`` on the gateway's port with
  ``MetricsRoute``, which wants the master key as a bearer token (401 in OpenAI's shape otherwise);
- a port: ``start_listener`` serves ``GET /metrics`` alone, without a key, on a plain HTTP
  listener of the gateway's host (for a scraper on a private network); every other path is 404.

Either way the answer is LiteLLM's series and twllm's (``metrics.py``) in Prometheus text format,
added up over the workers through prometheus_client's multiprocess folder. LiteLLM mounts its own
unauthenticated /metrics on its app; the shield never lets a request reach it.

This module reads the folder only, so the uvicorn supervisor process (which serves no requests)
can run the listener without making series of its own.
"""

from __future__ import annotations

import hmac
import os
import shutil
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess

from twllm.gateway import errors
from twllm.gateway.settings import GatewaySettings, MetricsSettings
from twllm.settings import GATEWAY_SETTINGS_ENV, MASTER_KEY_ENV, PROMETHEUS_MULTIPROC_DIR_ENV

Message = MutableMapping[str, Any]  # ASGI, as in asgi.py (which imports this module)
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]

PATH = "/metrics"
UNAUTHORIZED = "The gateway's /metrics needs the master key: Authorization: Bearer <master key>."


def settings_from_env() -> GatewaySettings:
    """gateway.json, from the file the environment names (defaults without one)."""
    path = os.environ.get(GATEWAY_SETTINGS_ENV)
    return GatewaySettings.load(path) if path else GatewaySettings()


def prepare_folder(folder: Path) -> None:
    """Empty (or make) the multiprocess folder, private to this user: a new gateway starts from
    zero, and the files of a gateway before it (other pids) would otherwise be added in forever."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)


def forget_dead_workers(folder: Path) -> list[int]:
    """Drop the live gauges (spool rows, ledger lag) of workers that no longer run: a worker killed
    and replaced would otherwise report its last backlog forever. Counters and histograms of dead
    workers stay, as Prometheus counters must. The pids forgotten."""
    dead = set()
    for path in folder.glob("gauge_live*_*.db"):
        pid_text = path.stem.rpartition("_")[2]
        if pid_text.isdigit() and not _alive(int(pid_text)):
            dead.add(int(pid_text))
    for pid in dead:
        multiprocess.mark_process_dead(pid, str(folder))
    return sorted(dead)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def latest() -> bytes:
    """Every worker's series in Prometheus text format (this process's alone without the folder)."""
    if folder := os.environ.get(PROMETHEUS_MULTIPROC_DIR_ENV):
        forget_dead_workers(Path(folder))
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def master_key(settings: GatewaySettings) -> str:
    return os.environ.get(settings.master_key_env or MASTER_KEY_ENV, "")


def authorized(header: str | None, key: str) -> bool:
    """True for ``Bearer <key>`` (compared in constant time); never for an empty key."""
    if not key or header is None:
        return False
    scheme, _, token = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


class MetricsRoute:
    """``GET /metrics`` on the gateway's port, for the master key only (an ASGI app)."""

    def __init__(self, key: str) -> None:
        self.key = key

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            await _send_error(
                send, errors.make(405, f"Method {method} is not allowed on {PATH}.", "method_not_allowed")
            )
            return
        header = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == b"authorization"), None)
        if not authorized(header, self.key):
            await _send_error(
                send,
                errors.make(401, UNAUTHORIZED, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"}),
            )
            return
        body = latest()
        headers = [(b"content-type", CONTENT_TYPE_LATEST.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})


async def _send_error(send: Send, error: errors.PublicError) -> None:
    body = error.encoded()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def route(settings: MetricsSettings, key: str) -> MetricsRoute | None:
    """The shield's /metrics route, or None where the gateway's port does not serve /metrics."""
    return MetricsRoute(key) if settings.enabled and settings.port is None else None


class _Handler(BaseHTTPRequestHandler):
    server_version = "twllm-metrics"
    sys_version = ""

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def _answer(self, *, head: bool) -> None:
        if self.path.split("?", 1)[0].rstrip("/") != PATH:
            self._send(404, b"Not found: this listener serves /metrics only.\n", "text/plain; charset=utf-8", head)
            return
        self._send(200, latest(), CONTENT_TYPE_LATEST, head)

    def _send(self, status: int, body: bytes, content_type: str, head: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # a scrape every few seconds is not worth a log line


def start_listener(host: str, port: int) -> ThreadingHTTPServer:
    """Serve /metrics (only) on ``host:port`` from a daemon thread; returns the server."""
    server = ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="twllm-metrics", daemon=True).start()
    return server
