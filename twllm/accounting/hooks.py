"""The accounting hooks LiteLLM loads inside the gateway: ``custom_auth`` and the spend logger.

The rendered LiteLLM config names them (``twllm.render.litellm_config.litellm_config``)::

    general_settings.custom_auth: twllm.accounting.hooks.user_api_key_auth
    litellm_settings.callbacks:   [twllm.accounting.hooks.spend_logger]

Each gateway worker process gets its own ``Runtime`` (pool, key cache, limit counters, ledger
writer), made on first use in that process, so forked workers never share a connection. The
checks themselves live in ``auth.py`` and ``limits.py``; the ledger in ``ledger.py`` and
``spool.py``; this module only translates between them and LiteLLM.

What reaches the ledger: one row per request the gateway answered that can be attributed to the
master key or to a tenant key — successes and failures, streams included, and requests this
auth refused for a known key (403, 429, a revoked or expired key's 401). Requests with no key or
an unknown key are not anyone's spend and are not written (a flood of them must not fill the
ledger); they are counted in ``Runtime.unattributed``. LiteLLM reports refusals to the logger as
failure events without our metadata; they are attributed by the key's hash (LiteLLM's
``user_api_key_hash`` is the sha256 of the key, as ours) through the key cache.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from litellm.integrations.custom_logger import CustomLogger
from litellm.proxy._types import LitellmUserRoles, ProxyException, UserAPIKeyAuth

from twllm.accounting.auth import Authenticator, Identity, Rejection
from twllm.accounting.gateway_config import Database, GatewayConfig
from twllm.accounting.keys import hash_key
from twllm.accounting.ledger import LedgerRow, LedgerWriter, replay_folder, row_from_logging
from twllm.accounting.names import ModelNames
from twllm.accounting.outcomes import FailureHold
from twllm.accounting.spool import Spool
from twllm.gateway import errors, forward, journal, metrics, responses, startup, streams
from twllm.gateway.streams import EngineStreamCut, faithful
from twllm.settings import DATABASE_URL_ENV, GATEWAY_SETTINGS_ENV

log = logging.getLogger(__name__)

SEEN_CALL_IDS = 100_000
"""Call ids a worker remembers so that a request LiteLLM reports twice is written once."""


class TwllmAuthError(ProxyException):
    """A refusal as LiteLLM answers it: ``code`` is the HTTP status, the body's ``code`` ours."""

    def to_dict(self) -> dict:
        data = super().to_dict()
        data["code"] = self.openai_code
        return data


def proxy_exception(rejection: Rejection) -> TwllmAuthError:
    return TwllmAuthError(
        message=rejection.message,
        type=rejection.type,
        param=rejection.param,
        code=rejection.status,
        headers=dict(rejection.headers),
        openai_code=rejection.code,
    )


@dataclasses.dataclass(frozen=True)
class PreparedRow:
    """A ledger row ready to queue, with what the worker's own bookkeeping needs."""

    call_id: str
    row: LedgerRow
    key_id: int | None
    tenant: str
    """The tenant's name, for Prometheus ('' for the master key)."""


