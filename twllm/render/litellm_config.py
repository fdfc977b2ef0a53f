"""Render a plan into the files the gateway runs from: LiteLLM's proxy config and our settings.

Both are pure functions of the plan (and the spec, for guard settings) and come out in a stable
order, so two renders of one spec are byte-identical. Secrets appear only as references:
``os.environ/VAR`` in the LiteLLM config, variable names in the gateway settings.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from twllm.files import write_atomic
from twllm.gateway.settings import (
    DatabaseSettings,
    GatewaySettings,
    GuardSettings,
    HttpSettings,
    MetricsSettings,
    ModelSettings,
    PriceSettings,
    RemoteGuardSettings,
    RoutingSettings,
)
from twllm.guard.policy import GuardPolicies
from twllm.plan.model import Plan, Route
from twllm.spec.guard_layers import served_guard_models, spec_layers
from twllm.spec.schema import Spec

LITELLM_CONFIG = "litellm_config.yaml"
GATEWAY_SETTINGS = "gateway.json"
PLAN_FILE = "plan.json"

GUARDRAIL_NAME = "twllm-guard"
GUARDRAIL_CLASS = "twllm.guard.gateway.TwllmGuardrail"
SPEND_LOGGER = "twllm.accounting.hooks.spend_logger"
PROMETHEUS_CALLBACK = "prometheus"
"""LiteLLM's open-source Prometheus logger; its series join twllm's on the shield's /metrics."""
PROMETHEUS_EXCLUDED_LABELS = (
    "end_user",
    "user",
    "user_email",
    "user_alias",
    "hashed_api_key",
    "api_key_alias",
    "requested_model",
    "tag",
    "client_ip",
    "user_agent",
)
"""LiteLLM labels left out of its series: a key's hash or prefix, and what a client chooses
(a model name, tags, its address or agent) would make one series per value."""
PROMETHEUS_EXCLUDED_METRICS = (
    # Spend: LiteLLM prices in USD from its own price map; twllm_spend_total is the ledger's.
    "litellm_spend_metric",
    "litellm_zero_cost_requests_total",
    "litellm_spend_capture_rate",
    # Budgets and rate limits: twllm enforces its own (the accounting hooks); LiteLLM's gauges of
    # teams, orgs, users, customers and its virtual keys would read empty or wrong.
    "litellm_remaining_team_budget_metric",
    "litellm_team_max_budget_metric",
    "litellm_team_budget_remaining_hours_metric",
    "litellm_team_members_metric",
    "litellm_remaining_org_budget_metric",
    "litellm_org_max_budget_metric",
    "litellm_org_budget_remaining_hours_metric",
    "litellm_remaining_api_key_budget_metric",
    "litellm_api_key_max_budget_metric",
    "litellm_api_key_budget_remaining_hours_metric",
    "litellm_remaining_user_budget_metric",
    "litellm_user_max_budget_metric",
    "litellm_user_budget_remaining_hours_metric",
    "litellm_remaining_customer_budget_metric",
    "litellm_customer_max_budget_metric",
    "litellm_customer_budget_remaining_hours_metric",
    "litellm_remaining_api_key_requests_for_model",
    "litellm_remaining_api_key_tokens_for_model",
    "litellm_api_key_rate_limit_allowed_metric",
    "litellm_api_key_rate_limit_used_metric",
    "litellm_team_rate_limit_allowed_metric",
    "litellm_team_rate_limit_used_metric",
    "litellm_project_model_rate_limit_allowed_metric",
    "litellm_project_model_rate_limit_used_metric",
    "litellm_remaining_requests_metric",
    "litellm_remaining_tokens_metric",
    # LiteLLM's own spend-log queues, which disable_spend_logs leaves empty.
    "litellm_pod_lock_manager_size",
    "litellm_in_memory_daily_spend_update_queue_size",
    "litellm_redis_daily_spend_update_queue_size",
    "litellm_in_memory_spend_update_queue_size",
    "litellm_redis_spend_update_queue_size",
    # Media and managed batches/files, which no twllm engine serves.
    "litellm_video_duration_seconds_metric",
    "litellm_images_generated_metric",
    "litellm_input_audio_tokens_metric",
    "litellm_output_audio_tokens_metric",
    "litellm_managed_batch_created_total",
    "litellm_managed_file_size_bytes",
    "litellm_managed_batch_duration_seconds",
)
"""LiteLLM series left out: features twllm does not use or does itself. Its request, latency,
time-to-first-token, token and deployment-health series stay."""


