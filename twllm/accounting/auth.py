"""Who is calling and may they: the master key, tenant keys, their models, rate limits and budgets.

``Authenticator.authenticate`` returns an ``Identity`` or raises ``Rejection``, which
``hooks.py`` turns into the HTTP answer. Outcomes, in the order they are checked:

====================================  ======  ===========================================
Situation                             Status  ``error.type`` / ``error.code``
====================================  ======  ===========================================
no key                                401     invalid_request_error / missing_api_key
unknown key                           401     invalid_request_error / invalid_api_key
revoked key                           401     invalid_request_error / revoked_api_key
expired key                           401     invalid_request_error / expired_api_key
key of a disabled tenant              403     permission_error / tenant_disabled
key unknown and PostgreSQL down       503     service_unavailable / accounts_unavailable
route other than the inference API    403     permission_error / route_not_allowed
model (or fallback) not in the key's  403     permission_error / model_not_allowed
budget of the period spent            429     insufficient_quota / budget_exceeded
requests in flight may spend the rest 429     insufficient_quota / budget_in_flight (Retry-After: 1)
RPM reached                           429     requests / rate_limit_exceeded (+ Retry-After)
TPM reached                           429     tokens / rate_limit_exceeded (+ Retry-After)
====================================  ======  ===========================================

(``hooks.py`` adds two: fallbacks nested deeper than LiteLLM allows, 400 invalid_fallbacks;
gateway.json unreadable, 500 server_error / gateway_misconfigured.) The master key passes every
check. ``/v1/models`` lists a key's models only (LiteLLM filters by ``UserAPIKeyAuth.models``)
and counts against no limit. A model's aliases are the model (``names.py``): a key allowed one
name may call every name of that model, and the fallbacks of the gateway it may not use are
skipped for it, never tried (``hooks.py``'s pre-call hook), so no other model answers it.

A spent budget is a 429 ``insufficient_quota``, as OpenAI answers an exhausted quota, so clients
written for OpenAI already recognise it; its ``code`` tells it apart from a rate limit, and it
carries no Retry-After (waiting a minute does not help; the message names the period: UTC day,
UTC month, or in total).

Tenant keys are looked up by their sha256 and cached per worker for ``KEY_CACHE_TTL_S``
seconds (unknown keys too): **a revocation or expiry set in the database takes effect within
``KEY_CACHE_TTL_S`` seconds** (an ``expires_at`` reached while cached takes effect at once).
While PostgreSQL is unreachable, keys already cached stay usable, whatever their age.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

from twllm.accounting.gateway_config import Database, DatabaseUnavailable
from twllm.accounting.keys import hash_key
from twllm.accounting.limits import BudgetGate, BudgetTracker, RateLimiter
from twllm.accounting.names import ModelNames
from twllm.gateway import metrics

KEY_CACHE_TTL_S = 5.0
"""How long a worker trusts what it read about a key: the delay before a revocation bites."""
KEY_CACHE_MAX = 10_000
"""Keys (known or not) a worker remembers; the least recently used are forgotten first."""

LOOKUP_SQL = """
SELECT k.id, k.tenant_id, t.name, k.prefix, k.models, k.rpm, k.tpm, k.budget, k.budget_period,
       k.expires_at, k.revoked_at, coalesce(k.guard_policy, t.guard_policy), t.disabled_at IS NOT NULL
FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
WHERE k.key_hash = %s
"""

# Routes a tenant key may call. Everything else (admin, key management, health, model info with
# engine addresses, files, batches, pass-through) is the master key's.
_INFERENCE = re.compile(r"^(?:/v1)?/(?:chat/completions|completions|embeddings|responses)$")
# Rerank as LiteLLM serves it (Cohere v1/v2, Jina); the gateway's /score arrives here as /v1/rerank.
_RERANK = re.compile(r"^(?:/v1|/v2)?/rerank$")
_AZURE_STYLE = re.compile(
    r"^/(?:openai/deployments|engines)/(?P<model>[^/]+)/(?:chat/completions|completions|embeddings)$"
)
_MODELS = re.compile(r"^(?:/v1)?/models(?:/(?P<model>.+))?$")


@dataclass(frozen=True)
class KeyInfo:
    """What the gateway knows of a tenant key (a row of api_keys and its tenant's name)."""

    id: int
    tenant_id: int
    tenant: str
    prefix: str
    models: tuple[str, ...] | None
    """None: every model of the deployment."""
    rpm: int | None = None
    tpm: int | None = None
    budget: Decimal | None = None
    budget_period: str | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    guard_policy: str | None = None
    """The key's guard policy, else its tenant's (a name from the spec's guard.policies)."""
    tenant_disabled: bool = False
    """The tenant is disabled (``store.set_tenant_disabled``): every key of it is refused."""

    def status(self, now: datetime) -> str:
        """active | revoked | expired (the same rule as ``store.KeyRecord.status``)."""
        if self.revoked_at is not None and self.revoked_at <= now:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


@dataclass(frozen=True)
class Identity:
    """An authenticated caller: the master key (``key`` None) or a tenant key."""

    key: KeyInfo | None
    hold: str | None = None
    """The request's budget hold (``limits.BudgetGate``), released when its ledger row is written."""

    @property
    def admin(self) -> bool:
        return self.key is None

    def metadata(self) -> dict[str, object]:
        """What travels with the request to the spend logger (UserAPIKeyAuth.metadata)."""
        if self.key is None:
            return {"twllm_admin": True}
        data: dict[str, object] = {
            "twllm_tenant_id": self.key.tenant_id,
            "twllm_key_id": self.key.id,
            "twllm_tenant": self.key.tenant,
        }
        if self.key.guard_policy:
            data["twllm_guard_policy"] = self.key.guard_policy
        if self.hold is not None:
            data["twllm_budget_hold"] = self.hold
        return data


class Rejection(Exception):
    """A request refused: the HTTP status and an OpenAI-style error."""

    def __init__(
        self,
        status: int,
        type_: str,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.param = param

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def route_kind(route: str) -> tuple[str | None, str | None]:
    """('inference' | 'models' | None, the model named in the path if any) for a route."""
    if _INFERENCE.match(route) or _RERANK.match(route):
        return "inference", None
    if match := _AZURE_STYLE.match(route):
        return "inference", match["model"]
    if match := _MODELS.match(route):
        return "models", match["model"]
    return None, None


@dataclass
class _Entry:
    key: KeyInfo | None
    read_at: float


@dataclass
class KeyCache:
    """Tenant keys by hash, per worker, with a TTL, one database read per key at a time, and
    stale entries served while the database is unreachable."""

    db: Database
    ttl_s: float = KEY_CACHE_TTL_S
    max_entries: int = KEY_CACHE_MAX
    _entries: OrderedDict[bytes, _Entry] = field(default_factory=OrderedDict)
    _reads: dict[bytes, asyncio.Future[KeyInfo | None]] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0

    async def get(self, key_hash: bytes) -> KeyInfo | None:
        """The key with this hash (None: no such key); DatabaseUnavailable if it cannot be known."""
        entry = self._entries.get(key_hash)
        if entry is not None and time.monotonic() - entry.read_at < self.ttl_s:
            self._entries.move_to_end(key_hash)
            self.hits += 1
            metrics.observe_key_lookup(hit=True)
            return entry.key
        self.misses += 1
        metrics.observe_key_lookup(hit=False)
        running = self._reads.get(key_hash)
        if running is None:
            running = asyncio.get_running_loop().create_task(self._read(key_hash))
            self._reads[key_hash] = running
            running.add_done_callback(lambda _: self._reads.pop(key_hash, None))
        try:
            return await asyncio.shield(running)
        except DatabaseUnavailable:
            if entry is not None:
                return entry.key  # stale, but the best there is while PostgreSQL is away
            raise

    def peek(self, key_hash: bytes) -> KeyInfo | None:
        """The cached key of this hash, however old (for attributing refused requests)."""
        entry = self._entries.get(key_hash)
        return entry.key if entry is not None else None

    async def _read(self, key_hash: bytes) -> KeyInfo | None:
        async with self.db.connection() as conn:
            cur = await conn.execute(LOOKUP_SQL, (key_hash,))
            row = await cur.fetchone()
        key = None
        if row is not None:
            (
                id_,
                tenant_id,
                tenant,
                prefix,
                models,
                rpm,
                tpm,
                budget,
                period,
                expires_at,
                revoked_at,
                guard_policy,
                tenant_disabled,
            ) = row
            key = KeyInfo(
                id_,
                tenant_id,
                tenant,
                prefix,
                tuple(models) if models is not None else None,
                rpm,
                tpm,
                budget,
                period,
                expires_at,
                revoked_at,
                guard_policy,
                bool(tenant_disabled),
            )
        self._entries[key_hash] = _Entry(key, time.monotonic())
        self._entries.move_to_end(key_hash)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return key


class Authenticator:
    """The checks of one worker, in the order of the module's table."""

    def __init__(
        self,
        db: Database,
        master_key: str | None,
        *,
        cache: KeyCache | None = None,
        limiter: RateLimiter | None = None,
        budgets: BudgetTracker | None = None,
        gate: BudgetGate | None = None,
        names: ModelNames | None = None,
        free: Callable[[str], bool] | None = None,
    ) -> None:
        self.master_key = master_key
        self.names = names or ModelNames()
        """Aliases: a key allowed a model may call it by any of its names (``names.py``)."""
        self.cache = cache or KeyCache(db)
        self.limiter = limiter or RateLimiter(db)
        self.budgets = budgets or BudgetTracker(db)
        """This worker's own view of budgets: used only while PostgreSQL cannot be reached."""
        self.gate = gate or BudgetGate(db)
        self.free = free or (lambda model: False)
        """Whether a model costs nothing (a request that can reach only such models spends nothing)."""

    def is_master(self, api_key: str) -> bool:
        return self.master_key is not None and hmac.compare_digest(
            api_key.encode("utf-8"), self.master_key.encode("utf-8")
        )

    async def authenticate(
        self, api_key: str | None, route: str, models: Iterable[str] = (), now: datetime | None = None
    ) -> Identity:
        """Check a request with ``api_key`` on ``route`` that asks for ``models`` (the model and
        any client-side fallbacks; ``route``'s own model is added here)."""
        if not api_key:
            raise Rejection(
                401, "invalid_request_error", "missing_api_key", "No API key: send it as 'Authorization: Bearer sk-…'."
            )
        if self.is_master(api_key):
            return Identity(None)
        try:
            key = await self.cache.get(hash_key(api_key))
        except DatabaseUnavailable:
            raise Rejection(
                503,
                "service_unavailable",
                "accounts_unavailable",
                "API keys cannot be checked right now; try again shortly.",
                {"Retry-After": "5"},
            ) from None
        if key is None:
            raise Rejection(401, "invalid_request_error", "invalid_api_key", "Incorrect API key provided.")
        now = now or datetime.now(UTC)
        state = key.status(now)
        if state != "active":
            raise Rejection(401, "invalid_request_error", f"{state}_api_key", f"The API key {key.prefix}… was {state}.")
        if key.tenant_disabled:
            raise Rejection(
                403, "permission_error", "tenant_disabled", f"The tenant of the API key {key.prefix}… is disabled."
            )
        kind, path_model = route_kind(route)
        if kind is None:
            raise Rejection(
                403,
                "permission_error",
                "route_not_allowed",
                f"Tenant keys may call the inference API only, not {route}.",
            )
        wanted = [m for m in ([path_model] if path_model else []) + list(models) if m is not None]
        if key.models is not None:
            allowed = self.names.allowed(key.models)  # an alias and its model are one model
            for model in wanted:
                if model not in allowed:
                    raise Rejection(
                        403, "permission_error", "model_not_allowed", f"This API key may not use the model {model!r}."
                    )
        hold = None
        if kind == "inference":
            await self._check_rate(key)
            hold = await self._check_budget(key, now, wanted)  # last: a request admitted holds a place
        return Identity(key, hold)

    async def _check_budget(self, key: KeyInfo, now: datetime, models: list[str]) -> str | None:
        """Admit the request within the key's budget (shared by every process; this worker's own
        reading while PostgreSQL is down); its hold, or None."""
        if key.budget is None:
            return None
        from twllm.accounting.store import period_start

        in_flight = False
        try:
            free = bool(models) and all(self.free(m) for m in models)
            verdict = await self.gate.admit(key.id, key.budget, period_start(key.budget_period, now), hold=not free)
            allowed, hold, in_flight = verdict.allowed, verdict.hold, verdict.in_flight
        except DatabaseUnavailable:
            spent = await self.budgets.spend(key.id, key.budget_period, now)
            allowed, hold = spent is None or spent < key.budget, None
        if allowed:
            return hold
        period = {"daily": "today (UTC)", "monthly": "this month (UTC)"}.get(key.budget_period or "", "in total")
        if in_flight:
            raise Rejection(
                429,
                "insufficient_quota",
                "budget_in_flight",
                f"The API key {key.prefix}… has requests in flight that may spend the rest of its budget of "
                f"{key.budget} {period}; try again when they finish.",
                {"Retry-After": "1"},
            )
        raise Rejection(
            429,
            "insufficient_quota",
            "budget_exceeded",
            f"The API key {key.prefix}… has spent its budget of {key.budget} {period}.",
        )

    async def _check_rate(self, key: KeyInfo) -> None:
        verdict = await self.limiter.admit(key.id, key.rpm, key.tpm)
        if verdict.allowed:
            return
        unit = "requests" if verdict.exceeded == "requests" else "tokens"
        raise Rejection(
            429,
            unit,
            "rate_limit_exceeded",
            f"Rate limit reached for the API key {key.prefix}…: {verdict.limit} {unit} per minute. "
            f"Try again in {verdict.retry_after_s} s.",
            {
                "Retry-After": str(verdict.retry_after_s),
                f"x-ratelimit-limit-{unit}": str(verdict.limit),
                f"x-ratelimit-remaining-{unit}": "0",
                f"x-ratelimit-reset-{unit}": f"{verdict.retry_after_s}s",
            },
        )