class Runtime:
    """Everything the hooks hold in one worker process."""

    def __init__(self, config: GatewayConfig) -> None:
        self.pid = os.getpid()
        self.config = config
        self.db = Database(config.database_url)
        self.spool = Spool(config.spool_dir, self.pid)
        self.auth = Authenticator(self.db, config.master_key, names=config.names, free=config.is_free)
        self.writer = LedgerWriter(
            self.db, self.spool, on_insert=self.auth.limiter.add_tokens, on_stored=self.auth.budgets.note_stored
        )
        self.master_hash = hashlib.sha256(config.master_key.encode("utf-8")).hexdigest() if config.master_key else None
        self.unattributed = 0
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.failures: FailureHold[PreparedRow] = FailureHold()
        """Failure events waiting to be told apart: a failed attempt, or the request's outcome."""
        self._started = False
        self._warned_no_db = False
        atexit.register(self.at_exit)

    def start(self) -> None:
        """Start the ledger writer on the running loop (the first request of the worker)."""
        if not self._started and self.db.url is not None:
            self._started = True
            try:
                self.spool.open()
            except OSError:
                log.exception("twllm accounting: cannot use the spool folder %s", self.spool.folder)
            self.writer.start()

    def record(self, kwargs: Mapping[str, Any], *, success: bool, guard: Mapping[str, Any] | None = None) -> None:
        """Queue the ledger row of one success or failure event (with the guard's verdicts)."""
        prepared = self.prepare(kwargs, success=success, guard=guard)
        if prepared is not None:
            self.commit(prepared)

    def prepare(
        self, kwargs: Mapping[str, Any], *, success: bool, guard: Mapping[str, Any] | None = None
    ) -> PreparedRow | None:
        """The ledger row of one event, not yet queued; None when the event writes none (its call
        was recorded already, the ledger is off, or the request is no one's)."""
        slo = kwargs.get("standard_logging_object") or {}
        call_id = str(kwargs.get("litellm_call_id") or slo.get("litellm_call_id") or "")
        if call_id and call_id in self._seen:
            return None
        if self.db.url is None:
            self._mark_seen(call_id)
            journal.settle(call_id)
            if not self._warned_no_db:
                self._warned_no_db = True
                log.warning("twllm spend logger: no database URL (%s); the ledger is off", DATABASE_URL_ENV)
            return None
        who = self.attribute(slo.get("metadata") or {})
        if who is None:
            self._mark_seen(call_id)
            journal.settle(call_id)
            self.unattributed += 1
            return None
        tenant_id, key_id = who
        row = row_from_logging(
            kwargs,
            success=success,
            tenant_id=tenant_id,
            key_id=key_id,
            price_of=self.config.price,
            guard=guard,
            names=self.config.names,
        )
        hold = ((slo.get("metadata") or {}).get("user_api_key_auth_metadata") or {}).get("twllm_budget_hold")
        if isinstance(hold, str) and hold:
            row = dataclasses.replace(row, hold=hold)  # released when the row is written
        tenant = "" if key_id is None else self.tenant_name(slo.get("metadata") or {})
        return PreparedRow(call_id, row, key_id, tenant)

    def commit(self, prepared: PreparedRow) -> None:
        """Queue a prepared row: one per call, whichever of its events comes first."""
        if prepared.call_id in self._seen:
            return
        self._mark_seen(prepared.call_id)
        row, key_id = prepared.row, prepared.key_id
        if streams.was_cut(prepared.call_id):  # the engine went away mid-stream; whichever event came first
            row = dataclasses.replace(row, status_code=streams.CUT_STATUS, error_class=EngineStreamCut.__name__)
        self.writer.enqueue(row)
        journal.settle(prepared.call_id)  # the answer's end may go out now (twllm.gateway.journal)
        if key_id is not None:
            self.auth.budgets.note_queued(key_id, row.cost)
            self.auth.limiter.note_tokens(key_id, row.prompt_tokens + row.completion_tokens)
        # Counted from the row just queued, so Prometheus's per-tenant counts are the ledger's.
        metrics.observe_row(row, prepared.tenant)

    def _mark_seen(self, call_id: str) -> None:
        if call_id:
            self._seen[call_id] = None
            if len(self._seen) > SEEN_CALL_IDS:
                self._seen.popitem(last=False)

    def attribute(self, metadata: Mapping[str, Any]) -> tuple[int | None, int | None] | None:
        """(tenant id, key id) of an event — (None, None) for the master key — or None."""
        ours = metadata.get("user_api_key_auth_metadata") or {}
        if ours.get("twllm_admin"):
            return None, None
        if ours.get("twllm_key_id") is not None:
            return int(ours["twllm_tenant_id"]), int(ours["twllm_key_id"])
        key_hash = metadata.get("user_api_key_hash")
        if isinstance(key_hash, str) and key_hash:
            if self.master_hash is not None and key_hash == self.master_hash:
                return None, None
            try:
                key = self.auth.cache.peek(bytes.fromhex(key_hash))
            except ValueError:
                key = None
            if key is not None:
                return key.tenant_id, key.id
        return None

    def tenant_name(self, metadata: Mapping[str, Any]) -> str:
        """The tenant's name of a tenant key's event ('' when it cannot be told)."""
        ours = metadata.get("user_api_key_auth_metadata") or {}
        if ours.get("twllm_tenant"):
            return str(ours["twllm_tenant"])
        key_hash = metadata.get("user_api_key_hash")
        try:
            key = self.auth.cache.peek(bytes.fromhex(key_hash)) if isinstance(key_hash, str) else None
        except ValueError:
            key = None
        return key.tenant if key is not None else ""

    def at_exit(self) -> None:
        """On a normal interpreter exit, store what is still journaled. (Workers stopped by a
        signal skip this: uvicorn re-raises SIGTERM after its graceful shutdown. Their rows stay
        journaled for ``ledger.replay_folder`` or the next worker to adopt.)"""
        if os.getpid() != self.pid:
            return
        for prepared in self.failures.drain():  # requests that never settled: recorded as they failed
            try:
                self.commit(prepared)
            except Exception:  # the rest still get their chance
                log.exception("twllm accounting: could not journal call %s at exit", prepared.call_id)
        self.spool.close()
        if self.db.url is not None:
            try:
                replay_folder(self.db.url, self.spool.folder, include_pid=self.pid)
            except Exception as exc:  # noqa: BLE001 - the rows stay journaled
                log.warning("twllm accounting: rows left journaled in %s at exit (%s)", self.spool.folder, exc)


