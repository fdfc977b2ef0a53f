"""twllm's own forwarding of the hot routes to vLLM engines, off LiteLLM's request path.

LiteLLM's proxy spends ~9 ms of CPU on a request that parsing, one key lookup and forwarding do
in a fraction of that (``benchmarks/gateway_cpu.py``: its router, logging object, success
handlers, cost map and a pydantic object per streamed chunk). For the requests that need none of
its features, the shield hands the request here instead:

- the route is chat completions, completions or embeddings, and the body a JSON object whose
  fields are all OpenAI's (``PARAMS``: anything else, LiteLLM's own fields included, goes to
  LiteLLM, which knows what to do with it);
- the model (or an alias of it) is served only by vLLM engines that twllm rendered
  (``hosted_vllm/…`` with an ``api_base`` and nothing else LiteLLM would act on: no mock
  answers, no per-model rate limits), has no fallbacks, and no Safety Guard runs in the gateway;
- the caller sends a tenant key (``Authorization: Bearer``); the master key goes to LiteLLM.

What a request gets here is what it gets through LiteLLM, done directly: the key, model
allow-list, rate limit and budget checks of ``twllm.accounting.auth`` (through ``Accounts``,
registered by the accounting hooks), least-busy routing among the replicas that answer their
health probe (``readiness``, taking turns among ties), retries on another replica when one
cannot answer (``num_retries``; a refused request is never retried), the engine's errors in
OpenAI's shape (``errors.public_error``), one ledger row per request queued before the answer
ends (so Prometheus, budgets and the journal see it as they see LiteLLM's), and streams relayed
as the engine sends them, event for event. The stream asks the engine for its usage
(``stream_options.include_usage``) for the ledger, and hands the usage event on only to a
client that asked for it. A stream the engine ends without ``[DONE]`` (its process died) ends
with an ``engine_unavailable`` error event and a 503 row, as on LiteLLM's path.

LiteLLM's own Prometheus series (``litellm_*``) count only the requests LiteLLM serves; twllm's
series (``twllm_*``, the dashboard's) count every request. ``gateway.fast_path: false`` in the
spec sends every request through LiteLLM.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from twllm.gateway import errors, readiness

log = logging.getLogger("twllm.gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("chat", re.compile(r"/(?:v1/)?chat/completions/?")),
    ("completions", re.compile(r"/(?:v1/)?completions/?")),
    ("embeddings", re.compile(r"/(?:v1/)?embeddings/?")),
)
ENGINE_PATH = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}
MODE = {"chat": "chat", "completions": "chat", "embeddings": "embedding"}
_COMMON = frozenset({"model", "user"})
_GENERATION = frozenset(
    {
        "stream",
        "stream_options",
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
    }
)
PARAMS: Mapping[str, frozenset[str]] = {
    "chat": _COMMON
    | _GENERATION
    | {
        "messages",
        "max_completion_tokens",
        "top_logprobs",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
    },
    "completions": _COMMON | _GENERATION | {"prompt", "echo", "suffix", "best_of"},
    "embeddings": _COMMON | {"input", "encoding_format", "dimensions"},
}
"""OpenAI's fields of each route, which vLLM reads as OpenAI does. A body with any other field
(LiteLLM's ``fallbacks``, ``metadata``, ``mock_response``…, or vLLM's own extensions) goes to
LiteLLM."""
FORWARDED_PARAMS = frozenset({"model", "api_base", "timeout", "api_key"})
"""The ``litellm_params`` of a deployment served here; any other (a mock answer, rpm/tpm) makes
its model LiteLLM's."""
SECURITY_HEADERS = (
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
)
"""What LiteLLM's security-header middleware adds to every answer it gives."""
STREAM_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
DONE = b"data: [DONE]"
EVENT_END = b"\n\n"
CONNECT_TIMEOUT_S = 10.0
ERROR_CLASS = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    408: "Timeout",
    413: "BadRequestError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "Timeout",
}
"""The ledger's ``error_class`` of an engine's answer, in the words LiteLLM's rows use."""
CLIENT_GONE_STATUS = 499
"""A stream whose client went away before its end (the ledger keeps the tokens sent so far)."""


# --- what the accounting provides ----------------------------------------------------------------


@dataclass(frozen=True)
class Admission:
    """A tenant key's request, admitted: who pays, and the budget hold to release with its row."""

    tenant_id: int
    key_id: int
    tenant: str
    hold: str | None = None


