"""The gateway's shield and error rewriting, on error bodies LiteLLM really produced.

The inner app here is a stand-in ASGI app (named as such) that answers what a test tells it; the
real proxy behind the shield is exercised in tests/integration/test_gateway_fidelity.py and
test_gateway_hardening.py.
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest
from starlette.middleware.cors import CORSMiddleware

from twllm.gateway import errors
from twllm.gateway.asgi import ClientErrorLogFilter, HttpSettings, Shield, _NoCors, allowed, rewrite_stream_errors

FORBIDDEN = re.compile(r"(?i:litellm|hosted_vllm|traceback|https?://|127\.0\.0\.1)|\b[A-Z]\w*(?:Error|Exception)\b")

# Bodies the LiteLLM proxy (1.108) answered in front of vLLM 0.32 (CPU build), verbatim.
NEG_MAX = {
    "error": {
        "message": 'litellm.BadRequestError: Hosted_vllmException - {"error":{"message":"max_tokens '
        'must be at least 1, got -5. (parameter=max_tokens, value=-5)","type":"BadRequestError",'
        '"param":"max_tokens","code":400}}\n\nLiteLLM: model group \'chat\' failed with the '
        "error above. Received Model Group=chat\nAvailable Model Group Fallbacks=None",
        "type": None,
        "param": None,
        "code": "400",
    }
}
CONTEXT = {
    "error": {
        "message": "litellm.ContextWindowExceededError: litellm.BadRequestError: ContextWindowExceededError: "
        'Hosted_vllmException - {"error":{"message":"This model\'s maximum context length is '
        "1024 tokens. However, your prompt contains at least 1025 input tokens. "
        '(parameter=input_tokens, value=1025)","type":"BadRequestError","param":"input_tokens",'
        '"code":400}}',
        "type": None,
        "param": None,
        "code": "400",
    }
}
UNKNOWN = {
    "error": {
        "message": "/chat/completions: Invalid model name passed in model=nope. Call `/v1/models` to view "
        "available models for your key.",
        "type": "invalid_request_error",
        "param": None,
        "code": "400",
    }
}
CONNECT = {
    "error": {
        "message": "litellm.APIConnectionError: Hosted_vllmException - Cannot connect to host "
        "127.0.0.1:44169 ssl:<ssl.SSLContext object at 0x7f0a2c1b5e40> [Connect call failed "
        "('127.0.0.1', 44169)]. Received Model Group=chat",
        "type": None,
        "param": None,
        "code": "500",
    }
}
NO_DEPLOYMENT = {
    "error": {
        "message": "No deployments available for selected model, Try again in 60 seconds. Passed "
        "model=chat. pre-call-checks=False, cooldown_list=[('chat-0', {...})]",
        "type": "None",
        "param": "None",
        "code": "429",
    }
}
CUT = {
    "error": {
        "message": "litellm.APIConnectionError: APIConnectionError: Hosted_vllmException - Response payload "
        "is not completed: <TransferEncodingError: 400, message='Not enough data to satisfy "
        "transfer length header.'>",
        "type": None,
        "param": None,
        "code": "500",
    }
}
OURS = {
    "error": {
        "message": "Rate limit reached: 60 requests per minute.",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
}


@pytest.mark.parametrize(
    "status, body, want_status, want_code",
    [
        (400, NEG_MAX, 400, None),
        (400, CONTEXT, 400, "context_length_exceeded"),
        (400, UNKNOWN, 404, "model_not_found"),
        (500, CONNECT, 503, "engine_unavailable"),
        (429, NO_DEPLOYMENT, 503, "engine_unavailable"),
        (500, CUT, 503, "engine_unavailable"),
        (429, OURS, 429, "rate_limit_exceeded"),
        (422, {"detail": [{"loc": ["body", "messages"], "msg": "Field required", "type": "missing"}]}, 422, None),
        (500, b"Internal Server Error", 500, None),
    ],
)
def test_public_error_shapes(status, body, want_status, want_code) -> None:
    error = errors.public_error(status, json.dumps(body).encode() if isinstance(body, dict) else body)
    assert (error.status, error.code) == (want_status, want_code)
    data = error.body()["error"]
    assert set(data) == {"message", "type", "param", "code"} and data["message"]
    assert not FORBIDDEN.search(json.dumps(data)), data
    if want_status == 503:
        assert error.headers["Retry-After"].isdigit() and error.type == "server_error"


def test_the_engines_own_message_survives() -> None:
    error = errors.public_error(400, json.dumps(NEG_MAX).encode())
    assert error.message == "max_tokens must be at least 1, got -5. (parameter=max_tokens, value=-5)"
    assert error.param == "max_tokens" and error.type == "invalid_request_error"
    context = errors.public_error(400, json.dumps(CONTEXT).encode())
    assert context.message.startswith("This model's maximum context length is 1024 tokens.")


def test_our_own_refusals_pass_as_they_are() -> None:
    error = errors.public_error(429, json.dumps(OURS).encode())
    assert error.body() == {"error": {**OURS["error"]}}


def test_routes() -> None:
    assert allowed("POST", "/v1/chat/completions") is True
    assert allowed("POST", "/chat/completions") is True
    assert allowed("GET", "/v1/models/chat") is True
    assert allowed("GET", "/v1/chat/completions") is False
    assert allowed("POST", "/v1/responses") is True and allowed("GET", "/v1/responses") is False
    for path in (
        "/ui",
        "/key/generate",
        "/spend/logs",
        "/docs",
        "/openapi.json",
        "/vllm/v1/models",
        "/metrics",
        "/v1/responses/resp_1",
        "/health",
        "/",
    ):
        assert allowed("GET", path) is None and allowed("POST", path) is None


# --- the shield around a stand-in app --------------------------------------------------------


class StandIn:
    """A stand-in for the proxy app: answers ``status``/``body``/``headers``; counts calls."""

    def __init__(
        self,
        status: int = 200,
        body: bytes = b'{"ok": true}',
        headers=(),
        content_type=b"application/json",
        chunks: list[bytes] | None = None,
    ) -> None:
        self.status, self.body, self.headers, self.content_type, self.chunks = (
            status,
            body,
            headers,
            content_type,
            chunks,
        )
        self.calls = 0
        self.received = b""

    async def __call__(self, scope, receive, send) -> None:
        self.calls += 1
        while True:
            message = await receive()
            self.received += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(b"content-type", self.content_type), *self.headers]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        for piece in self.chunks or [self.body]:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def run(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_unknown_and_management_routes_are_404_without_reaching_the_proxy() -> None:
    inner = StandIn()
    shield = Shield(inner, HttpSettings())
    for path in ("/ui/", "/key/generate", "/spend/logs", "/team/new"):
        response = run(shield, "POST", path, json={})
        assert response.status_code == 404
        assert "twllm keys" in response.json()["error"]["message"]
    response = run(shield, "GET", "/docs")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert run(shield, "GET", "/v1/chat/completions").status_code == 405
    assert inner.calls == 0


def test_a_body_over_the_limit_is_413_before_the_proxy_reads_it() -> None:
    inner = StandIn()
    shield = Shield(inner, HttpSettings(max_request_bytes=1000))
    response = run(shield, "POST", "/v1/chat/completions", content=b"x" * 1001)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    async def chunked():  # no Content-Length: counted as it arrives
        for _ in range(5):
            yield b"y" * 300

    response = run(shield, "POST", "/v1/embeddings", content=chunked())
    assert response.status_code == 413
    assert inner.calls == 0
    at_limit = b'{"input": "' + b"z" * 985 + b'"}'  # 1000 bytes: within the limit
    response = run(shield, "POST", "/v1/embeddings", content=at_limit)
    assert response.status_code == 200 and inner.received == at_limit


def test_error_bodies_and_internal_headers_are_rewritten() -> None:
    inner = StandIn(
        status=500,
        body=json.dumps(CONNECT).encode(),
        headers=[
            (b"x-litellm-model-api-base", b"http://127.0.0.1:8100/v1"),
            (b"llm_provider-x-request-id", b"abc"),
            (b"access-control-allow-origin", b"*"),
        ],
    )
    response = run(Shield(inner, HttpSettings()), "POST", "/v1/chat/completions", json={})
    assert response.status_code == 503 and response.headers["retry-after"] == str(errors.RETRY_AFTER_S)
    assert int(response.headers["content-length"]) == len(response.content)
    assert not any(k.startswith(("x-litellm", "llm_provider", "access-control")) for k in response.headers)
    assert not FORBIDDEN.search(response.text)


def test_stream_error_events_are_rewritten_and_text_passes() -> None:
    event = (
        b'data: {"error": {"message": "litellm.APIConnectionError: Hosted_vllmException - Server disconnected", '
        b'"type": null, "param": null, "code": "500"}}\n\n'
    )
    text = b'data: {"choices": [{"delta": {"content": "the \\"error\\" word"}}]}\n\n'
    assert rewrite_stream_errors(text) == text
    out = rewrite_stream_errors(event)
    data = json.loads(out.split(b"data: ", 1)[1])
    assert data["error"]["code"] == "engine_unavailable" and not FORBIDDEN.search(out.decode())
    inner = StandIn(content_type=b"text/event-stream", chunks=[text, event, b"data: [DONE]\n\n"])
    response = run(Shield(inner, HttpSettings()), "POST", "/v1/chat/completions", json={})
    assert "engine_unavailable" in response.text and "Hosted_vllm" not in response.text


def test_cors_only_for_configured_origins() -> None:
    preflight = {"Origin": "https://app.example.tw", "Access-Control-Request-Method": "POST"}
    closed = _NoCors(Shield(StandIn(), HttpSettings()))
    assert run(closed, "OPTIONS", "/v1/chat/completions", headers=preflight).status_code == 403
    response = run(closed, "POST", "/v1/chat/completions", json={}, headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in response.headers
    inner = StandIn(headers=[(b"access-control-allow-origin", b"*")])
    opened = CORSMiddleware(
        Shield(inner, HttpSettings()),
        allow_origins=["https://app.example.tw"],
        allow_methods=["GET", "POST"],
        allow_headers=["*"],
    )
    ok = run(opened, "OPTIONS", "/v1/chat/completions", headers=preflight)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example.tw"
    other = run(opened, "POST", "/v1/chat/completions", json={}, headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_litellms_client_error_log_lines_are_dropped() -> None:
    import logging

    class Refusal(Exception):
        status_code = 400

    record = logging.LogRecord(
        "LiteLLM Proxy",
        logging.ERROR,
        __file__,
        1,
        "litellm.proxy.proxy_server._handle_llm_api_exception(): Exception occured - litellm_call_id=%s - %s",
        ("id", Refusal("bad")),
        None,
    )
    assert ClientErrorLogFilter().filter(record) is False

    class Down(Exception):
        status_code = 500

    record.args = ("id", Down("Cannot connect to host 127.0.0.1:1"))
    assert ClientErrorLogFilter().filter(record) is True and record.levelno == logging.WARNING
    assert "127.0.0.1" not in record.getMessage()


# --- the spec's gateway fields, through plan, render and launch -----------------------------------


def test_spec_fields_reach_the_shield_and_the_command(tmp_path) -> None:
    from pathlib import Path

    from twllm.errors import SpecError
    from twllm.plan.build import ENGINE_KEY_ENV, make_plan
    from twllm.plan.placement import GpuInventory
    from twllm.render.litellm_config import gateway_settings, litellm_config
    from twllm.runtime.gateway import gateway_launch
    from twllm.spec.resolve import parse_spec

    text = """