_runtime: Runtime | None = None


def runtime() -> Runtime:
    """This process's Runtime (a forked worker makes its own)."""
    global _runtime
    if _runtime is None or _runtime.pid != os.getpid():
        _runtime = Runtime(GatewayConfig.from_env())
    return _runtime


async def warm() -> None:
    """At a worker's start: the ledger writer runs (replaying what a dead worker journaled) and
    the PostgreSQL pool makes its first connections, before the first request needs them. A
    restarted gateway under load used to refuse its first requests' keys with 503 while those
    connections were still being made."""
    rt = runtime()
    if rt.db.url is None:
        return
    rt.start()
    await rt.db.warm()


startup.at_startup(warm)


def requested_models(body: Mapping[str, Any]) -> list[str]:
    """The model a request body names and the models of its client-side fallbacks."""
    found: list[str] = []
    model = body.get("model")
    if model is not None:
        found.append(model if isinstance(model, str) else repr(model))
    try:
        from litellm.proxy.auth.auth_utils import fallback_target_model_name, iter_request_fallback_targets

        for target in iter_request_fallback_targets(body):
            name = fallback_target_model_name(target)
            if name is not None:
                found.append(name)
    except ValueError as exc:  # nesting deeper than LiteLLM accepts; it refuses the request too
        raise Rejection(400, "invalid_request_error", "invalid_fallbacks", str(exc)) from None
    return found


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    """LiteLLM ``custom_auth``: the caller's UserAPIKeyAuth, or a ProxyException with our status."""
    from litellm.proxy.auth.auth_utils import get_request_route
    from litellm.proxy.common_utils.http_parsing_utils import read_request_body

    try:
        rt = runtime()
    except (OSError, ValueError) as exc:  # gateway.json missing or unreadable: say so, loudly
        log.error("twllm accounting: cannot read the gateway settings (%s): %s", GATEWAY_SETTINGS_ENV, exc)
        raise proxy_exception(
            Rejection(
                500, "server_error", "gateway_misconfigured", "The gateway's settings cannot be read; see its log."
            )
        ) from None
    rt.start()
    route = get_request_route(request)
    try:
        # LiteLLM parsed the body before calling us and caches it on the request; this reads
        # that cache, so the endpoint still gets the body.
        body = await read_request_body(request) if request.method in ("POST", "PUT", "PATCH") else {}
        if (unsupported := responses.unsupported(route, body)) is not None:  # needs a stored response
            raise Rejection(400, "invalid_request_error", "unsupported_parameter", unsupported[1], param=unsupported[0])
        identity = await rt.auth.authenticate(api_key, route, requested_models(body))
    except Rejection as rejection:
        raise proxy_exception(rejection) from None
    return user_api_key_auth_object(identity, api_key, rt.config.names)