@dataclass(frozen=True)
class Outcome:
    """One request's end, for its ledger row."""

    admission: Admission
    request_id: str
    started: float
    """When the request arrived (epoch seconds)."""
    requested_model: str
    model: str
    """The model (not an alias) that served it."""
    deployment: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_ms: int
    ttft_ms: int | None
    status: int
    error_class: str | None
    stream: bool


class Refused(Exception):
    """The accounting refused the request: ``error`` is the answer."""

    def __init__(self, error: errors.PublicError) -> None:
        super().__init__(error.message)
        self.error = error


class Accounts(Protocol):
    async def admit(self, api_key: str, route: str, model: str) -> Admission | None:
        """The admitted request, None when the key is not a tenant key (LiteLLM serves it), or
        ``Refused``."""
        ...

    def settle(self, outcome: Outcome) -> None:
        """Queue the request's ledger row (before its answer ends)."""
        ...


_accounts: Accounts | None = None


def register(accounts: Accounts) -> None:
    """Called by the accounting hooks when LiteLLM loads them: the fast path needs them."""
    global _accounts
    _accounts = accounts


# --- the table of models served here -------------------------------------------------------------


@dataclass(frozen=True)
class Replica:
    id: str
    url: str
    """The engine's OpenAI base URL (``…/v1``), without a trailing slash."""
    served: str
    """The model's name on the engine."""
    api_key: str | None
    timeout_s: float
    deployment: dict[str, Any]
    """The config's entry, as ``readiness`` reads it."""


@dataclass
class Group:
    name: str
    mode: str
    replicas: list[Replica]
    turns: itertools.count = field(default_factory=itertools.count)


@dataclass(frozen=True)
class Table:
    """The models this worker forwards itself, by every name a client may use."""

    groups: Mapping[str, Group]
    """Model name -> its group (aliases resolved to the same group)."""
    num_retries: int = 0

    def __bool__(self) -> bool:
        return bool(self.groups)


