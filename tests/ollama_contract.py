"""A contract server for Ollama's HTTP API: a FAKE that follows Ollama's documented API. Not Ollama.

The Ollama server binary cannot be installed on the machines that run these tests, so twllm's
Ollama driver is tested against this stand-in. It answers the endpoints twllm uses with the
request fields, response shapes, status codes and error texts of Ollama's docs/api.md and
server/routes.go (github.com/ollama/ollama); it runs no model, so chat and embeddings are canned.
Where this file has to guess (noted below), tests must not depend on the exact text.

    GET  /                        200 "Ollama is running"
    GET  /api/version             {"version": VERSION}
    GET  /api/tags                local models, newest first; `name` == `model` == "<model>:<tag>"
    POST /api/pull                {"model" (or the older "name"), "stream"}: NDJSON progress ending in
                                  {"status": "success"}; a tag outside the library fails with the
                                  line {"error": "pull model manifest: file does not exist"}
    HEAD /api/blobs/sha256:<hex>  200 or 404
    POST /api/blobs/sha256:<hex>  201 created, 200 already there, 400 "digest mismatch, ..."
    POST /api/create              {"model", "files": {name: "sha256:<hex>"} | "from", "stream"};
                                  files must be uploaded GGUF blobs (the error for a missing blob
                                  is this file's guess)
    POST /api/chat                canned reply (NDJSON unless "stream": false)
    POST /v1/chat/completions     canned reply, OpenAI shape (server-sent events when streaming)
    POST /v1/embeddings           deterministic vectors, OpenAI shape
    GET  /v1/models               the local models, OpenAI shape

A model that is not local is answered 404 `{"error": "model \\"x\\" not found, try pulling it
first"}` natively and `{"error": {"message": ..., "type": "not_found_error", ...}}` on /v1.

In a test: ``with ContractServer(library=["phi4-mini"]) as server: server.url``. As a stand-in
for the binary: ``python tests/ollama_contract.py serve`` listens on $OLLAMA_HOST like `ollama
serve`; $OLLAMA_CONTRACT_LIBRARY (comma separated) replaces the default library. Tests point
TWLLM_OLLAMA_BIN at a shell script that execs this file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

VERSION = "0.0.0-contract"
DEFAULT_LIBRARY = ("phi4-mini", "llama3.2", "qwen2.5:0.5b", "bge-m3")
"""Tags a pull can find. Everything else 'does not exist' in the registry."""
GGUF_MAGIC = b"GGUF"
EMBEDDING_DIMS = 8

_DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")


def canonical(name: str) -> str:
    """'Phi4-Mini' -> 'phi4-mini:latest', the way Ollama lists names."""
    name = name.strip().lower()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def canned_reply(model: str) -> str:
    """What every chat answers, so a test can tell which model a request reached."""
    return f"contract reply from {model}"


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class Store:
    """The server's state: local models, uploaded blobs and the library pulls can reach."""

    def __init__(self, library: Iterable[str]) -> None:
        self.library = {canonical(t) for t in library}
        self.models: dict[str, dict[str, Any]] = {}
        self.blobs: dict[str, tuple[int, bytes]] = {}
        """'sha256:<hex>' -> (size, first bytes)."""
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def add_model(self, name: str, size: int, fmt: str = "gguf") -> None:
        display = canonical(name)
        digest = hashlib.sha256(f"{display}:{size}".encode()).hexdigest()
        with self.lock:
            self.models[display] = {
                "name": display,
                "model": display,
                "modified_at": _now(),
                "size": size,
                "digest": digest,
                "details": {
                    "parent_model": "",
                    "format": fmt,
                    "family": "contract",
                    "families": ["contract"],
                    "parameter_size": "0B",
                    "quantization_level": "Q4_0",
                },
            }

    def has_model(self, name: str) -> bool:
        with self.lock:
            return canonical(name) in self.models


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.0"  # one response per connection; a stream ends when it closes
    server_version = "ollama-contract"

    # --- plumbing -------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            sys.stderr.write(f"[contract] {self.address_string()} {format % args}\n")

    def _record(self) -> None:
        with self.server.store.lock:
            self.server.store.requests.append((self.command, self.path))

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode())

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _openai_error(self, status: int, message: str) -> None:
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
        self._json(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})

    def _not_found(self) -> None:
        self._send(404, b"404 page not found", "text/plain")

    def _body_chunks(self) -> Iterator[bytes]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                yield self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return
        left = int(self.headers.get("Content-Length") or 0)
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk

    def _read_json(self) -> dict[str, Any] | None:
        raw = b"".join(self._body_chunks())
        if not raw.strip():
            self._error(400, "missing request body")
            return None
        try:
            body = json.loads(raw)
        except ValueError as exc:
            self._error(400, str(exc))
            return None
        if not isinstance(body, dict):
            self._error(400, "json: cannot unmarshal into request")
            return None
        return body

    def _stream(self, lines: Iterable[dict[str, Any]], want_stream: bool) -> None:
        """Ollama's progress streams: NDJSON under 200, errors as a final {"error"} line. With
        "stream": false, one object: the last one, or the error under 500."""
        if not want_stream:
            last: dict[str, Any] = {}
            for last in lines:
                if "error" in last:
                    return self._error(500, last["error"])
            return self._json(200, last)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.end_headers()
        for line in lines:
            self.wfile.write(json.dumps(line).encode() + b"\n")
            self.wfile.flush()

    # --- routing --------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._record()
        if self.path == "/":
            return self._send(200, b"Ollama is running", "text/plain; charset=utf-8")
        if self.path.startswith("/api/blobs/"):
            return self._head_blob(self.path.removeprefix("/api/blobs/"))
        self._not_found()

    def do_GET(self) -> None:
        self._record()
        store = self.server.store
        if self.path == "/":
            return self._send(200, b"Ollama is running", "text/plain; charset=utf-8")
        if self.path == "/api/version":
            return self._json(200, {"version": VERSION})
        with store.lock:
            models = sorted(store.models.values(), key=lambda m: m["modified_at"], reverse=True)
        if self.path == "/api/tags":
            return self._json(200, {"models": models})
        if self.path == "/v1/models":
            created = int(time.time())
            data = [{"id": m["name"], "object": "model", "created": created, "owned_by": "library"} for m in models]
            return self._json(200, {"object": "list", "data": data})
        self._not_found()

    def do_POST(self) -> None:
        self._record()
        routes = {
            "/api/pull": self._pull,
            "/api/create": self._create,
            "/api/chat": self._chat,
            "/v1/chat/completions": self._openai_chat,
            "/v1/embeddings": self._openai_embeddings,
        }
        if self.path.startswith("/api/blobs/"):
            return self._post_blob(self.path.removeprefix("/api/blobs/"))
        if self.path in routes:
            return routes[self.path]()
        self._not_found()

    # --- models ---------------------------------------------------------------------------
    def _pull(self) -> None:
        body = self._read_json()
        if body is None:
            return
        name = str(body.get("model") or body.get("name") or "")
        if not name:
            return self._error(400, "invalid model name")
        self._stream(self._pull_lines(name), body.get("stream", True) is not False)

    def _pull_lines(self, name: str) -> Iterator[dict[str, Any]]:
        yield {"status": "pulling manifest"}
        if canonical(name) not in self.server.store.library:
            yield {"error": "pull model manifest: file does not exist"}
            return
        sizes = (4_000_000, 1_200)
        for i, total in enumerate(sizes):
            digest = "sha256:" + hashlib.sha256(f"{canonical(name)}/{i}".encode()).hexdigest()
            for completed in (0, total // 2, total):
                line = {"status": f"pulling {digest[7:19]}", "digest": digest, "total": total}
                yield line | ({"completed": completed} if completed else {})
        yield from ({"status": s} for s in ("verifying sha256 digest", "writing manifest", "success"))
        self.server.store.add_model(name, sum(sizes))

    def _head_blob(self, digest: str) -> None:
        match = _DIGEST.match(digest)
        if not match:
            return self._error(400, "invalid digest format")
        with self.server.store.lock:
            present = f"sha256:{match[1]}" in self.server.store.blobs
        if present:
            return self._send(200)
        self._error(404, f"blob {json.dumps(digest)} not found")

    def _post_blob(self, digest: str) -> None:
        match = _DIGEST.match(digest)
        if not match:
            return self._error(400, "invalid digest format")
        want = f"sha256:{match[1]}"
        hasher, size, head = hashlib.sha256(), 0, b""
        for chunk in self._body_chunks():  # always drain the body, so the client can finish sending
            hasher.update(chunk)
            head = (head + chunk)[:16] if len(head) < 16 else head
            size += len(chunk)
        got = f"sha256:{hasher.hexdigest()}"
        with self.server.store.lock:
            if want in self.server.store.blobs:
                return self._send(200)
            if got != want:
                return self._error(400, f"digest mismatch, expected {json.dumps(want)}, got {json.dumps(got)}")
            self.server.store.blobs[want] = (size, head)
        self._send(201)

    def _create(self) -> None:
        body = self._read_json()
        if body is None:
            return
        store = self.server.store
        name = str(body.get("model") or body.get("name") or "")
        files, source = body.get("files") or {}, body.get("from")
        if not name:
            return self._error(400, "invalid model name")
        if not isinstance(files, dict):
            return self._error(400, "json: cannot unmarshal files")
        for path, digest in files.items():
            if not path or path.startswith("/") or ".." in path.split("/"):
                return self._error(400, "file path must be relative")
            if not isinstance(digest, str) or not _DIGEST.match(digest):
                return self._error(400, "invalid digest format")
        if not files and not source:
            return self._error(400, "neither 'from' or 'files' was specified")
        with store.lock:
            blobs = {d: store.blobs.get(d.replace("sha256-", "sha256:")) for d in files.values()}
        for digest, blob in blobs.items():
            if blob is None:
                return self._error(400, f"blob {digest} not found")  # this file's guess at the text
            if not blob[1].startswith(GGUF_MAGIC):
                return self._error(400, "supplied file was not in GGUF format")
        if source and not store.has_model(source):
            return self._error(404, f"model {json.dumps(source)} not found")

        def lines() -> Iterator[dict[str, Any]]:
            if files:
                yield {"status": "parsing GGUF"}
            for digest in files.values():
                yield {"status": f"using existing layer {digest}"}
            yield {"status": "writing manifest"}
            yield {"status": "success"}
            store.add_model(name, sum(blob[0] for blob in blobs.values() if blob) or 1)

        self._stream(lines(), body.get("stream", True) is not False)

    # --- inference ------------------------------------------------------------------------
    def _chat(self) -> None:
        body = self._read_json()
        if body is None:
            return
        model = str(body.get("model") or "")
        if not self.server.store.has_model(model):
            return self._error(404, f"model {json.dumps(model)} not found, try pulling it first")
        done = {
            "model": model,
            "created_at": _now(),
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": "stop",
            "total_duration": 1000,
            "load_duration": 10,
            "prompt_eval_count": 1,
            "prompt_eval_duration": 100,
            "eval_count": 4,
            "eval_duration": 400,
        }
        if not body.get("messages"):
            return self._json(200, done | {"done_reason": "load"})
        reply = {"role": "assistant", "content": canned_reply(model)}
        if body.get("stream", True) is False:
            return self._json(200, done | {"message": reply})
        self._stream([{"model": model, "created_at": _now(), "message": reply, "done": False}, done], True)

    def _openai_chat(self) -> None:
        body = self._read_json()
        if body is None:
            return
        model = str(body.get("model") or "")
        if not self.server.store.has_model(model):
            return self._openai_error(404, f"model {json.dumps(model)} not found, try pulling it first")
        content = canned_reply(model)
        usage = {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}
        head = {
            "id": f"chatcmpl-{int(time.time() * 1000) % 1000}",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_ollama",
        }
        if not body.get("stream"):
            choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            return self._json(200, head | {"object": "chat.completion", "choices": [choice], "usage": usage})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        chunk = head | {"object": "chat.completion.chunk"}
        for text, finish in ((content, None), ("", "stop")):
            delta = {"role": "assistant", "content": text}
            event = chunk | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")

    def _openai_embeddings(self) -> None:
        body = self._read_json()
        if body is None:
            return
        model, given = str(body.get("model") or ""), body.get("input")
        if not self.server.store.has_model(model):
            return self._openai_error(404, f"model {json.dumps(model)} not found, try pulling it first")
        texts = [given] if isinstance(given, str) else given
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            return self._openai_error(400, "invalid input type")
        data = [{"object": "embedding", "embedding": _vector(t), "index": i} for i, t in enumerate(texts)]
        tokens = sum(len(t.split()) for t in texts)
        self._json(
            200,
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )


def _vector(text: str) -> list[float]:
    raw = hashlib.sha256(text.encode()).digest()[:EMBEDDING_DIMS]
    values = [b / 255 - 0.5 for b in raw]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [round(v / norm, 6) for v in values]


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], store: Store, verbose: bool) -> None:
        super().__init__(address, _Handler)
        self.store = store
        self.verbose = verbose