def user_api_key_auth_object(identity: Identity, api_key: str, names: ModelNames | None = None) -> UserAPIKeyAuth:
    """What LiteLLM carries for the request: ``models`` filters /v1/models (LiteLLM does not
    enforce it; ``Authenticator`` does) and ``metadata`` reaches the spend logger as
    ``standard_logging_object.metadata.user_api_key_auth_metadata``. A key's ``models`` are
    every name it may call: its allow-list with the other names of those models (aliases)."""
    if identity.key is None:
        return UserAPIKeyAuth(api_key=api_key, user_role=LitellmUserRoles.PROXY_ADMIN, metadata=identity.metadata())
    models = list(identity.key.models or [])
    return UserAPIKeyAuth(
        api_key=api_key,
        key_alias=identity.key.prefix,
        models=(names or ModelNames()).listed(models) if models else [],
        metadata=identity.metadata(),
    )


class SpendLogger(CustomLogger):
    """LiteLLM callback writing one ledger row per request (success or failure, streams too), and
    keeping a tenant key's fallbacks within its allow-list."""

    async def async_log_success_event(self, kwargs: dict, response_obj: Any, start_time: Any, end_time: Any) -> None:
        await self._record(kwargs, success=True)

    async def async_log_failure_event(self, kwargs: dict, response_obj: Any, start_time: Any, end_time: Any) -> None:
        await self._record(kwargs, success=False)

    async def async_post_call_failure_hook(
        self,
        request_data: dict,
        original_exception: Exception,
        user_api_key_dict: UserAPIKeyAuth,
        traceback_str: str | None = None,
    ) -> None:
        """The proxy answered the request with a failure: its last failure event is its outcome
        (``outcomes.py``)."""
        try:
            rt = runtime()
            held = rt.failures.failed(str(request_data.get("litellm_call_id") or ""))
            if held is not None:
                await _commit_failure(rt, held)
        except Exception:  # a logging bug must not change the answer; it is logged loudly
            log.exception("twllm spend logger: could not record call %s", request_data.get("litellm_call_id"))

    async def async_pre_call_hook(
        self, user_api_key_dict: UserAPIKeyAuth, cache: Any, data: dict, call_type: Any
    ) -> dict | None:
        """A tenant key with an allow-list falls back only to models it may use: the gateway's
        fallbacks without the others become the request's own (``names.py``). Fallbacks the
        client sent itself are left as they are (``Authenticator`` checked each)."""
        if call_type in responses.CALLS:  # vLLM's own fields, which LiteLLM would drop
            responses.forward_engine_params(data)
        allowed = frozenset(user_api_key_dict.models or ())
        if not allowed or user_api_key_dict.user_role == LitellmUserRoles.PROXY_ADMIN:
            return None
        names = runtime().config.names
        for kind in ("fallbacks", "context_window_fallbacks"):
            if data.get(kind) is None:
                kept = names.allowed_fallbacks(allowed, kind)
                if kept is not None:
                    data[kind] = kept
        return data

    async def async_post_call_streaming_iterator_hook(
        self, user_api_key_dict: UserAPIKeyAuth, response: Any, request_data: dict
    ) -> Any:
        """Streams reach the client as the engine sent them (see twllm.gateway.streams)."""
        async for chunk in faithful(response, request_data):
            yield chunk

    @staticmethod
    async def _record(kwargs: dict, *, success: bool) -> None:
        try:
            rt = runtime()
            if success:
                rt.failures.succeeded(_call_id(kwargs))  # what failed before were attempts
                rt.record(kwargs, success=True, guard=await _guard_record(kwargs))
            else:
                prepared = rt.prepare(kwargs, success=False)
                if prepared is None:
                    await _guard_record(kwargs, failed=True)  # nothing to write; the guard forgets it
                elif not rt.failures.hold(prepared.call_id, prepared):  # held: it may be an attempt
                    await _commit_failure(rt, prepared)
            for late in rt.failures.expired():
                await _commit_failure(rt, late)
        except Exception:  # a logging bug must not fail the request; it is logged loudly
            log.exception("twllm spend logger: could not record call %s", kwargs.get("litellm_call_id"))