def load_table(config: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Table:
    """The models of a rendered LiteLLM config that the fast path may serve (see the module
    docstring); an empty table when a guardrail runs."""
    env = os.environ if env is None else env
    router = config.get("router_settings") or {}
    retries = int(router.get("num_retries") or 0)
    if config.get("guardrails"):
        return Table({}, retries)
    excluded: set[str] = set()
    for kind in ("fallbacks", "context_window_fallbacks"):
        for entry in router.get(kind) or ():
            excluded.update(entry)
    entries: dict[str, list[Mapping[str, Any]]] = {}
    for entry in config.get("model_list") or ():
        entries.setdefault(str(entry.get("model_name")), []).append(entry)
    groups: dict[str, Group] = {}
    for name, deployments in entries.items():
        if name in excluded:
            continue
        group = _group(name, deployments, env)
        if group is not None:
            groups[name] = group
    aliases = router.get("model_group_alias") or {}
    for alias, target in aliases.items():
        target_name = target.get("model") if isinstance(target, Mapping) else target
        if alias in excluded or alias in groups or target_name not in groups:
            continue
        groups[alias] = groups[target_name]
    return Table(groups, retries)


def _group(name: str, deployments: list[Mapping[str, Any]], env: Mapping[str, str]) -> Group | None:
    replicas = []
    modes = set()
    for entry in deployments:
        params = entry.get("litellm_params") or {}
        info = entry.get("model_info") or {}
        model = params.get("model")
        base = params.get("api_base")
        if (
            not set(params) <= FORWARDED_PARAMS
            or not isinstance(model, str)
            or not model.startswith("hosted_vllm/")
            or not isinstance(base, str)
            or not isinstance(info.get("id"), str)
        ):
            return None
        key = params.get("api_key")
        if isinstance(key, str) and key.startswith("os.environ/"):
            key = env.get(key.removeprefix("os.environ/"))
        modes.add(info.get("mode") or "chat")
        replicas.append(
            Replica(
                id=info["id"],
                url=base.rstrip("/"),
                served=model.removeprefix("hosted_vllm/"),
                api_key=key if isinstance(key, str) and key else None,
                timeout_s=float(params.get("timeout") or 600.0),
                deployment=dict(entry),
            )
        )
    if len(modes) != 1 or not replicas:
        return None
    return Group(name, modes.pop(), replicas)


def load_table_from_env() -> Table:
    """The table of the config the proxy reads (``CONFIG_FILE_PATH``, set by ``serve``)."""
    import yaml

    path = os.environ.get("CONFIG_FILE_PATH")
    if not path:
        return Table({})
    with open(path, encoding="utf-8") as file:
        return load_table(yaml.safe_load(file) or {})


# --- serving ------------------------------------------------------------------------------------


def kind_of(path: str) -> str | None:
    for kind, pattern in KINDS:
        if pattern.fullmatch(path):
            return kind
    return None


def bearer(scope: Scope) -> str | None:
    """The key of an ``Authorization: Bearer`` header (None: LiteLLM reads the other forms)."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"authorization":
            text = value.decode("latin-1").strip()
            scheme, _, key = text.partition(" ")
            return key.strip() or None if scheme.lower() == "bearer" else None
    return None


@dataclass
class _Attempt:
    """What the last failed attempt said, for the answer if no replica serves."""

    status: int = 503
    raw: bytes | None = None
    error_class: str = "APIConnectionError"
    timeout: bool = False

    def public(self) -> errors.PublicError:
        if self.timeout:
            return errors.make(504, code="engine_timeout")
        if self.raw is None:
            return errors.unavailable()
        return errors.public_error(self.status, self.raw)


class Forwarder:
    """One worker's fast path: the table, a connection pool to the engines, requests in flight."""

    def __init__(self, table: Table, readiness_: readiness.Readiness | None = None) -> None:
        self.table = table
        self.readiness = readiness_ or readiness.READINESS
        self.in_flight: dict[str, int] = {}
        self.fingerprints: dict[str, str] = {}
        """Replica id -> its engine's ``system_fingerprint``, from its last usage event."""
        self._session: Any = None

    def session(self) -> Any:
        import aiohttp

        if self._session is None or self._session.closed:
            # The engines keep idle connections 75 s (twllm.plan: VLLM_HTTP_TIMEOUT_KEEP_ALIVE);
            # 15 s here, so a connection is never reused while the engine closes it.
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=15.0, enable_cleanup_closed=True)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False, trust_env=False)
        return self._session

    async def close(self) -> None:
        """Close the connections to the engines (the worker is stopping)."""
        if self._session is not None and not self._session.closed:
            await self._session.close()

    async def serve(self, path: str, scope: Scope, body: bytes, receive: Receive, send: Send) -> bool:
        """Serve the request and return True, or return False having done nothing (LiteLLM then
        serves it)."""
        accounts = _accounts
        kind = kind_of(path)
        if accounts is None or kind is None or not self.table:
            return False
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(data, dict) or not set(data) <= PARAMS[kind]:
            return False
        requested = data.get("model")
        group = self.table.groups.get(requested) if isinstance(requested, str) else None
        if group is None or group.mode != MODE[kind]:
            return False
        stream = data.get("stream", False)
        options = data.get("stream_options")
        if not isinstance(stream, bool | None) or (kind == "embeddings" and "stream" in data):
            return False
        if options is not None and not (isinstance(options, dict) and stream is True):
            return False
        api_key = bearer(scope)
        if api_key is None:
            return False
        assert isinstance(requested, str)
        started = time.time()
        try:
            admission = await accounts.admit(api_key, path, requested)
        except Refused as refused:
            await send_error(send, refused.error, path)
            return True
        if admission is None:
            return False
        wants_usage = bool(options and options.get("include_usage") is True)
        if stream is True and not wants_usage:
            data["stream_options"] = {**(options or {}), "include_usage": True}
        request = _Request(self, accounts, admission, group, kind, requested, data, stream is True, wants_usage)
        request.path = path
        await request.run(started, receive, send)
        return True

    def failed(self, replica: Replica, detail: str) -> None:
        """A failure of the replica's own: a probed replica is out until its probe answers (a
        replica without a probe, a model's only one, stays in: nothing would bring it back)."""
        if self.readiness.watches(replica.id):
            self.readiness.record(replica.id, readiness.FAILED, detail)

    def pick(self, group: Group, tried: set[str]) -> Replica:
        """The least busy replica among those ``readiness`` offers (those that answer their probe,
        all of them when none does), one not tried yet for this request when there is one,
        taking turns among ties."""
        offered = {d["model_info"]["id"] for d in self.readiness.offer([r.deployment for r in group.replicas])}
        ready = [r for r in group.replicas if r.id in offered]
        # each tried: LiteLLM's retries, too, go to a model's only replica again
        candidates = [r for r in ready if r.id not in tried] or ready
        least = min(self.in_flight.get(r.id, 0) for r in candidates)
        tied = [r for r in candidates if self.in_flight.get(r.id, 0) == least]
        return tied[next(group.turns) % len(tied)]