def litellm_config(plan: Plan, spec: Spec | None = None) -> dict[str, Any]:
    """The LiteLLM proxy config as a dict. With ``spec``, a guard section that any request can
    meet adds our guardrail (input and output stages, zh-TW normalisation, system prompts)."""
    gw = plan.gateway
    router: dict[str, Any] = {
        "routing_strategy": gw.routing_strategy,
        "num_retries": gw.num_retries,
        "timeout": gw.request_timeout_s,
        "retry_after": 0,
        "cooldown_time": gw.cooldown_s,
        "allowed_fails": gw.allowed_fails,
        # A request the engine refuses is refused again on any replica: answer it at once.
        # Only an engine that cannot be reached (or fails with 5xx) is worth another replica.
        "retry_policy": {
            "BadRequestErrorRetries": 0,
            "AuthenticationErrorRetries": 0,
            "NotFoundErrorRetries": 0,
            "ContentPolicyViolationErrorRetries": 0,
            "RateLimitErrorRetries": 0,
            # LiteLLM reports some failures to reach a dead engine as timeouts: try another replica
            "TimeoutErrorRetries": gw.num_retries,
            "InternalServerErrorRetries": gw.num_retries,
            "ServiceUnavailableErrorRetries": gw.num_retries,
            "DefaultRetries": gw.num_retries,
        },
        # No pre-call context checks: the engine knows its context window and refuses an
        # overlong prompt itself (the gateway answers 400 context_length_exceeded with the
        # engine's message), and LiteLLM's token counting logs an ERROR for every request.
        "enable_pre_call_checks": False,
    }
    if gw.fallbacks:
        router["fallbacks"] = [{name: list(targets)} for name, targets in gw.fallbacks.items()]
    if gw.context_window_fallbacks:
        router["context_window_fallbacks"] = [
            {name: list(targets)} for name, targets in gw.context_window_fallbacks.items()
        ]
    if gw.aliases:
        # A second name of the model's deployments (not a model of its own): /v1/models lists it,
        # and a request for it is routed, retried and falls back as the model.
        router["model_group_alias"] = dict(gw.aliases)
    if any(r.rpm or r.tpm for r in plan.routes):
        router["optional_pre_call_checks"] = ["enforce_model_rate_limits"]
    replicas = Counter(r.model_name for r in plan.routes)
    policies = GuardPolicies.from_settings(guard_settings(spec, plan)) if spec is not None else None
    # A guard model served by the deployment answers the guard on its engine, never clients.
    internal = set(policies.remote) if policies is not None else set()
    config: dict[str, Any] = {
        "model_list": [
            _deployment(r, gw.request_timeout_s, replicas[r.model_name] > 1)
            for r in plan.routes
            if r.model_name not in internal
        ],
        "router_settings": router,
        "litellm_settings": {
            "drop_params": True,
            "request_timeout": gw.request_timeout_s,
            "telemetry": False,
            # The spend ledger: an instance (LiteLLM refuses a class), found on the import path.
            "callbacks": [SPEND_LOGGER],
        },
        "general_settings": {
            "master_key": f"os.environ/{gw.master_key_env}",
            # Master and tenant keys, models, rate limits and budgets (twllm.accounting.auth).
            "custom_auth": "twllm.accounting.hooks.user_api_key_auth",
            "background_health_checks": True,
            "health_check_interval": gw.health_check_interval_s,
            "enable_health_check_routing": True,
            "disable_spend_logs": True,
            "store_model_in_db": False,
            # Response ids of /v1/responses are encrypted with the master key (LiteLLM's
            # ResponsesIDSecurity); its default cipher needs PyNaCl, AES-GCM `cryptography` only.
            "encryption_algorithm": "aes-256-gcm",
        },
    }
    if spec is not None and spec.monitoring.metrics.enabled:
        settings = config["litellm_settings"]
        settings["callbacks"].append(PROMETHEUS_CALLBACK)
        settings["prometheus_exclude_labels"] = list(PROMETHEUS_EXCLUDED_LABELS)
        settings["prometheus_exclude_metrics"] = list(PROMETHEUS_EXCLUDED_METRICS)
    if policies is not None and policies.active():
        # One guardrail, on for every request; it reads its policies from gateway.json.
        config["guardrails"] = [
            {
                "guardrail_name": GUARDRAIL_NAME,
                "litellm_params": {"guardrail": GUARDRAIL_CLASS, "mode": ["pre_call", "post_call"], "default_on": True},
            }
        ]
    return config


REPLICA_DOWN_POLICY = {
    "InternalServerErrorAllowedFails": 0,
    "ServiceUnavailableErrorAllowedFails": 0,
    "BadGatewayErrorAllowedFails": 0,
}
"""A replica whose engine fails (5xx, or cannot be reached: LiteLLM reports a refused connection
as a 500) is taken out of rotation at its first failure, for ``gateway.cooldown_s``, while
another replica of the model serves. LiteLLM's default waits for several failures a minute, and
a retry may pick the dead replica again; background health checks bring it back."""