def _call_id(kwargs: Mapping[str, Any]) -> str:
    slo = kwargs.get("standard_logging_object") or {}
    return str(kwargs.get("litellm_call_id") or slo.get("litellm_call_id") or "")


async def _commit_failure(rt: Runtime, prepared: PreparedRow) -> None:
    """Queue a failure that is its request's outcome, with the guard's verdicts on the request."""
    guard = await _guard_take(prepared.call_id, failed=True)
    if guard:
        prepared = dataclasses.replace(prepared, row=dataclasses.replace(prepared.row, guard=guard))
    rt.commit(prepared)


async def _guard_record(kwargs: Mapping[str, Any], *, failed: bool = False) -> dict[str, Any] | None:
    """The Safety Guard's verdicts on this call (None when no guardrail runs in this process)."""
    return await _guard_take(_call_id(kwargs), failed=failed)


async def _guard_take(call_id: str, *, failed: bool) -> dict[str, Any] | None:
    import sys

    gateway = sys.modules.get("twllm.guard.gateway")  # loaded by LiteLLM only when the spec guards
    if gateway is None:
        return None
    return await gateway.take_record(call_id, failed=failed)


spend_logger = SpendLogger()
"""The instance ``litellm_settings.callbacks`` names (LiteLLM refuses a class there)."""


class FastAccounts:
    """The checks and the ledger for the gateway's own forwarding (``twllm.gateway.forward``):
    the same ``Authenticator`` and ledger rows as LiteLLM's path, without LiteLLM's objects."""

    async def admit(self, api_key: str, route: str, model: str) -> forward.Admission | None:
        rt = runtime()
        rt.start()
        if rt.auth.is_master(api_key):
            return None  # the master key's requests keep LiteLLM's path (and its admin rights)
        try:
            identity = await rt.auth.authenticate(api_key, route, [model])
        except Rejection as rejection:
            self._refused(rt, api_key, model, rejection)
            error = errors.public_error(rejection.status, rejection.body())
            error.headers = dict(rejection.headers)
            raise forward.Refused(error) from None
        key = identity.key
        if key is None:
            return None
        return forward.Admission(key.tenant_id, key.id, key.tenant, identity.hold)

    @staticmethod
    def _refused(rt: Runtime, api_key: str, model: str, rejection: Rejection) -> None:
        """A known key's refusal is a row, as on LiteLLM's path (an unknown key's is no one's)."""
        if rt.db.url is None:
            return
        key = rt.auth.cache.peek(hash_key(api_key))
        if key is None:
            rt.unattributed += 1
            return
        now = time.time()
        admission = forward.Admission(key.tenant_id, key.id, key.tenant)
        FastAccounts.row(
            rt,
            forward.Outcome(
                admission,
                str(uuid.uuid4()),
                now,
                model,
                model,
                None,
                0,
                0,
                0,
                None,
                rejection.status,
                "TwllmAuthError",
                False,
            ),
        )

    def settle(self, outcome: forward.Outcome) -> None:
        rt = runtime()
        if rt.db.url is None:
            return
        self.row(rt, outcome)

    @staticmethod
    def row(rt: Runtime, outcome: forward.Outcome) -> None:
        names = rt.config.names
        model = names.answered(outcome.deployment, outcome.model)
        price = rt.config.price(model)
        admission = outcome.admission
        row = LedgerRow(
            ts=datetime.fromtimestamp(outcome.started, tz=UTC),
            request_id=outcome.request_id,
            tenant_id=admission.tenant_id,
            key_id=admission.key_id,
            model=model,
            deployment=outcome.deployment,
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
            cost=price.cost(outcome.prompt_tokens, outcome.completion_tokens),
            currency=price.currency,
            latency_ms=outcome.latency_ms,
            ttft_ms=outcome.ttft_ms,
            status_code=outcome.status,
            error_class=outcome.error_class,
            stream=outcome.stream,
            requested_model=outcome.requested_model,
            hold=admission.hold,
        )
        rt.commit(PreparedRow(outcome.request_id, row, admission.key_id, admission.tenant))


forward.register(FastAccounts())