class ContractServer:
    """The contract server on a background thread (port 0: a free one). A context manager."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, library: Iterable[str] = DEFAULT_LIBRARY, verbose: bool = False
    ) -> None:
        self.store = Store(library)
        self._httpd = _HTTPServer((host, port), self.store, verbose)
        self.host, self.port = self._httpd.server_address[:2]
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ContractServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> ContractServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def parse_ollama_host(value: str | None) -> tuple[str, int]:
    """$OLLAMA_HOST the way `ollama serve` reads it: [scheme://]host[:port], 127.0.0.1:11434 by default."""
    value = (value or "").strip()
    value = value.split("://", 1)[-1].rstrip("/")
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        host, port = value, "11434"
    return host or "127.0.0.1", int(port)


def serve(argv: list[str]) -> int:
    """`ollama` look-alike: `serve` listens on $OLLAMA_HOST until SIGTERM or SIGINT."""
    if argv[:1] in (["-v"], ["--version"]):
        print(f"ollama version is {VERSION}")
        return 0
    if argv[:1] != ["serve"]:
        print("usage: ollama_contract.py serve | --version", file=sys.stderr)
        return 2
    host, port = parse_ollama_host(os.environ.get("OLLAMA_HOST"))
    library = [t for t in os.environ.get("OLLAMA_CONTRACT_LIBRARY", "").split(",") if t.strip()] or DEFAULT_LIBRARY
    if models := os.environ.get("OLLAMA_MODELS"):
        os.makedirs(models, exist_ok=True)
    try:
        httpd = _HTTPServer((host, port), Store(library), verbose=True)
    except OSError as exc:
        print(f"Error: listen tcp {host}:{port}: {exc.strerror}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(
        f'msg="Listening on {host}:{port} (version {VERSION})" (Ollama contract server, not Ollama)',
        file=sys.stderr,
        flush=True,
    )
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1:]))
