"""A stand-in OpenAI-compatible engine for guard tests (not a model; named as such everywhere).

It exists to make the gateway's guard observable from both sides: what reached "the model" and
what the model "said". A real vLLM engine answers with whatever its weights give; this one:

- ``SAY: <text>`` as the last user message → answers exactly <text>;
- ``SAY64: <base64>`` → answers the decoded text (so an input check does not see it);
- ``ECHO`` anywhere in it → answers the last user message as received (so a test sees whether
  the gateway masked it);
- ``DUMP`` → answers the JSON of every received message;
- ``TOOL: <name> <arguments>`` (chat completions) → answers one tool call of function <name>
  with exactly <arguments> (no text); streamed, the arguments come in pieces of ``CHUNK``;
- anything else → "好的。";
- ``/embeddings`` → a 2-number vector per input (its length, 1.0);
- ``/responses`` (not streamed) → a Responses API answer to ``input`` as above; streamed, and
  ``/rerank`` or ``/score`` → 404, as an engine without them answers.

Streams send the answer in pieces of ``CHUNK`` characters, so entities cross chunk boundaries.
Every request body is kept in ``received``.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CHUNK = 3


def answer_for(messages: list[dict[str, Any]]) -> str:
    last = next((m for m in reversed(messages) if m.get("role") == "user"), {"content": ""})
    text = last.get("content")
    if isinstance(text, list):
        text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
    text = text or ""
    if text.startswith("SAY64: "):
        return base64.b64decode(text[len("SAY64: ") :]).decode("utf-8")
    if text.startswith("SAY: "):
        return text[len("SAY: ") :]
    if "DUMP" in text:
        return json.dumps(messages, ensure_ascii=False)
    if "ECHO" in text:
        return text
    return "好的。"


def tool_call_for(messages: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(function name, arguments) when the last user message is ``TOOL: <name> <arguments>``."""
    last = next((m for m in reversed(messages) if m.get("role") == "user"), {"content": ""})
    text = last.get("content")
    if not isinstance(text, str) or not text.startswith("TOOL: "):
        return None
    name, _, arguments = text[len("TOOL: ") :].partition(" ")
    return name, arguments


class EchoUpstream:
    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._json({"object": "list", "data": [{"id": "echo", "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                upstream.received.append(body)
                if self.path.rstrip("/").endswith("/responses") and not body.get("stream"):
                    given = body.get("input")
                    said = answer_for([{"role": "user", "content": given if isinstance(given, str) else "…"}])
                    self._json(
                        {
                            "id": "resp_echo",
                            "object": "response",
                            "created_at": int(time.time()),
                            "status": "completed",
                            "model": "echo",
                            "output": [
                                {
                                    "type": "message",
                                    "id": "msg_echo",
                                    "status": "completed",
                                    "role": "assistant",
                                    "content": [{"type": "output_text", "text": said, "annotations": []}],
                                }
                            ],
                            "parallel_tool_calls": True,
                            "tool_choice": "auto",
                            "tools": [],
                            "usage": {"input_tokens": 5, "output_tokens": len(said), "total_tokens": 5 + len(said)},
                        }
                    )
                    return
                if self.path.rstrip("/").endswith(("/responses", "/rerank", "/score")):
                    # Not served here, as by an OpenAI-compatible engine without these APIs.
                    self._json({"error": {"message": f"{self.path} not found", "type": "NotFound"}}, 404)
                    return
                if self.path.endswith("/embeddings"):
                    texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
                    self._json(
                        {
                            "object": "list",
                            "model": "echo",
                            "usage": {"prompt_tokens": 3, "total_tokens": 3},
                            "data": [
                                {"object": "embedding", "index": i, "embedding": [float(len(t)), 1.0]}
                                for i, t in enumerate(texts)
                            ],
                        }
                    )
                    return
                messages = body.get("messages") or [{"role": "user", "content": body.get("prompt") or ""}]
                text = answer_for(messages)
                created = int(time.time())
                tool = tool_call_for(messages) if self.path.endswith("/chat/completions") else None
                if tool is not None:
                    self._tool_call(tool, created, bool(body.get("stream")))
                    return
                if not self.path.endswith("/chat/completions") and not body.get("stream"):
                    self._json(
                        {
                            "id": "cmpl-echo",
                            "object": "text_completion",
                            "created": created,
                            "model": "echo",
                            "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
                            "usage": {
                                "prompt_tokens": 5,
                                "completion_tokens": len(text),
                                "total_tokens": 5 + len(text),
                            },
                        }
                    )
                    return
                if not body.get("stream"):
                    self._json(
                        {
                            "id": "chatcmpl-echo",
                            "object": "chat.completion",
                            "created": created,
                            "model": "echo",
                            "choices": [
                                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                            ],
                            "usage": {
                                "prompt_tokens": 5,
                                "completion_tokens": len(text),
                                "total_tokens": 5 + len(text),
                            },
                        }
                    )
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                pieces = [text[i : i + CHUNK] for i in range(0, len(text), CHUNK)]
                events = [{"role": "assistant", "content": ""}] + [{"content": p} for p in pieces]
                for delta in events:
                    self._event(
                        {
                            "id": "chatcmpl-echo",
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": "echo",
                            "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
                        }
                    )
                self._event(
                    {
                        "id": "chatcmpl-echo",
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": "echo",
                        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 5, "completion_tokens": len(text), "total_tokens": 5 + len(text)},
                    }
                )
                self._write(b"data: [DONE]\n\n")
                self._write(b"")

            def _tool_call(self, tool: tuple[str, str], created: int, stream: bool) -> None:
                name, arguments = tool
                usage = {"prompt_tokens": 5, "completion_tokens": len(arguments), "total_tokens": 5 + len(arguments)}
                call = {"id": "call_echo", "type": "function", "function": {"name": name, "arguments": arguments}}
                if not stream:
                    message = {"role": "assistant", "content": None, "tool_calls": [call]}
                    self._json(
                        {
                            "id": "chatcmpl-echo",
                            "object": "chat.completion",
                            "created": created,
                            "model": "echo",
                            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
                            "usage": usage,
                        }
                    )
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                first = {**call, "index": 0, "function": {"name": name, "arguments": ""}}
                deltas: list[dict[str, Any]] = [{"role": "assistant", "content": None, "tool_calls": [first]}]
                deltas += [
                    {"tool_calls": [{"index": 0, "function": {"arguments": arguments[i : i + CHUNK]}}]}
                    for i in range(0, len(arguments), CHUNK)
                ]
                for delta in deltas:
                    self._event(
                        {
                            "id": "chatcmpl-echo",
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": "echo",
                            "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
                        }
                    )
                self._event(
                    {
                        "id": "chatcmpl-echo",
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": "echo",
                        "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}],
                        "usage": usage,
                    }
                )
                self._write(b"data: [DONE]\n\n")
                self._write(b"")

            def _event(self, data: dict[str, Any]) -> None:
                self._write(f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode())

            def _write(self, payload: bytes) -> None:
                self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
                self.wfile.flush()

            def _json(self, data: dict[str, Any], status: int = 200) -> None:
                payload = json.dumps(data, ensure_ascii=False).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> EchoUpstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
