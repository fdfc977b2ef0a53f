"""The gateway's public model names as keys' allow-lists see them: models, aliases and fallbacks.

An alias is its model under a second name, not a model of its own (same engines, price, guard,
fallbacks). So an allow-list names models, whichever of a model's names it uses: a key allowed
``gpt-4o-mini`` (an alias of ``taide-8b``) may call ``gpt-4o-mini`` and ``taide-8b``, a key
allowed ``taide-8b`` may call both too, and ``/v1/models`` lists both names for either key.

A model a key may not use never answers it, not even as a fallback: ``allowed_fallbacks`` gives
the router's fallbacks with those targets left out, which the accounting hooks hand the router
as the request's own fallbacks (a fallback is skipped, never refused: the key's request still
runs on the models it may use, and fails as it would without that fallback if they all fail).
LiteLLM's proxy (1.108) also checks each router fallback against ``UserAPIKeyAuth.models`` (its
``general_settings.enforce_fallback_model_access``, on by default); this does not rely on it.

Pure: built from gateway.json's ``routing`` and ``models`` sections (``from_settings``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from twllm.gateway.settings import GatewaySettings

FallbackKind = Literal["fallbacks", "context_window_fallbacks"]


@dataclass(frozen=True)
class ModelNames:
    """Aliases, fallbacks and which deployment serves which model, for one gateway."""

    aliases: Mapping[str, str] = field(default_factory=dict)
    """Alias -> model."""
    fallbacks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Model or alias -> models tried in order when it fails."""
    context_window_fallbacks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Model or alias -> models tried in order when a prompt exceeds its context window."""
    deployments: Mapping[str, str] = field(default_factory=dict)
    """LiteLLM deployment id -> the model it serves."""

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> ModelNames:
        routing = settings.routing
        return cls(
            aliases=dict(routing.aliases),
            fallbacks={k: tuple(v) for k, v in routing.fallbacks.items()},
            context_window_fallbacks={k: tuple(v) for k, v in routing.context_window_fallbacks.items()},
            deployments={d: name for name, m in settings.models.items() for d in m.deployments},
        )

    def model(self, name: str) -> str:
        """The model a name calls (an alias's model; any other name is itself)."""
        return self.aliases.get(name, name)

    def allowed(self, key_models: Iterable[str]) -> frozenset[str]:
        """Every name an allow-list lets a key call: its names, their models and their aliases."""
        names = set(key_models)
        models = {self.model(n) for n in names}
        return frozenset(names | models | {a for a, m in self.aliases.items() if m in models})

    def listed(self, key_models: Sequence[str]) -> list[str]:
        """The allow-list as ``/v1/models`` shows it: the key's own names in their order, then
        the other names of the same models."""
        allowed = self.allowed(key_models)
        return list(dict.fromkeys([*key_models, *sorted(allowed - set(key_models))]))

    def answered(self, deployment_id: str | None, name: str | None) -> str:
        """The model that answered a request: the one whose deployment it was, else the model
        ``name`` (a model group LiteLLM reported, maybe an alias) calls."""
        if deployment_id and deployment_id in self.deployments:
            return self.deployments[deployment_id]
        return self.model(name or "")

    def allowed_fallbacks(self, allowed: frozenset[str], kind: FallbackKind) -> list[dict[str, list[str]]] | None:
        """The router's ``kind`` fallbacks, in LiteLLM's shape, without the targets outside
        ``allowed``; None when none is left out (the router's own then apply unchanged)."""
        rules: Mapping[str, tuple[str, ...]] = getattr(self, kind)
        kept = {source: [t for t in targets if t in allowed] for source, targets in rules.items()}
        if all(len(kept[s]) == len(t) for s, t in rules.items()):
            return None
        return [{source: targets} for source, targets in kept.items() if targets]
