"""gateway.json: what twllm's hooks inside the gateway read, as one frozen pydantic model.

The render (``twllm.render.litellm_config.gateway_settings``) builds a ``GatewaySettings`` from
the plan and the spec and writes ``to_json()``; every hook reads the file back through
``GatewaySettings.load`` (found through ``TWLLM_GATEWAY_SETTINGS``):

- ``twllm.accounting.gateway_config``: ``master_key_env``, ``database``, ``models`` (prices,
  deployments), ``routing`` (aliases and fallbacks, for keys' allow-lists);
- ``twllm.guard``: ``guard`` (the spec's guard layers and the guard models served here);
- ``twllm.console``: ``state_dir`` (components' health from state.json);
- ``twllm.gateway.asgi``: ``http`` (the shield's body limit and CORS origins) and ``metrics``
  (``twllm.gateway.serve`` and ``twllm.gateway.scrape``: where /metrics is served).

Every section and field has a default, so a hand-written file may leave out what it does not
need; a key this twllm does not know is a ``ContractError`` (also a ValueError) naming it. This
module imports nothing of twllm's but its errors, so the gateway process, the render and the
runtime may all import it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from twllm.errors import ContractError

DEFAULT_MAX_REQUEST_BYTES = 10 * 1024 * 1024
REWRITE_HINT = "deploy (or render) the spec again to rewrite gateway.json"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=(), use_attribute_docstrings=True)


class DatabaseSettings(_Section):
    """Where the accounting hooks find PostgreSQL (when ``TWLLM_DATABASE_URL`` does not say)."""

    embedded: bool = True
    url_env: str | None = None
    """The variable holding the URL (the URL itself is a secret)."""
    url: str | None = None
    """A literal URL without a password."""


class PriceSettings(_Section):
    """What one token of a model costs tenants (from the spec, never LiteLLM's price map)."""

    input_per_token: float = 0.0
    output_per_token: float = 0.0
    currency: str | None = None
    """None: the ledger's default currency."""


class ModelSettings(_Section):
    """One client-facing model."""

    task: str = "chat"
    price: PriceSettings = Field(default_factory=PriceSettings)
    deployments: tuple[str, ...] = ()
    """LiteLLM deployment ids serving it (one per replica)."""


class ModelGuardSettings(_Section):
    """A model's own guard layer."""

    override: dict[str, Any] = Field(default_factory=dict)
    """What the model's ``guard`` sets (only that), laid over the gateway-wide layer."""
    zh_tw: bool | None = None
    system_prompt: str | None = None
    task: str = "chat"


class RemoteGuardSettings(_Section):
    """A guard model served by one of the deployment's engines."""

    api_bases: tuple[str, ...]
    """One per replica."""
    api_key_env: str | None = None


class GuardSettings(_Section):
    """The spec's guard layers (``twllm.spec.guard_layers.spec_layers``) and the served guard models.

    ``base``, ``override`` and ``policies`` hold the spec's guard settings as plain data; they are
    validated as ``GuardSpec`` once layered (``twllm.guard.policy``)."""

    base: dict[str, Any] = Field(default_factory=dict)
    """The gateway-wide layer (the spec's ``guard`` without ``policies``)."""
    models: dict[str, ModelGuardSettings] = Field(default_factory=dict)
    policies: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Policy name -> only what the policy sets."""
    remote: dict[str, RemoteGuardSettings] = Field(default_factory=dict)
    """Guard model name -> where the deployment's engines serve it."""


class HttpSettings(_Section):
    """What the shield enforces."""

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    cors_origins: tuple[str, ...] = ()
    fast_path: bool = True
    """twllm forwards the requests that need nothing of LiteLLM's itself (twllm.gateway.forward)."""


class MetricsSettings(_Section):
    """Where the gateway serves /metrics (the spec's ``monitoring.metrics``)."""

    enabled: bool = False
    """Off in a hand-written file that leaves the section out; the render writes the spec's value."""
    port: int | None = None
    """None: /metrics on the gateway's port, behind the master key. A port: a separate plain
    listener on the gateway's host that serves /metrics only, without a key (and the gateway's
    own port answers 404 there)."""


class RoutingSettings(_Section):
    """The gateway's public names beyond the models' own, and where a failed request goes next
    (the spec's gateway.aliases, fallbacks and context_window_fallbacks, as the plan resolved
    them): the accounting hooks check keys' allow-lists against them."""

    aliases: dict[str, str] = Field(default_factory=dict)
    """Alias -> model."""
    fallbacks: dict[str, list[str]] = Field(default_factory=dict)
    """Model or alias -> models tried in order when it fails."""
    context_window_fallbacks: dict[str, list[str]] = Field(default_factory=dict)
    """Model or alias -> models tried in order when a prompt exceeds its context window."""


class GatewaySettings(_Section):
    """The whole of gateway.json."""

    name: str | None = None
    """The deployment's name."""
    spec_file: str | None = None
    state_dir: str | None = None
    """The deployment's state folder, where the supervisor writes state.json (``twllm.status``):
    the console's health view reads it. None: the console shows no component health."""
    master_key_env: str | None = None
    """The variable holding the master key (None or empty: TWLLM_MASTER_KEY)."""
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    guard: GuardSettings = Field(default_factory=GuardSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    models: dict[str, ModelSettings] = Field(default_factory=dict)
    """Client-facing model name -> its task, price and deployments."""
    routing: RoutingSettings = Field(default_factory=RoutingSettings)

    def to_json(self) -> str:
        """gateway.json's text: indented, UTF-8 kept as is, ending in a newline."""
        return json.dumps(self.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "gateway.json") -> GatewaySettings:
        """Settings from ``to_json``'s text; ``ContractError`` (naming ``source`` and the field) when
        it is not JSON, has a key this twllm does not know, or mistypes a field."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise ContractError.from_validation(
                f"{source} is not gateway settings this twllm can read", exc.errors(), hint=REWRITE_HINT
            ) from None

    @classmethod
    def load(cls, path: Path | str) -> GatewaySettings:
        """The settings in ``path`` (OSError when it cannot be read, ContractError when invalid)."""
        return cls.from_json(Path(path).read_bytes(), source=str(path))