class _Request:
    """One request on the fast path, from the first attempt to its ledger row."""

    def __init__(
        self,
        forwarder: Forwarder,
        accounts: Accounts,
        admission: Admission,
        group: Group,
        kind: str,
        requested: str,
        data: dict[str, Any],
        stream: bool,
        wants_usage: bool,
    ) -> None:
        self.fw = forwarder
        self.accounts = accounts
        self.admission = admission
        self.group = group
        self.kind = kind
        self.requested = requested
        self.data = data
        self.stream = stream
        self.wants_usage = wants_usage
        self.request_id = str(uuid.uuid4())
        self.path = ""  # the request's path, for the log
        self.started = 0.0
        self.first_at: float | None = None

    async def run(self, started: float, receive: Receive, send: Send) -> None:
        import aiohttp

        self.started = started
        tried: set[str] = set()
        last = _Attempt()
        replica = None
        for _ in range(1 + self.fw.table.num_retries):
            replica = self.fw.pick(self.group, tried)
            tried.add(replica.id)
            self.data["model"] = replica.served
            self.fw.in_flight[replica.id] = self.fw.in_flight.get(replica.id, 0) + 1
            try:
                response = await self._post(replica)
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.fw.in_flight[replica.id] -= 1
                last = _Attempt(timeout=isinstance(exc, TimeoutError), error_class=_failure_class(exc))
                self.fw.failed(replica, type(exc).__name__)
                continue
            finished = False
            try:
                status = response.status
                if status >= 400:
                    raw = await response.read()
                    if readiness.replica_fault(status):
                        self.fw.failed(replica, f"HTTP {status}")
                        last = _Attempt(status, raw, ERROR_CLASS.get(status, "APIError"))
                        continue
                    error = errors.public_error(status, raw)
                    self._settle(replica, error.status, ERROR_CLASS.get(status, "APIError"))
                    await send_error(send, error, self.path)
                    return
                if self.stream:
                    finished = await self._relay(replica, response, receive, send)
                    return
                try:
                    raw = await response.read()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    last = _Attempt(timeout=isinstance(exc, TimeoutError), error_class=_failure_class(exc))
                    self.fw.failed(replica, type(exc).__name__)
                    continue
                finished = True
                prompt, completion = _usage(raw)
                self._settle(replica, 200, None, prompt, completion)
                headers = [(b"content-type", response.headers.get("content-type", "application/json").encode())]
                await _answer(send, 200, headers, raw)
                return
            finally:
                self.fw.in_flight[replica.id] -= 1
                if finished or response.status >= 400:
                    response.release()  # read to its end: the connection serves the next request
                else:
                    response.close()  # cut short: closing it tells vLLM to stop generating
        error = last.public()
        self._settle(replica, error.status, last.error_class)
        await send_error(send, error, self.path)

    async def _post(self, replica: Replica) -> Any:
        import aiohttp

        headers = {"content-type": "application/json"}
        if replica.api_key:
            headers["authorization"] = f"Bearer {replica.api_key}"
        timeout = aiohttp.ClientTimeout(
            total=None if self.stream else replica.timeout_s,
            connect=min(CONNECT_TIMEOUT_S, replica.timeout_s),
            sock_read=replica.timeout_s,
        )
        return await self.fw.session().post(
            replica.url + ENGINE_PATH[self.kind], data=orjson.dumps(self.data), headers=headers, timeout=timeout
        )

    async def _relay(self, replica: Replica, response: Any, receive: Receive, send: Send) -> bool:
        """The engine's stream, event for event; the row is queued before the client's last event.
        Whether the engine's stream was read to its end."""
        import aiohttp

        gone = asyncio.ensure_future(_disconnect(receive))
        buffer = b""
        done = False
        prompt = completion = 0
        events = 0
        held: list[bytes] = []
        await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS + list(SECURITY_HEADERS)})
        try:
            async for piece in response.content.iter_any():
                buffer += piece
                if EVENT_END not in buffer:
                    continue
                *complete, buffer = buffer.split(EVENT_END)
                out = []
                for event in complete:
                    if event.startswith(DONE):
                        done = True
                        continue
                    if self.first_at is None:
                        self.first_at = time.time()
                    final = _usage_event(event) if b'"usage"' in event else None
                    if final is not None:
                        prompt, completion = (
                            _count(final["usage"].get("prompt_tokens")),
                            _count(final["usage"].get("completion_tokens")),
                        )
                        fingerprint = final.get("system_fingerprint")
                        if isinstance(fingerprint, str):
                            self.fw.fingerprints[replica.id] = fingerprint
                        if not self.wants_usage:  # the engine's stream without it, as the client asked
                            out += [_stamp(e, fingerprint) for e in held]
                            held = []
                            continue
                    elif event.startswith(b"data: {"):
                        events += 1
                        if not self.wants_usage and b'"finish_reason":"' in event:
                            # without include_usage vLLM stamps its fingerprint on each choice's
                            # last event, not on the usage event: so here too (once it is known)
                            known = self.fw.fingerprints.get(replica.id)
                            if known is None:
                                held.append(event)
                                continue
                            event = _stamp(event, known)
                    if held:  # in the engine's order, after what waits for the fingerprint
                        held.append(event)
                        continue
                    out.append(event)
                if out:
                    await send(
                        {"type": "http.response.body", "body": EVENT_END.join(out) + EVENT_END, "more_body": True}
                    )
                if gone.done():
                    break
        except (aiohttp.ClientError, TimeoutError):
            pass  # the engine went away: the stream is cut (below)
        finally:
            if not gone.done():
                gone.cancel()
        last = b"".join(e + EVENT_END for e in held)  # (when no usage event came)
        if done:
            self._settle(replica, 200, None, prompt, completion)
            await send({"type": "http.response.body", "body": last + DONE + EVENT_END, "more_body": False})
            return True
        if gone.done() and not gone.cancelled():
            # The client left: its tokens so far are spent (vLLM stops when the connection closes).
            self._settle(replica, CLIENT_GONE_STATUS, "ClientDisconnected", prompt, completion or events)
            return False
        self.fw.failed(replica, "stream cut")
        self._settle(replica, 503, "EngineStreamCut", prompt, completion or events)
        cut = errors.unavailable()
        await send(
            {"type": "http.response.body", "body": last + b"data: " + cut.encoded() + EVENT_END, "more_body": False}
        )
        return False

    def _settle(
        self,
        replica: Replica | None,
        status: int,
        error_class: str | None,
        prompt: int = 0,
        completion: int = 0,
    ) -> None:
        now = time.time()
        try:
            self.accounts.settle(
                Outcome(
                    admission=self.admission,
                    request_id=self.request_id,
                    started=self.started,
                    requested_model=self.requested,
                    model=self.group.name,
                    deployment=replica.id if replica is not None else None,
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    latency_ms=max(0, round((now - self.started) * 1000)),
                    ttft_ms=(
                        max(0, round((self.first_at - self.started) * 1000))
                        if self.stream and self.first_at is not None and status == 200
                        else None
                    ),
                    status=status,
                    error_class=error_class,
                    stream=self.stream,
                )
            )
        except Exception:  # a ledger bug must not change the answer; it is logged loudly
            log.exception("twllm gateway: could not record request %s", self.request_id)


