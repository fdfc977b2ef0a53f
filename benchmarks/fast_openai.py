"""A fast stand-in OpenAI server for the gateway benchmarks (not a model; named as such everywhere).

It answers at once, so that in a benchmark the proxy in front of it is the only cost worth
measuring:

- ``POST /v1/chat/completions``, not streamed → one fixed answer with ``usage``;
- streamed → ``max_tokens`` chunks (one token each) at ``--rate`` tokens per second per stream,
  then a usage chunk when ``stream_options.include_usage`` asks for one, then ``[DONE]``;
- ``GET /v1/models`` and ``GET /health`` → what a vLLM engine answers.

With ``--loading S`` it binds its port at once and answers only after S seconds, as a vLLM
engine loading its model does (the kernel accepts connections that nobody reads); ``--latency``
delays each non-streamed answer; ``--name`` goes into every completion id
(``chatcmpl-<name>-<n>``), so a client behind a proxy sees which stand-in answered.

HTTP/1.1 with keep-alive, parsed by hand on a bare asyncio protocol (uvloop when installed): the
requests come from our own proxies and clients, which always send ``Content-Length``.

    python benchmarks/fast_openai.py --port 8901 [--rate 200] [--model demo-chat] [--loading 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time

ANSWER = "好"
"""Every token of every answer: one CJK character, as a zh-TW model's token often is."""


class Handler(asyncio.Protocol):
    def __init__(self, server: StandIn) -> None:
        self.server = server
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self.next_request()

    def next_request(self) -> None:
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = self.buffer[:head_end].decode("latin-1").split("\r\n")
        method, path, _ = head[0].split(" ", 2)
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        end = head_end + 4 + length
        if len(self.buffer) < end:
            return
        body, self.buffer = self.buffer[head_end + 4 : end], self.buffer[end:]
        self.busy = True
        asyncio.get_running_loop().create_task(self.answer(method, path.split("?", 1)[0], body))

    async def answer(self, method: str, path: str, body: bytes) -> None:
        assert self.transport is not None
        try:
            if method == "POST" and path.endswith("/chat/completions"):
                request = json.loads(body or b"{}")
                if request.get("stream"):
                    await self.stream(request)
                else:
                    if self.server.latency:
                        await asyncio.sleep(self.server.latency)
                    self.send(200, self.server.completion(request))
            elif method == "GET" and path.endswith("/models"):
                self.send(200, {"object": "list", "data": [{"id": self.server.model, "object": "model"}]})
            elif method == "GET" and path == "/health":
                self.send(200, {})
            else:
                self.send(404, {"error": {"message": f"no route {path}", "type": "NotFoundError", "code": 404}})
        except (ConnectionError, RuntimeError):
            self.transport.close()
            return
        self.busy = False
        if self.buffer:
            self.next_request()

    def send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode()
        reason = {200: "OK", 404: "Not Found"}[status]
        head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
        assert self.transport is not None
        self.transport.write(head.encode() + data)

    async def stream(self, request: dict) -> None:
        assert self.transport is not None
        write = self.transport.write
        write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        tokens = int(request.get("max_tokens") or request.get("max_completion_tokens") or 16)
        ident = f"chatcmpl-{self.server.name}-{self.server.next_id()}"
        created = int(time.time())
        model = request.get("model", self.server.model)
        interval = 1.0 / self.server.rate
        start = time.perf_counter()

        def event(choice_delta: dict, finish: str | None, usage: dict | None = None) -> None:
            chunk: dict = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": choice_delta, "logprobs": None, "finish_reason": finish}]
                if usage is None
                else [],
            }
            if usage is not None:
                chunk["usage"] = usage
            data = b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"
            write(b"%x\r\n%s\r\n" % (len(data), data))

        event({"role": "assistant", "content": ""}, None)
        for number in range(tokens):
            # A fixed pace from the stream's start, as an engine decoding at a steady rate.
            delay = start + (number + 1) * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.transport.is_closing():
                raise ConnectionError("client went away")
            event({"content": ANSWER}, "length" if number == tokens - 1 else None)
        if (request.get("stream_options") or {}).get("include_usage"):
            event({}, None, {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens})
        done = b"data: [DONE]\n\n"
        write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))


class StandIn:
    def __init__(self, model: str, rate: float, latency: float = 0.0, name: str = "standin") -> None:
        self.model = model
        self.rate = rate
        self.latency = latency
        self.name = name
        self.count = 0

    def next_id(self) -> int:
        self.count += 1
        return self.count

    def completion(self, request: dict) -> dict:
        tokens = min(int(request.get("max_tokens") or 16), 16)
        return {
            "id": f"chatcmpl-{self.name}-{self.next_id()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", self.model),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": ANSWER * tokens},
                    "logprobs": None,
                    "finish_reason": "length",
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens},
        }


async def serve(host: str, port: int, standin: StandIn, loading: float = 0.0) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    if loading:  # listening, but nobody reads yet: a vLLM engine loading its model
        time.sleep(loading)
    server = await loop.create_server(lambda: Handler(standin), sock=sock)
    print(f"stand-in OpenAI server on http://{host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="demo-chat")
    parser.add_argument("--rate", type=float, default=200.0, help="streamed tokens per second per stream")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each non-streamed answer")
    parser.add_argument("--loading", type=float, default=0.0, help="seconds listening before answering anything")
    parser.add_argument("--name", default="standin", help="in every completion id")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.host, args.port, StandIn(args.model, args.rate, args.latency, args.name), args.loading))


if __name__ == "__main__":
    main()