name: shielded
gateway:
  master_key: ${TWLLM_MASTER_KEY}
  max_request_bytes: 2048
  tls: {cert: tls/cert.pem, key: tls/key.pem}
  cors_origins: [https://app.example.tw]
models:
  - {name: chat, model: llama-3.2-1b-instruct, replicas: 2}
  - {name: solo, model: llama-3.2-1b-instruct}
"""
    env = {"TWLLM_MASTER_KEY": "sk-test-master"}
    loaded = parse_spec(text, str(tmp_path / "spec.yaml"), env)
    plan = make_plan(loaded, GpuInventory(8, 80, "test"), tmp_path / "state")
    assert plan.gateway.url.startswith("https://")
    assert plan.gateway.tls_cert == str(tmp_path / "tls" / "cert.pem")
    settings = gateway_settings(plan, loaded.spec)
    assert settings.http == HttpSettings(max_request_bytes=2048, cors_origins=("https://app.example.tw",))
    launch = gateway_launch(plan.gateway, Path("/r"), {"TWLLM_MASTER_KEY": "sk-test-master", ENGINE_KEY_ENV: "sk-e"})
    assert launch.argv[1:3] == ["-m", "twllm.gateway.serve"]
    assert launch.argv[launch.argv.index("--ssl-certfile") + 1] == str(tmp_path / "tls" / "cert.pem")
    config = litellm_config(plan, loaded.spec)
    router = config["router_settings"]
    assert router["retry_policy"]["BadRequestErrorRetries"] == 0 and router["enable_pre_call_checks"] is False
    policies = {d["model_name"]: d["model_info"].get("allowed_fails_policy") for d in config["model_list"]}
    assert policies["chat"] == {
        "InternalServerErrorAllowedFails": 0,
        "ServiceUnavailableErrorAllowedFails": 0,
        "BadGatewayErrorAllowedFails": 0,
    }
    assert policies["solo"] is None  # a lone replica is never taken out for one failure
    with pytest.raises(SpecError) as caught:
        parse_spec(text.replace("max_request_bytes: 2048", "max_request_bytes: 10"), "bad.yaml", env)
    assert "bad.yaml:5" in str(caught.value) and "max_request_bytes" in str(caught.value)


# --- bodies LiteLLM fails on (found by tests/integration/test_request_fuzz.py) --------------------


@pytest.mark.parametrize(
    "body, code, says",
    [
        (b"", "invalid_json", "empty"),  # LiteLLM's rerank route: a 500
        (b"[]", "invalid_json", "not an array"),  # its auth reads fields off the body: a 500
        (b"true", "invalid_json", "not a boolean"),
        (b'"x"', "invalid_json", "not a string"),
        (b'{"model": "chat", "input": "\xff"}', "invalid_json", "not valid UTF-8"),  # a traceback
        (b"[" * 100_000 + b"]" * 100_000, "invalid_json", "nests too deep"),  # a traceback
        (b'{"model": "chat", "n": ' + b"9" * 5000 + b"}", "invalid_json", "too long"),  # a traceback
        (b'{"model": "chat", "n": 1e999}', "invalid_json", "1e999 is not a finite number"),  # a 500
        (b'{"model": "chat", "temperature": NaN}', "invalid_json", "NaN is not a finite number"),  # a 500
        (b'{"model": "chat", "messages": [', "invalid_json", "line 1 column 32"),
        (b'{"model": ["chat"]}', "invalid_type", "`model` must be a string"),  # a 500 or a 401
        # LiteLLM's limiter hashes each tag and reads guardrail names: a 500 (the 10,000-case run)
        (b'{"model": "chat", "tags": [{"a": " "}, {}, false]}', "invalid_type", "`tags` must be a list of strings"),
        (b'{"model": "chat", "tags": "x"}', "invalid_type", "`tags` must be a list of strings"),
        (b'{"model": "chat", "guardrails": false}', "invalid_type", "`guardrails` must be a list"),
        (b'{"model": "chat", "guardrails": [{}]}', "invalid_type", "`guardrails` must be a list"),
        (b'{"model": "chat", "messages": false}', "invalid_type", "`messages` must be a list"),  # a 500 (CI's fuzz)
        # LiteLLM's completion() failed on them with a traceback (the 10,000-case fuzz benchmark)
        (
            b'{"model": "chat", "messages": [[1]]}',
            "invalid_type",
            "'messages[0]': expected an object, but got an array",
        ),
        (
            b'{"model": "chat", "messages": ["hi"]}',
            "invalid_type",
            "'messages[0]': expected an object, but got a string",
        ),
        (
            b'{"model": "chat", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": [1]}]}',
            "invalid_type",
            "'messages[1].content[0]': expected an object, but got a number",
        ),
        (b'{"model": "chat", "response_format": [[true], []]}', "invalid_type", "'response_format': expected an obj"),
        (b'{"model": "chat", "stream_options": "yes"}', "invalid_type", "'stream_options': expected an object"),
        (b'{"model": "chat", "user": ["a"]}', "invalid_type", "`user` must be a string"),  # a limiter traceback
        # sent on as the engine's Authorization header: a 500 for a newline, the engine key bypassed
        (b'{"model": "chat", "api_key": "a\\nb"}', "unsupported_parameter", "`api_key` is not allowed"),
        (b'{"model": "chat", "extra_headers": {"x": "y"}}', "unsupported_parameter", "`extra_headers` is not"),
        (b'{"model": "chat", "metadata": {"session_id": [1]}}', "invalid_type", "`metadata.session_id` must be"),
    ],
)
def test_a_body_litellm_cannot_handle_is_400_before_it_is_read(body: bytes, code: str, says: str) -> None:
    inner = StandIn()
    for path in ("/v1/chat/completions", "/v2/rerank", "/score"):
        response = run(Shield(inner, HttpSettings()), "POST", path, content=body)
        error = response.json()["error"]
        assert response.status_code == 400 and error["code"] == code and says in error["message"], error
        assert error["type"] == "invalid_request_error"
    assert inner.calls == 0


def test_a_json_object_passes_as_it_was_sent() -> None:
    inner = StandIn()
    body = '{"model": "chat", "messages": [{"role": "user", "content": "台灣 \\ud83d\\ude00"}], "seed": 1e30}'
    response = run(Shield(inner, HttpSettings()), "POST", "/v1/chat/completions", content=body.encode())
    assert response.status_code == 200 and inner.received == body.encode()


def test_litellms_refusal_of_a_body_field_is_400_not_401() -> None:
    import logging

    said = {
        "error": {
            "message": "Authentication Error, Rejected Request: api_base is not allowed in request body. "
            "Clientside passthrough requires explicit admin opt-in via either "
            "`general_settings.allow_client_side_credentials = true` (proxy-wide) or ... Relevant Issue: "
            "https://huntr.com/bounties/4001e1a2-7b7a-4776-a3ae-e6692ec3d997",
            "type": "auth_error",
            "param": "None",
            "code": "401",
        }
    }
    error = errors.public_error(401, json.dumps(said).encode())
    assert (error.status, error.code, error.param) == (400, "unsupported_parameter", "api_base")
    assert error.message == "`api_base` is not allowed in the request body."
    said["error"]["message"] = "Authentication Error, Rejected Request: model_list is not allowed in the request body."
    assert errors.public_error(401, said).param == "model_list"

    try:
        raise ValueError("Rejected Request: api_base is not allowed in request body. Clientside passthrough ...")
    except ValueError:
        import sys

        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "LiteLLM Proxy",
        logging.ERROR,
        __file__,
        1,
        "litellm.proxy.proxy_server.user_api_key_auth(): Exception occured - %s\nRequester IP Address:%s",
        ("Rejected Request: api_base ...", "127.0.0.1"),
        exc_info,
    )
    assert ClientErrorLogFilter().filter(record) is False  # no traceback for the client's error

    from twllm.accounting.auth import Rejection
    from twllm.accounting.hooks import proxy_exception

    unavailable = Rejection(503, "service_unavailable", "accounts_unavailable", "API keys cannot be checked right now.")
    from twllm.accounting.hooks import TwllmAuthError

    try:
        raise proxy_exception(unavailable)
    except TwllmAuthError:
        import sys

        record.exc_info = sys.exc_info()
    # Our own refusal, a 503 as well: one line from the shield, no traceback from LiteLLM.
    assert ClientErrorLogFilter().filter(record) is False


def test_the_error_log_filter_sees_litellms_exception_through_its_own_filters() -> None:
    """LiteLLM's redaction filter on its proxy logger formats a record and drops its arguments;
    ours runs first, so a client's error is dropped and an engine's failure keeps its words."""
    import logging

    from litellm._logging import verbose_proxy_logger
    from litellm.proxy.common_request_processing import log_llm_api_exception

    from twllm.gateway.asgi import install_log_filter

    seen: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    catch = Catch()
    verbose_proxy_logger.addHandler(catch)
    # LiteLLM's logging setup, imported by an earlier test, may have disabled existing loggers.
    disabled, level = verbose_proxy_logger.disabled, verbose_proxy_logger.level
    verbose_proxy_logger.disabled = False
    verbose_proxy_logger.setLevel(logging.INFO)
    install_log_filter(verbose_proxy_logger)
    install_log_filter(verbose_proxy_logger)  # once per worker, however often it is called
    try:
        assert sum(isinstance(f, ClientErrorLogFilter) for f in verbose_proxy_logger.filters) == 1

        class Refusal(Exception):
            status_code = 400

        class Down(Exception):
            status_code = 429

        log_llm_api_exception(Refusal("the client's mistake"), "call-1")
        log_llm_api_exception(Down("No deployments available for selected model, Try again in 30 seconds"), "call-2")
    finally:
        verbose_proxy_logger.removeHandler(catch)
        verbose_proxy_logger.disabled, _ = disabled, verbose_proxy_logger.setLevel(level)
    assert [r.levelno for r in seen] == [logging.WARNING], [r.getMessage() for r in seen]
    message = seen[0].getMessage()
    assert "Down" in message and "No deployments available" in message, message
