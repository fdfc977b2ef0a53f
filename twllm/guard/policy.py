"""Which guard settings apply to one request: gateway-wide, then the model's, then the tenant's.

The gateway never reads prod.yaml; it reads the ``guard`` section of gateway.json, which
``guard_settings(spec, plan)`` writes. ``GuardPolicies`` resolves that section the same way in the
gateway and in ``twllm guard check``, so the ops tool shows exactly the live verdicts.

Layering, each layer replacing only what it sets::

    guard (gateway-wide)  <  models[i].guard, models[i].zh_tw  <  guard.policies[<tenant's policy>]

A tenant's (or key's) policy comes last so that it can tighten what a model allows.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from twllm.deploy.spec import GuardPolicySpec, GuardSpec

if TYPE_CHECKING:
    from twllm.deploy.plan import Plan
    from twllm.deploy.spec import Spec


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


@dataclass(frozen=True)
class ModelGuard:
    """A model's own guard settings, as gateway.json holds them."""

    override: dict[str, Any] = field(default_factory=dict)
    zh_tw: bool | None = None
    system_prompt: str | None = None
    task: str = "chat"


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def override_dict(policy: GuardPolicySpec | None) -> dict[str, Any]:
    """Only what a policy sets, nested sections included (``pii: {action: block}`` keeps the
    inherited entity list)."""
    if policy is None:
        return {}
    return policy.model_dump(mode="json", exclude_unset=True)


def _with_zh_tw(data: dict[str, Any], on: bool | None) -> dict[str, Any]:
    if on is None:
        return data
    output = [s for s in data.get("output", []) if s != "zh_tw"]
    if on:
        output.append("zh_tw")
    return {**data, "output": output}


class GuardPolicies:
    """The gateway's guard section, resolved per (model, policy) and cached."""

    def __init__(
        self,
        base: Mapping[str, Any],
        *,
        models: Mapping[str, ModelGuard] | None = None,
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
    def from_settings(cls, guard: Mapping[str, Any] | None) -> GuardPolicies:
        """From gateway.json's ``guard`` section (see ``guard_settings``)."""
        guard = dict(guard or {})
        models = {name: ModelGuard(override=dict(m.get("override") or {}), zh_tw=m.get("zh_tw"),
                                   system_prompt=m.get("system_prompt"), task=m.get("task") or "chat")
                  for name, m in (guard.get("models") or {}).items()}
        remote = {name: RemoteGuard(model=name, api_bases=tuple(r["api_bases"]), api_key_env=r.get("api_key_env"))
                  for name, r in (guard.get("remote") or {}).items()}
        return cls(guard.get("base") or {}, models=models, policies=guard.get("policies") or {}, remote=remote)

    @classmethod
    def from_spec(cls, spec: Spec, plan: Plan | None = None) -> GuardPolicies:
        return cls.from_settings(guard_settings(spec, plan))

    # --- resolving -----------------------------------------------------------------------------
    def resolve(self, model: str | None = None, policy: str | None = None) -> GuardSpec:
        """The guard settings for a request to ``model`` by a key with ``policy``.
        ``UnknownPolicy`` when the policy is not defined."""
        key = (model, policy)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        data = dict(self.base)
        data.pop("policies", None)
        own = self.models.get(model or "")
        if own is not None:
            data = _with_zh_tw(_merge(data, own.override), own.zh_tw)
        if policy:
            if policy not in self.policies:
                raise UnknownPolicy(policy)
            data = _merge(data, self.policies[policy])
        spec = GuardSpec.model_validate(data)
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


def served_guard_models(spec: Spec) -> set[str]:
    """Models of the spec that some layer names as its Llama Guard (served by an engine here)."""
    referenced = {spec.guard.llama_guard.model}
    referenced |= {p.llama_guard.model for p in spec.guard.policies.values() if p.llama_guard}
    referenced |= {m.guard.llama_guard.model for m in spec.models if m.guard and m.guard.llama_guard}
    return referenced & {m.name for m in spec.models}


def guard_settings(spec: Spec, plan: Plan | None = None) -> dict[str, Any]:
    """gateway.json's ``guard`` section: the gateway-wide settings, each model's own, the named
    policies, and where a guard model served by this deployment answers."""
    base = spec.guard.model_dump(mode="json", exclude={"policies"})
    models = {}
    for m in spec.models:
        if m.guard is not None or m.zh_tw is not None or m.system_prompt is not None:
            models[m.name] = {"override": override_dict(m.guard), "zh_tw": m.zh_tw,
                              "system_prompt": m.system_prompt, "task": m.task or "chat"}
    remote: dict[str, Any] = {}
    if plan is not None:
        for name in sorted(served_guard_models(spec)):
            routes = [r for r in plan.routes if r.model_name == name]
            remote[name] = {"api_bases": [r.api_base for r in routes],
                            "api_key_env": routes[0].api_key_env if routes else None}
    return {
        "base": base,
        "models": models,
        "policies": {name: override_dict(p) for name, p in spec.guard.policies.items()},
        "remote": remote,
    }
