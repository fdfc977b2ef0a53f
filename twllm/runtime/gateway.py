"""The gateway component: the LiteLLM proxy started from the rendered config, with our hooks."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

import httpx

from twllm.plan.model import GatewayPlan
from twllm.render.litellm_config import GATEWAY_SETTINGS, LITELLM_CONFIG
from twllm.runtime.engines.base import Launch
from twllm.settings import (
    DATABASE_URL_ENV,
    ENGINE_KEY_ENV,
    GATEWAY_SETTINGS_ENV,
    PROMETHEUS_MULTIPROC_DIR_ENV,
    SPOOL_DIR_ENV,
)

PROBE_TEXT = "ping"


def gateway_launch(
    gw: GatewayPlan,
    rendered: Path,
    secrets: Mapping[str, str],
    database_url: str | None = None,
    spool_dir: Path | None = None,
    metrics_dir: Path | None = None,
) -> Launch:
    """The gateway command: LiteLLM's proxy app behind twllm's shield (``twllm.gateway.serve``),
    run with twllm's own Python so our hooks import. ``metrics_dir``: the private folder where
    every worker keeps its Prometheus series (``twllm.gateway.serve`` empties it at each start)."""
    argv = [
        sys.executable,
        "-m",
        "twllm.gateway.serve",
        "--config",
        str(rendered / LITELLM_CONFIG),
        "--host",
        gw.host,
        "--port",
        str(gw.port),
        "--workers",
        str(gw.workers),
    ]
    if gw.tls_cert and gw.tls_key:
        argv += ["--ssl-certfile", gw.tls_cert, "--ssl-keyfile", gw.tls_key]
    env = {
        GATEWAY_SETTINGS_ENV: str(rendered / GATEWAY_SETTINGS),
        # Prices come from the spec; never fetch LiteLLM's price list at start.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_OFFLINE_MODE": "true",
        "LITELLM_DONT_SHOW_FEEDBACK_BOX": "true",
        "PYTHONUNBUFFERED": "1",
        gw.master_key_env: secrets[gw.master_key_env],
        ENGINE_KEY_ENV: secrets[ENGINE_KEY_ENV],
    }
    if database_url:
        env[DATABASE_URL_ENV] = database_url
    if spool_dir is not None:
        # In the state dir, not beside gateway.json: rendered/ is replaced on every redeploy.
        env[SPOOL_DIR_ENV] = str(spool_dir)
    if metrics_dir is not None:
        env[PROMETHEUS_MULTIPROC_DIR_ENV] = str(metrics_dir)
    return Launch(argv=argv, env=env, cwd=rendered)


def gateway_ready(gw: GatewayPlan, master_key: str, timeout: float = 30.0) -> bool:
    """True once a real request through the gateway succeeds (a chat, else an embedding)."""
    base = gw.url.rstrip("/")
    headers = {"Authorization": f"Bearer {master_key}"}
    try:
        if gw.probe_model is not None:
            body = {
                "model": gw.probe_model,
                "max_tokens": 1,
                "temperature": 0,
                "messages": [{"role": "user", "content": PROBE_TEXT}],
            }
            reply = httpx.post(
                f"{base}/chat/completions",
                json=body,
                headers=headers,
                timeout=timeout,
                trust_env=False,
                verify=_verify(gw),
            )
        elif gw.probe_embed_model is not None:
            body = {"model": gw.probe_embed_model, "input": PROBE_TEXT}
            reply = httpx.post(
                f"{base}/embeddings", json=body, headers=headers, timeout=timeout, trust_env=False, verify=_verify(gw)
            )
        else:
            reply = httpx.get(f"{base}/models", headers=headers, timeout=timeout, trust_env=False, verify=_verify(gw))
    except httpx.HTTPError:
        return False
    return reply.status_code == 200


def gateway_listening(gw: GatewayPlan) -> bool:
    """True once the proxy answers its liveness route (before engines are asked)."""
    try:
        url = gw.url.rstrip("/").removesuffix("/v1") + "/health/liveliness"
        return httpx.get(url, timeout=2, trust_env=False, verify=_verify(gw)).status_code == 200
    except httpx.HTTPError:
        return False


def _verify(gw: GatewayPlan) -> bool:
    """The supervisor's own probes of its gateway on loopback do not check the certificate (it
    may be issued for the public name, or self-signed); clients do."""
    return not gw.tls_cert