async def _disconnect(receive: Receive) -> None:
    """Returns when the client has gone."""
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return


def _usage(raw: bytes) -> tuple[int, int]:
    """(prompt, completion) tokens of an engine's answer or usage event (0, 0 when it has none)."""
    try:
        usage = orjson.loads(raw).get("usage") or {}
    except (orjson.JSONDecodeError, AttributeError):
        return 0, 0
    if not isinstance(usage, dict):
        return 0, 0
    return _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))


def _usage_event(event: bytes) -> dict[str, Any] | None:
    """A stream's usage event (no choices, a ``usage`` object), parsed; else None."""
    try:
        data = orjson.loads(event.removeprefix(b"data:"))
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or data.get("choices") or not isinstance(data.get("usage"), dict):
        return None
    return data


def _stamp(event: bytes, fingerprint: object) -> bytes:
    """A choice's last event with the engine's ``system_fingerprint`` last, as vLLM writes it."""
    if not isinstance(fingerprint, str) or b'"finish_reason":"' not in event or b'"system_fingerprint"' in event:
        return event
    if not event.endswith(b"}"):
        return event
    return event[:-1] + b',"system_fingerprint":' + orjson.dumps(fingerprint) + b"}"


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _failure_class(exc: BaseException) -> str:
    return "Timeout" if isinstance(exc, TimeoutError) else "APIConnectionError"


async def _answer(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    headers = headers + [(b"content-length", str(len(body)).encode())] + list(SECURITY_HEADERS)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: errors.PublicError, path: str) -> None:
    """An error answer, logged in one line as the shield logs LiteLLM's (status and code only)."""
    log.log(
        logging.WARNING if error.status >= 500 else logging.INFO,
        "twllm gateway: POST %s -> %d %s",
        path,
        error.status,
        error.code or error.type,
    )
    headers = [(b"content-type", b"application/json")]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await _answer(send, error.status, headers, error.encoded())
