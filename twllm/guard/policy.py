"""Which guard settings apply to one request: gateway-wide, then the model's, then the tenant's.

The gateway never reads prod.yaml; it reads the ``guard`` section of gateway.json, which the
render writes (``twllm.render.litellm_config.guard_settings``). ``GuardPolicies`` resolves that
section with the spec's layering rules (``twllm.spec.guard_layers``) the same way in the gateway and
in ``twllm guard check``, so the ops tool shows exactly the live verdicts. A tenant's (or key's)
policy comes last so that it can tighten what a model allows.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twllm.gateway.settings import GuardSettings, ModelGuardSettings
from twllm.spec.guard_layers import layered, spec_layers
from twllm.spec.schema import GuardSpec, Spec


class UnknownPolicy(KeyError):
    """A key or tenant names a policy the spec does not define."""


@dataclass(frozen=True)
class RemoteGuard:
    """A guard model served by one of the deployment's engines (OpenAI-compatible)."""

    model: str
    """The served model name."""
    api_bases: tuple[str, ...]
    """One per replica; checks go round-robin."""
    api_key_env: str | None


class GuardPolicies:
    """The gateway's guard section, resolved per (model, policy) and cached."""

    def __init__(
        self,
        base: Mapping[str, Any],
        *,
        models: Mapping[str, ModelGuardSettings] | None = None,
        policies: Mapping[str, Mapping[str, Any]] | None = None,
        remote: Mapping[str, RemoteGuard] | None = None,
    ) -> None:
        self.base = dict(base)
        self.models = dict(models or {})
        self.policies = {name: dict(p) for name, p in (policies or {}).items()}
        self.remote = dict(remote or {})
        self._cache: dict[tuple[str | None, str | None], GuardSpec] = {}
        self._lock = threading.Lock()

    # --- building ------------------------------------------------------------------------------
    @classmethod
    def from_settings(cls, guard: GuardSettings | Mapping[str, Any] | None) -> GuardPolicies:
        """From gateway.json's ``guard`` section (``GatewaySettings.load(path).guard``), or the
        same as plain data (validated as a ``GuardSettings`` first)."""
        if not isinstance(guard, GuardSettings):
            guard = GuardSettings.model_validate(dict(guard or {}))
        remote = {
            name: RemoteGuard(model=name, api_bases=tuple(r.api_bases), api_key_env=r.api_key_env)
            for name, r in guard.remote.items()
        }
        return cls(guard.base, models=guard.models, policies=guard.policies, remote=remote)

    @classmethod
    def from_spec(cls, spec: Spec) -> GuardPolicies:
        """Straight from a spec, without the deployment's served guard models (``twllm guard check``)."""
        return cls.from_settings(spec_layers(spec))

    # --- resolving -----------------------------------------------------------------------------
    def resolve(self, model: str | None = None, policy: str | None = None) -> GuardSpec:
        """The guard settings for a request to ``model`` by a key with ``policy``.
        ``UnknownPolicy`` when the policy is not defined."""
        key = (model, policy)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        own = self.models.get(model or "")
        if policy and policy not in self.policies:
            raise UnknownPolicy(policy)
        spec = layered(
            self.base, (own.override, own.zh_tw) if own is not None else None, self.policies[policy] if policy else None
        )
        with self._lock:
            self._cache[key] = spec
        return spec

    def system_prompt(self, model: str | None) -> str | None:
        own = self.models.get(model or "")
        if own is not None and own.system_prompt:
            return own.system_prompt
        return (self.base.get("zh_tw") or {}).get("system_prompt") or None

    def active(self) -> bool:
        """Whether any request can meet a stage or a system prompt (else the hook is not rendered)."""
        layers = [self.base, *self.policies.values(), *(m.override for m in self.models.values())]
        if any(layer.get("input") or layer.get("output") for layer in layers):
            return True
        return any(m.zh_tw or m.system_prompt for m in self.models.values()) or bool(self.system_prompt(None))
