"""Per-request work of LiteLLM's proxy that twllm's gateway does not need, switched off.

Found with ``benchmarks/gateway_cpu.py --profile`` (py-spy on a worker under load); each item
names what it cost there and why twllm can go without it:

- **ASGI middleware** (``UNUSED_MIDDLEWARE``). LiteLLM wraps its app in ~15 middlewares; each one
  runs on every request, and those that wrap ``send`` run again on every streamed chunk. The
  ones left out serve features the shield (``twllm.gateway.asgi``) closes or does itself: CORS
  (the shield answers it for the spec's origins only and strips LiteLLM's blanket headers), the
  request size limit (the shield's 413, before the body is read), LiteLLM's /metrics auth (the
  shield answers /metrics), routes loaded on first use (the shield's allowlist never reaches
  them), LiteLLM's telemetry, its enterprise billing counters, its Redis request batching and
  budget reservations (twllm's own limits and budgets, ``twllm.accounting``) and its admission
  control (off unless configured, which twllm never does). Kept: the security headers, the
  in-flight gauge, gzip for clients that ask for it.
- **OTel destinations per key** (``skip_otel_destinations``): LiteLLM's auth imports its
  OpenTelemetry v2 logger on every request to find a tenant's trace destinations; without the
  OpenTelemetry SDK (twllm does not install it) the import fails, is swallowed, and is tried
  again on the next request — ≈6 % of a worker's CPU. With the SDK absent it is a no-op, once.
- **The enterprise package looked for on every request** (``skip_missing_enterprise``):
  LiteLLM's route check imports ``litellm_enterprise`` for every authenticated request; twllm
  does not install it, and a failed import is not remembered, so each request searched
  ``sys.path`` for it again (≈4.5 % of a worker's samples in the profile). With the package
  absent it is marked missing in ``sys.modules`` once: the import then fails at once, as before.
- **Rate-limit gauges nobody exports** (``skip_excluded_rate_limit_gauges``): LiteLLM's
  Prometheus logger computes its per-key/team/project rate-limit gauges for every request (≈4 %
  of a worker's CPU) even when ``prometheus_exclude_metrics`` leaves them all out, as twllm's
  render does (its limits are twllm's own). Computed only when one of them is exported.

``TWLLM_GATEWAY_LEAN`` (a diagnostic, for ``benchmarks/gateway_cpu.py --ablation``) names the
parts to apply — ``middleware``, ``otel``, ``enterprise``, ``gauges``; ``none`` applies none;
unset, all.

Each part checks that what it removes is still there: a LiteLLM upgrade that renames one logs a
warning and leaves that part of its proxy as it is (``tests/unit/test_gateway_lean.py`` fails).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from typing import Any

from twllm.settings import GATEWAY_LEAN_ENV

log = logging.getLogger("twllm.gateway")

UNUSED_MIDDLEWARE: frozenset[str] = frozenset(
    {
        "starlette.middleware.cors.CORSMiddleware",
        "litellm.proxy.middleware.request_size_limit_middleware.RequestSizeLimitMiddleware",
        "litellm.proxy.middleware.prometheus_auth_middleware.PrometheusAuthMiddleware",
        "litellm.proxy._lazy_features.LazyFeatureMiddleware",
        "litellm.proxy.telemetry.middleware.TelemetryMiddleware",
        "litellm.proxy.middleware.billable_request_metrics_middleware.BillableRequestMetricsMiddleware",
        "litellm.proxy.middleware.redis_request_batch_middleware.RedisRequestBatchMiddleware",
        "litellm.proxy.middleware.budget_reservation_release_middleware.BudgetReservationReleaseMiddleware",
        "litellm.proxy.middleware.admission_control_middleware.AdmissionControlMiddleware",
        "litellm.proxy.lens.internal.LensInternalMiddleware",
    }
)
"""LiteLLM's middleware the gateway runs without (module.ClassName), each explained above."""

RATE_LIMIT_SERIES: frozenset[str] = frozenset(
    {
        "litellm_api_key_rate_limit_allowed_metric",
        "litellm_api_key_rate_limit_used_metric",
        "litellm_team_rate_limit_allowed_metric",
        "litellm_team_rate_limit_used_metric",
        "litellm_project_model_rate_limit_allowed_metric",
        "litellm_project_model_rate_limit_used_metric",
    }
)
"""What ``PrometheusLogger._set_v3_rate_limit_allowed_and_used_metrics`` sets."""