def _deployment(route: Route, timeout: float, has_siblings: bool = False) -> dict[str, Any]:
    params: dict[str, Any] = {
        "model": route.provider_model,
        "api_base": route.api_base,
        "timeout": timeout,
        # No prices here: LiteLLM would register a deployment's custom price into its model
        # cost map on every request (≈8 % of a worker's CPU). The ledger prices from the spec
        # (gateway.json); LiteLLM reads the same prices once, from model_info below.
    }
    if route.api_key_env:
        params["api_key"] = f"os.environ/{route.api_key_env}"
    if route.rpm:
        params["rpm"] = route.rpm
    if route.tpm:
        params["tpm"] = route.tpm
    info: dict[str, Any] = {
        "id": route.deployment_id,
        # Also what LiteLLM's background health check calls: a reranker is checked with a rerank.
        "mode": {"embed": "embedding", "rerank": "rerank"}.get(route.task, "chat"),
        "input_cost_per_token": route.input_cost_per_token,
        "output_cost_per_token": route.output_cost_per_token,
        # Prompt tokens served from vLLM's prefix cache cost tenants the same as any others.
        "cache_read_input_token_cost": route.input_cost_per_token,
        "cache_creation_input_token_cost": route.input_cost_per_token,
        "twllm_engine": route.engine_id,
        "twllm_currency": route.currency,
    }
    if route.max_input_tokens:
        info["max_input_tokens"] = route.max_input_tokens
    if has_siblings:
        info["allowed_fails_policy"] = dict(REPLICA_DOWN_POLICY)
        if route.provider_model.startswith("hosted_vllm/"):
            # Probed by each gateway worker: a replica that does not answer gets no requests
            # (twllm.gateway.readiness; a restarted vLLM listens long before it serves).
            info["twllm_health_url"] = route.api_base.rstrip("/").removesuffix("/v1") + "/health"
            # ...instead of LiteLLM's background check (a completion every health_check_interval_s,
            # 30 s): a replica it once found down stayed out of rotation until its next run, and a
            # restarted engine took its first request 15-26 s after it answered (chaos test).
            info["disable_background_health_check"] = True
    return {"model_name": route.model_name, "litellm_params": params, "model_info": info}


def guard_settings(spec: Spec, plan: Plan | None = None) -> GuardSettings:
    """gateway.json's ``guard`` section: the spec's layers (gateway-wide, each model's own, the
    named policies) and where each guard model served by this deployment answers."""
    remote: dict[str, RemoteGuardSettings] = {}
    if plan is not None:
        for name in sorted(served_guard_models(spec)):
            routes = [r for r in plan.routes if r.model_name == name]
            remote[name] = RemoteGuardSettings(
                api_bases=tuple(r.api_base for r in routes),
                api_key_env=routes[0].api_key_env if routes else None,
            )
    return GuardSettings.model_validate({**spec_layers(spec), "remote": remote})


def gateway_settings(plan: Plan, spec: Spec) -> GatewaySettings:
    """What our hooks inside the gateway read (never prod.yaml itself): gateway.json's content."""
    deployments: dict[str, list[str]] = {}
    for route in plan.routes:
        deployments.setdefault(route.model_name, []).append(route.deployment_id)
    first = {name: next(r for r in plan.routes if r.model_name == name) for name in deployments}
    return GatewaySettings(
        name=plan.name,
        spec_file=plan.spec_file,
        state_dir=plan.state_dir,
        master_key_env=plan.gateway.master_key_env,
        database=DatabaseSettings(
            embedded=plan.database.embedded, url_env=plan.database.url_env, url=plan.database.url
        ),
        guard=guard_settings(spec, plan),
        http=HttpSettings(
            max_request_bytes=plan.gateway.max_request_bytes,
            cors_origins=plan.gateway.cors_origins,
            fast_path=plan.gateway.fast_path,
        ),
        metrics=MetricsSettings(enabled=spec.monitoring.metrics.enabled, port=spec.monitoring.metrics.port),
        models={
            name: ModelSettings(
                task=route.task,
                price=PriceSettings(
                    input_per_token=route.input_cost_per_token,
                    output_per_token=route.output_cost_per_token,
                    currency=route.currency,
                ),
                deployments=tuple(deployments[name]),
            )
            for name, route in first.items()
        },
        routing=RoutingSettings(
            aliases=dict(plan.gateway.aliases),
            fallbacks={k: list(v) for k, v in plan.gateway.fallbacks.items()},
            context_window_fallbacks={k: list(v) for k, v in plan.gateway.context_window_fallbacks.items()},
        ),
    )


def render(plan: Plan, spec: Spec, out: Path) -> list[Path]:
    """Write the LiteLLM config, gateway settings and plan into ``out``, each replaced atomically
    (0600, twllm.files.write_atomic); return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    files = {
        LITELLM_CONFIG: "# Rendered by twllm from the deployment spec; edit the spec, not this file.\n"
        + yaml.safe_dump(litellm_config(plan, spec), sort_keys=False, allow_unicode=True),
        GATEWAY_SETTINGS: gateway_settings(plan, spec).to_json(),
        PLAN_FILE: plan.to_json(),
    }
    written = []
    for name, text in files.items():
        write_atomic(out / name, text)
        written.append(out / name)
    return written
