"""How the spec's guard settings layer: gateway-wide, then a model's own, then a tenant's policy.

Each layer replaces only what it sets::

    guard (gateway-wide)  <  models[i].guard, models[i].zh_tw  <  guard.policies[<tenant's policy>]

The same rules serve `twllm validate` (which guard models the effective settings need) and the
gateway (``twllm.guard.policy``, which resolves them per request from gateway.json).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twllm.spec.schema import GuardPolicySpec, GuardSpec, Spec


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` laid over it, nested sections merged key by key."""
    merged = dict(base)
    for key, value in override.items():
        current = merged.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            merged[key] = merge(current, value)
        else:
            merged[key] = value
    return merged


def override_dict(policy: GuardPolicySpec | None) -> dict[str, Any]:
    """Only what a policy sets, nested sections included (``pii: {action: block}`` keeps the
    inherited entity list)."""
    if policy is None:
        return {}
    return policy.model_dump(mode="json", exclude_unset=True)


def with_zh_tw(data: dict[str, Any], on: bool | None) -> dict[str, Any]:
    """``data`` with the zh_tw output stage switched on or off (unchanged when ``on`` is None)."""
    if on is None:
        return data
    output = [s for s in data.get("output", []) if s != "zh_tw"]
    if on:
        output.append("zh_tw")
    return {**data, "output": output}


def layered(
    base: Mapping[str, Any],
    model: tuple[Mapping[str, Any], bool | None] | None = None,
    policy: Mapping[str, Any] | None = None,
) -> GuardSpec:
    """The effective guard settings: ``base``, then a model's (override, zh_tw), then a policy."""
    data = {k: v for k, v in base.items() if k != "policies"}
    if model is not None:
        data = with_zh_tw(merge(data, model[0]), model[1])
    if policy is not None:
        data = merge(data, policy)
    return GuardSpec.model_validate(data)


def spec_layers(spec: Spec) -> dict[str, Any]:
    """The spec's guard layers as plain data: ``base``, each model's own settings, the policies."""
    models = {}
    for m in spec.models:
        if m.guard is not None or m.zh_tw is not None or m.system_prompt is not None:
            models[m.name] = {
                "override": override_dict(m.guard),
                "zh_tw": m.zh_tw,
                "system_prompt": m.system_prompt,
                "task": m.task or "chat",
            }
    return {
        "base": spec.guard.model_dump(mode="json", exclude={"policies"}),
        "models": models,
        "policies": {name: override_dict(p) for name, p in spec.guard.policies.items()},
    }


def effective_guards(spec: Spec) -> list[GuardSpec]:
    """Every combination a request can meet alone: gateway-wide, each policy, each model."""
    layers = spec_layers(spec)
    found = [layered(layers["base"])]
    found += [layered(layers["base"], policy=p) for p in layers["policies"].values()]
    found += [layered(layers["base"], model=(m["override"], m["zh_tw"])) for m in layers["models"].values()]
    return found


def served_guard_models(spec: Spec) -> set[str]:
    """Models of the spec that some layer names as its Llama Guard (served by an engine here)."""
    referenced = {spec.guard.llama_guard.model}
    referenced |= {p.llama_guard.model for p in spec.guard.policies.values() if p.llama_guard}
    referenced |= {m.guard.llama_guard.model for m in spec.models if m.guard and m.guard.llama_guard}
    return referenced & {m.name for m in spec.models}