PARTS = ("middleware", "otel", "enterprise", "gauges")
LEAN_ENV = GATEWAY_LEAN_ENV

OTEL_LOGGER = "litellm.integrations.otel.logger"
ENTERPRISE = "litellm_enterprise"
AUTH_MODULE = "litellm.proxy.auth.user_api_key_auth"


def middleware_name(entry: Any) -> str:
    cls = entry.cls
    return f"{cls.__module__}.{cls.__qualname__}"


def drop_middleware(app: Any) -> list[str]:
    """Remove ``UNUSED_MIDDLEWARE`` from a FastAPI app whose middleware stack is not built yet
    (it is built on the first request). Returns the names removed."""
    if getattr(app, "middleware_stack", None) is not None:
        raise RuntimeError("the proxy app already serves: its middleware can no longer change")
    removed = [middleware_name(m) for m in app.user_middleware if middleware_name(m) in UNUSED_MIDDLEWARE]
    missing = sorted(UNUSED_MIDDLEWARE - set(removed))
    if missing:
        log.warning("twllm gateway: LiteLLM no longer adds %s; its proxy changed, check twllm.gateway.lean", missing)
    app.user_middleware[:] = [m for m in app.user_middleware if middleware_name(m) not in UNUSED_MIDDLEWARE]
    return removed


def skip_otel_destinations() -> bool:
    """Make LiteLLM's per-request trace-destination lookup a no-op when the OpenTelemetry SDK
    it needs is not installed (LiteLLM's own lookup then fails and does nothing, every time).
    Returns whether it was switched off."""
    auth = importlib.import_module(AUTH_MODULE)
    if not hasattr(auth, "_seed_request_destinations"):
        log.warning("twllm gateway: LiteLLM's auth has no _seed_request_destinations; check twllm.gateway.lean")
        return False
    try:
        importlib.import_module(OTEL_LOGGER)
    except ImportError:
        auth._seed_request_destinations = _no_destinations  # type: ignore[attr-defined]
        return True
    return False


def _no_destinations(*args: object, **kwargs: object) -> None:
    """No OpenTelemetry SDK: no trace destination to anchor (what LiteLLM ends with, too)."""


def skip_missing_enterprise() -> bool:
    """Mark LiteLLM's enterprise package missing once, when it is not installed, so that the
    imports LiteLLM tries on every request fail at once instead of searching ``sys.path``.
    Returns whether it was marked."""
    if ENTERPRISE in sys.modules or importlib.util.find_spec(ENTERPRISE) is not None:
        return False  # installed (or already marked): left alone
    sys.modules[ENTERPRISE] = None  # type: ignore[assignment]  # the import system's "known missing"
    return True


def skip_excluded_rate_limit_gauges() -> bool:
    """Let LiteLLM's Prometheus logger skip its rate-limit gauges when every one is excluded."""
    from litellm.integrations.prometheus import PrometheusLogger

    name = "_set_v3_rate_limit_allowed_and_used_metrics"
    original = getattr(PrometheusLogger, name, None)
    if original is None or getattr(original, "twllm_lean", False):
        if original is None:
            log.warning("twllm gateway: LiteLLM's PrometheusLogger has no %s; check twllm.gateway.lean", name)
        return False

    def rate_limit_gauges(self: Any, *args: Any, **kwargs: Any) -> None:
        if RATE_LIMIT_SERIES <= set(getattr(self, "exclude_metrics", ())):
            return None
        return original(self, *args, **kwargs)

    rate_limit_gauges.twllm_lean = True  # type: ignore[attr-defined]
    setattr(PrometheusLogger, name, rate_limit_gauges)
    return True


def install(app: Any) -> list[str]:
    """Everything above (or the parts ``TWLLM_GATEWAY_LEAN`` names), on LiteLLM's proxy app
    before it serves. Returns what was switched off."""
    chosen = os.environ.get(LEAN_ENV, ",".join(PARTS))
    parts = {p.strip() for p in chosen.split(",")} & set(PARTS)
    off = drop_middleware(app) if "middleware" in parts else []
    if "otel" in parts and skip_otel_destinations():
        off.append(f"{AUTH_MODULE}._seed_request_destinations")
    if "enterprise" in parts and skip_missing_enterprise():
        off.append(f"the search for {ENTERPRISE} on every request")
    if "gauges" in parts and skip_excluded_rate_limit_gauges():
        off.append("PrometheusLogger rate-limit gauges when excluded")
    return off
