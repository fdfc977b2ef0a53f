"""The Plan as data: frozen pydantic models, and plan.json, the one file they are written to and read from.

``make_plan`` (twllm.plan.build) makes a Plan; the runtime writes it with ``Plan.to_json`` to
``<state_dir>/plan.json`` (and beside the rendered gateway files), and the supervisor and the
database URL lookup read it back with ``Plan.read`` / ``Plan.from_json``. A key this twllm does
not know, or a missing or mistyped field, is a ``ContractError`` naming the field, never a
silently different plan.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from twllm.errors import ContractError

REWRITE_HINT = "deploy (or render) the spec again to rewrite plan.json"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=(), use_attribute_docstrings=True)


class EngineProcess(_Frozen):
    """One engine process to run."""

    id: str
    """Component name: `vllm-<model>-<replica>` or `ollama`."""
    engine: str
    device: str
    models: tuple[str, ...]
    """Client-facing names this process serves."""
    argv: tuple[str, ...]
    """Command line; argv[0] is the engine's executable name, resolved by the runtime."""
    env: dict[str, str]
    """Environment set for the process (no secrets)."""
    secret_env: dict[str, str]
    """Child variable -> variable of the deployment's environment holding the secret."""
    host: str
    port: int
    gpus: tuple[int, ...]
    ready_url: str
    """Polled until it lists the served models."""
    start_timeout_s: float = 900.0
    provision: tuple[dict[str, str], ...] = ()
    """Ollama only: models to pull or create before the engine counts as ready."""


class Route(_Frozen):
    """One LiteLLM deployment: a client model name mapped to one engine endpoint."""

    model_name: str
    deployment_id: str
    provider_model: str
    api_base: str
    engine_id: str
    task: str
    input_cost_per_token: float
    output_cost_per_token: float
    currency: str
    max_input_tokens: int | None
    rpm: int | None
    tpm: int | None
    api_key_env: str | None


class GatewayPlan(_Frozen):
    """The gateway process."""

    host: str
    port: int
    workers: int
    url: str
    master_key_env: str
    request_timeout_s: float
    num_retries: int
    routing_strategy: str
    cooldown_s: float
    allowed_fails: int
    health_check_interval_s: int
    fallbacks: dict[str, list[str]]
    start_timeout_s: float = 180.0
    aliases: dict[str, str] = {}
    """Alias -> model: other names of a model (LiteLLM's model_group_alias)."""
    context_window_fallbacks: dict[str, list[str]] = {}
    """Model or alias -> models tried when a prompt exceeds its context window."""
    probe_model: str | None = None
    """A chat model the readiness check asks through the gateway (None: embeddings only)."""
    probe_embed_model: str | None = None
    max_request_bytes: int = 10 * 1024 * 1024
    tls_cert: str | None = None
    tls_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    fast_path: bool = True


class DatabasePlan(_Frozen):
    """Where keys and spend are kept."""

    embedded: bool
    data_dir: str | None
    port: int | None
    """Port of the embedded server (127.0.0.1)."""
    url_env: str | None
    url: str | None
    """A literal URL without a password (secrets are only referenced through url_env)."""
    retention_days: int | None = None


class ScrapeTarget(_Frozen):
    """One /metrics endpoint Prometheus scrapes."""

    job: str
    """twllm-gateway | vllm | twllm-supervisor (prometheus.yml's job_name)."""
    component: str
    """The component it belongs to (its ``component`` label)."""
    scheme: str
    address: str
    """host:port."""
    path: str = "/metrics"
    bearer_env: str | None = None
    """Variable of the deployment's environment holding the bearer token (the master key); None:
    the endpoint needs none."""
    labels: dict[str, str] = Field(default_factory=dict)


class PrometheusPlan(_Frozen):
    """The embedded Prometheus, one more supervised component (started after the gateway)."""

    port: int
    """Where it listens (127.0.0.1)."""
    config_file: str
    """The rendered prometheus.yml it reads."""
    data_dir: str
    retention_days: int
    argv: tuple[str, ...]
    """argv[0] is ``prometheus``, found on PATH by the runtime."""
    ready_url: str
    start_timeout_s: float = 60.0


class MonitoringPlan(_Frozen):
    """Metrics endpoints, what scrapes them, and where the scraper's bearer token is kept."""

    metrics_enabled: bool
    """The gateway serves /metrics and the supervisor its component metrics."""
    scrape_interval_s: int
    supervisor_port: int | None
    """Where the supervisor serves twllm_component_* (127.0.0.1); None when metrics are off."""
    credentials_file: str
    """The file prometheus.yml names for the gateway's bearer token (the embedded Prometheus's
    component writes the master key there, 0600; the key itself is never rendered)."""
    targets: tuple[ScrapeTarget, ...]
    prometheus: PrometheusPlan | None = None
    """None: no embedded Prometheus (``monitoring.prometheus: off``)."""


class Plan(_Frozen):
    """The whole deployment as plain data; plan.json is ``to_json()``, read back by ``from_json``."""

    name: str
    spec_file: str | None
    state_dir: str
    gpus_total: int
    gateway: GatewayPlan
    database: DatabasePlan
    engines: tuple[EngineProcess, ...]
    routes: tuple[Route, ...]
    notes: tuple[str, ...] = Field(default=())
    vllm_python: str | None = None
    """The spec's engines.vllm_python, if it names one."""
    monitoring: MonitoringPlan | None = None
    """Metrics and the embedded Prometheus (None only in plans made before monitoring existed)."""

    def engine(self, engine_id: str) -> EngineProcess:
        return next(e for e in self.engines if e.id == engine_id)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (lists for tuples), in field order."""
        return self.model_dump(mode="json")

    # --- plan.json -------------------------------------------------------------------------------
    def to_json(self) -> str:
        """plan.json's text: indented, UTF-8 kept as is, ending in a newline."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "plan.json") -> Plan:
        """A Plan from ``to_json``'s text; ``ContractError`` (naming ``source`` and the field) when
        it is not JSON, has a key this twllm does not know, or lacks or mistypes a field."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise ContractError.from_validation(
                f"{source} is not a plan this twllm can read", exc.errors(), hint=REWRITE_HINT
            ) from None

    @classmethod
    def read(cls, path: Path | str) -> Plan:
        """The plan in ``path`` (FileNotFoundError when there is none)."""
        return cls.from_json(Path(path).read_bytes(), source=str(path))
