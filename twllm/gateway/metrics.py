"""twllm's own Prometheus series in the gateway, and the rules that keep their labels bounded.

Every gateway worker updates these in its own process; with ``PROMETHEUS_MULTIPROC_DIR`` set (the
supervisor sets it, ``twllm.gateway.serve`` empties it at each start) prometheus_client keeps
each worker's values in that folder and one scrape (``twllm.gateway.scrape``) adds them up.

Requests, tokens and spend are counted from the ledger row the spend logger records
(``observe_row``, called by ``twllm.accounting.hooks.Runtime.record``), so a tenant's counts here
equal its rows in ``spend_ledger``. Labels never hold a key, a prompt or personal data: ``key`` is
the key's numeric id (or ``master``), ``model`` only a client-facing model of this gateway (others
are ``other``), guard ``category`` only a category the guard knows.

The names and labels are a contract with the Grafana dashboard and the Prometheus proof test
(``twllm render monitoring``): change them together.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from decimal import Decimal
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram

from twllm.gateway.settings import GatewaySettings
from twllm.settings import GATEWAY_SETTINGS_ENV

OTHER = "other"
"""The label value for a model (or guard category) outside the known set."""
MASTER = "master"
"""The ``key`` label of requests made with the master key."""

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, float("inf"))
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, float("inf"))

# prometheus_client adds ``_total`` to a counter's name in the exposition: twllm_requests_total.
REQUESTS = Counter(
    "twllm_requests", "Requests the gateway answered, per ledger row.", ["tenant", "key", "model", "status"]
)
TOKENS = Counter("twllm_tokens", "Tokens of the ledger's rows.", ["tenant", "key", "model", "direction"])
SPEND = Counter("twllm_spend", "Spend of the ledger's rows, in currency units.", ["tenant", "key", "model", "currency"])
TTFT = Histogram(
    "twllm_time_to_first_token_seconds",
    "Time to the first token of successful streams.",
    ["model"],
    buckets=TTFT_BUCKETS,
)
DURATION = Histogram(
    "twllm_request_duration_seconds", "Time from request to the last byte.", ["model"], buckets=LATENCY_BUCKETS
)
GUARD_VERDICTS = Counter(
    "twllm_guard_verdicts", "The Safety Guard's verdicts, per stage and category.", ["stage", "category", "action"]
)
# A live gauge per worker: a worker that is gone drops out (LiteLLM's startup marks dead workers).
SPOOL_ROWS = Gauge("twllm_spool_rows", "Ledger rows journaled and not yet in PostgreSQL.", multiprocess_mode="livesum")
LEDGER_LAG = Gauge(
    "twllm_ledger_write_lag_seconds",
    "Age of the oldest ledger row not yet in PostgreSQL (0 when none).",
    multiprocess_mode="livemax",
)
SPOOL_WRITE_FAILURES = Counter(
    "twllm_spool_write_failures",
    "Ledger rows the spool could not journal (disk full, …); kept in memory until PostgreSQL has them.",
)
KEY_CACHE = Counter("twllm_key_cache_lookups", "Tenant key lookups in a worker's key cache.", ["result"])


class Row(Protocol):
    """What ``observe_row`` reads of a ledger row (``twllm.accounting.ledger.LedgerRow``)."""

    @property
    def key_id(self) -> int | None: ...
    @property
    def model(self) -> str: ...
    @property
    def status_code(self) -> int: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def cost(self) -> Decimal: ...
    @property
    def currency(self) -> str: ...
    @property
    def latency_ms(self) -> int | None: ...
    @property
    def ttft_ms(self) -> int | None: ...


# --- label rules ----------------------------------------------------------------------------------

_known_models: frozenset[str] | None = None
_known_lock = threading.Lock()


def known_models() -> frozenset[str]:
    """The client-facing models of gateway.json (read once per process; none without the file)."""
    global _known_models
    with _known_lock:
        if _known_models is None:
            path = os.environ.get(GATEWAY_SETTINGS_ENV)
            try:
                _known_models = frozenset(GatewaySettings.load(path).models) if path else frozenset()
            except (OSError, ValueError):
                _known_models = frozenset()  # the hooks report an unreadable file; count as ``other``
        return _known_models


def model_label(model: str, known: Iterable[str] | None = None) -> str:
    """``model`` when the gateway serves it under that name, else ``other`` (a client's typo or a
    made-up name must not make a new series)."""
    return model if model in (known_models() if known is None else known) else OTHER


def key_label(key_id: int | None) -> str:
    """The key's numeric id as text, or ``master``."""
    return MASTER if key_id is None else str(key_id)


def status_label(status: int) -> str:
    """The HTTP status class: ``2xx``, ``4xx``, ``5xx`` (anything out of range counts as ``5xx``)."""
    return f"{status // 100}xx" if 100 <= status <= 599 else "5xx"


# --- updates --------------------------------------------------------------------------------------


def observe_row(row: Row, tenant: str, known: Iterable[str] | None = None) -> None:
    """Count one ledger row: a request, its tokens, its spend and its latencies.

    ``tenant``: the tenant's name ('' for the master key)."""
    model = model_label(row.model, known)
    key = key_label(row.key_id)
    REQUESTS.labels(tenant, key, model, status_label(row.status_code)).inc()
    if row.prompt_tokens:
        TOKENS.labels(tenant, key, model, "input").inc(row.prompt_tokens)
    if row.completion_tokens:
        TOKENS.labels(tenant, key, model, "output").inc(row.completion_tokens)
    if row.cost:
        SPEND.labels(tenant, key, model, row.currency).inc(float(row.cost))
    if row.latency_ms is not None:
        DURATION.labels(model).observe(row.latency_ms / 1000)
    if row.ttft_ms is not None:
        TTFT.labels(model).observe(row.ttft_ms / 1000)


def observe_guard(stage: str, categories: Iterable[str], action: str) -> None:
    """Count one guard verdict once per category ('' when it named none, as an allow does).
    The caller passes only categories it knows (others as ``other``): never text."""
    named = list(categories) or [""]
    for category in named:
        GUARD_VERDICTS.labels(stage, category, action).inc()


def observe_key_lookup(hit: bool) -> None:
    KEY_CACHE.labels("hit" if hit else "miss").inc()


def observe_spool_write_failure() -> None:
    """One ledger row the spool could not journal."""
    SPOOL_WRITE_FAILURES.inc()


def set_ledger_backlog(rows: int, lag_s: float) -> None:
    """This worker's ledger rows not yet in PostgreSQL, and the age of its oldest one."""
    SPOOL_ROWS.set(rows)
    LEDGER_LAG.set(lag_s if rows else 0.0)
