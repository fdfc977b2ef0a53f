"""Load a spec file and resolve it against the model registry: `twllm validate` in one call.

Loading is parse (source.py) → shape and bounds (schema.py) → rules across models and against the
registry (here). Every problem becomes a SpecIssue with file, line and field path; all problems
found in one pass are reported together.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from twllm.errors import RegistryError, SpecError, SpecIssue, did_you_mean
from twllm.model_registry import ModelEntry, Registry, load_registry
from twllm.spec.guard_layers import effective_guards, served_guard_models
from twllm.spec.located_errors import issues_from_validation
from twllm.spec.schema import ArgValue, ModelSpec, Spec, path_problem
from twllm.spec.source import Path_, SpecSource, format_path, load_source, parse_source

# vLLM flags twllm sets from typed fields; engine_args may not set them behind the plan's back.
RESERVED_FLAGS = {
    "model": "model / source",
    "served-model-name": "name",
    "host": "engines.host",
    "port": "port",
    "tensor-parallel-size": "tensor_parallel",
    "pipeline-parallel-size": "pipeline_parallel",
    "max-model-len": "max_model_len",
    "dtype": "dtype",
    "quantization": "quantization",
    "gpu-memory-utilization": "gpu_memory_utilization",
    "api-key": "(managed by twllm)",
}


@dataclass(frozen=True)
class ResolvedModel:
    """A spec model with the registry's defaults filled in: everything the plan needs."""

    spec: ModelSpec
    entry: ModelEntry | None
    engine: str
    device: str
    task: str
    weights: str
    """What the engine loads: HF repo id, local path, GGUF path or Ollama tag."""
    weights_kind: str
    """hf | path | gguf | ollama."""
    dtype: str
    context_length: int | None
    engine_args: dict = field(default_factory=dict)
    gpus_per_replica: int = 0

    @property
    def name(self) -> str:
        return self.spec.name

    def weight_gib(self) -> float | None:
        """Estimated weight memory, or None when the model is not in the registry."""
        if self.entry is None:
            return None
        key: str | None = self.spec.quantization if self.spec.quantization in ("awq", "gptq", "fp8") else None
        if key is None:
            key = self.entry.default_dtype if self.dtype == "auto" else self.dtype
        return self.entry.weight_gib("int4" if key in ("awq", "gptq") else key)


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec, where it came from, and its models resolved against the registry."""

    spec: Spec
    source: SpecSource
    models: tuple[ResolvedModel, ...]
    path: Path | None = None
    local_folders: tuple[tuple[str, str], ...] = ()
    """(field, folder as written) of every guard model the spec gives as a local folder. The spec
    stage never looks at the disk; the runtime's preflight checks that each is a folder."""

    def model(self, name: str) -> ResolvedModel:
        return next(m for m in self.models if m.name == name)


def load_spec(path: Path, env: Mapping[str, str] | None = None, registry: Registry | None = None) -> LoadedSpec:
    """Read, validate and resolve the spec at ``path``; raise SpecError listing every problem."""
    source = load_source(Path(path), os.environ if env is None else env)
    return replace(_validate(source, registry), path=Path(path))


def parse_spec(
    text: str, name: str = "<spec>", env: Mapping[str, str] | None = None, registry: Registry | None = None
) -> LoadedSpec:
    """Like load_spec, from text (for tests and stdin)."""
    return _validate(parse_source(text, name, os.environ if env is None else env), registry)


def _validate(source: SpecSource, registry: Registry | None) -> LoadedSpec:
    try:
        spec = Spec.model_validate(source.data)
    except ValidationError as exc:
        raise SpecError(issues_from_validation(exc, source, Spec)) from None
    registry = registry or load_registry()
    checker = _Checker(source)
    models = tuple(checker.resolve(i, m, registry) for i, m in enumerate(spec.models))
    checker.cross_model(spec, registry)
    checker.routing(spec, models)
    if checker.issues:
        raise SpecError(sorted(checker.issues, key=lambda i: (i.line or 0, i.path)))
    return LoadedSpec(spec, source, models, local_folders=tuple(checker.local_folders))


class _Checker:
    """Collects located issues for the rules that span models or need the registry."""

    def __init__(self, source: SpecSource) -> None:
        self.source = source
        self.base = Path(source.file).parent if not source.file.startswith("<") else Path.cwd()
        self.issues: list[SpecIssue] = []
        self.local_folders: list[tuple[str, str]] = []

    def add(self, path: Path_, message: str) -> None:
        self.issues.append(SpecIssue(self.source.file, self.source.line_of(path), format_path(path), message))

    def resolve(self, index: int, m: ModelSpec, registry: Registry) -> ResolvedModel:
        at: Path_ = ("models", index)
        entry = None
        if m.model is not None:
            try:
                entry = registry.get(m.model)
            except RegistryError as exc:
                self.add((*at, "model"), exc.message)
        task = m.task or (_default_task(entry) if entry else "chat")
        if entry is not None:
            self._check_entry(at, m, entry, task)
        engine, device = m.resolved_engine, m.resolved_device
        if task == "rerank" and engine == "ollama":
            self.add((*at, "engine"), "Ollama has no rerank API; a reranker needs engine: vllm")
        weights, kind = _weights(m, entry, engine, self.base)
        if engine == "ollama" and weights is None and entry is not None:
            self.add(
                (*at, "model"),
                f"'{entry.id}' has no Ollama tag; give source.ollama or source.gguf, or use engine: vllm",
            )
        for flag in m.engine_args:
            if engine == "ollama":
                self.add(
                    (*at, "engine_args", flag),
                    "engine_args are vLLM flags; ollama takes its settings from the ollama section",
                )
            elif flag.lstrip("-") in RESERVED_FLAGS:
                self.add(
                    (*at, "engine_args", flag),
                    f"set by twllm; use the field `{RESERVED_FLAGS[flag.lstrip('-')]}` instead",
                )
        args: dict[str, ArgValue] = dict(entry.engine_args) if entry is not None and engine == "vllm" else {}
        args.update({k.lstrip("-"): v for k, v in m.engine_args.items()})
        return ResolvedModel(
            spec=m,
            entry=entry,
            engine=engine,
            device=device,
            task=task,
            weights=weights or "",
            weights_kind=kind,
            dtype=m.dtype,
            context_length=entry.context_length if entry else None,
            engine_args=args,
            gpus_per_replica=m.gpus_per_replica,
        )

    def _check_entry(self, at: Path_, m: ModelSpec, entry: ModelEntry, task: str) -> None:
        if task == "embed" and entry.task != "embed":
            self.add((*at, "task"), f"'{entry.id}' is a {entry.task} model; it cannot serve embeddings")
        if task == "rerank" and entry.task != "rerank":
            self.add((*at, "task"), f"'{entry.id}' is a {entry.task} model, not a reranker (cross-encoder)")
        if task == "chat" and entry.task == "embed":
            self.add((*at, "task"), f"'{entry.id}' is an embedding model; set task: embed")
        if task in ("chat", "embed") and entry.task == "rerank":
            self.add((*at, "task"), f"'{entry.id}' is a reranker (cross-encoder); set task: rerank")
        if entry.task == "classify":
            self.add(
                (*at, "model"),
                f"'{entry.id}' is a classifier run inside the gateway; "
                "use it under guard.prompt_guard.model, not in models",
            )
        if m.max_model_len is not None and m.max_model_len > entry.context_length:
            self.add(
                (*at, "max_model_len"),
                f"{m.max_model_len} exceeds the context length of '{entry.id}' ({entry.context_length})",
            )

    def cross_model(self, spec: Spec, registry: Registry) -> None:
        names: dict[str, int] = {}
        for i, m in enumerate(spec.models):
            if m.name in names:
                self.add(("models", i, "name"), f"duplicate model name '{m.name}' (first at models[{names[m.name]}])")
            names.setdefault(m.name, i)
        called = {**names, **dict.fromkeys(spec.gateway.aliases, -1)}  # what clients may ask for
        for i, m in enumerate(spec.models):
            for j, target in enumerate(m.fallbacks):
                self._known(("models", i, "fallbacks", j), target, called)
        for kind in ("fallbacks", "context_window_fallbacks"):
            for source, targets in getattr(spec.gateway, kind).items():
                self._known(("gateway", kind, source), source, called)
                for j, target in enumerate(targets):
                    self._known(("gateway", kind, source, j), target, called)
        layers: list[tuple[tuple, Any]] = [(("guard",), spec.guard)]
        layers += [(("guard", "policies", name), p) for name, p in spec.guard.policies.items()]
        layers += [(("models", i, "guard"), m.guard) for i, m in enumerate(spec.models) if m.guard is not None]
        effective = effective_guards(spec)
        used = {stage for g in effective for stage in (*g.input, *g.output)}
        for at, layer in layers:
            if "llama_guard" in used and (at == ("guard",) or layer.llama_guard is not None):
                self._guard_model((*at, "llama_guard", "model"), layer.llama_guard.model, names, registry, "guard")
            if "prompt_guard" in used and (at == ("guard",) or layer.prompt_guard is not None):
                self._guard_model((*at, "prompt_guard", "model"), layer.prompt_guard.model, {}, registry, "classify")

    def routing(self, spec: Spec, models: tuple[ResolvedModel, ...]) -> None:
        """An alias names a model clients can call; a fallback serves the task of its source."""
        tasks = {m.name: m.task for m in models}
        internal = served_guard_models(spec)
        aliases = spec.gateway.aliases
        for alias, target in aliases.items():
            where: Path_ = ("gateway", "aliases", alias)
            if alias in tasks:
                self.add(where, f"'{alias}' is already the name of a model; an alias must be a new name")
            elif target in aliases:
                self.add(where, f"'{target}' is an alias itself; point '{alias}' at a model")
            elif target not in tasks:
                self.add(where, f"no model named '{target}'{did_you_mean(target, tasks)}")
            elif target in internal:
                self.add(where, f"'{target}' answers the guard only; clients cannot call it under any name")
        task_of = {**{a: tasks[t] for a, t in aliases.items() if t in tasks}, **tasks}
        rules: list[tuple[Path_, str, list[str]]] = [
            (("models", i, "fallbacks"), m.name, m.fallbacks) for i, m in enumerate(spec.models)
        ]
        for kind in ("fallbacks", "context_window_fallbacks"):
            rules += [(("gateway", kind, src), src, targets) for src, targets in getattr(spec.gateway, kind).items()]
        for at, source, targets in rules:
            for j, target in enumerate(targets):
                if target in internal:
                    self.add((*at, j), f"'{target}' answers the guard only; it cannot answer clients")
                elif source in task_of and target in task_of and task_of[source] != task_of[target]:
                    self.add(
                        (*at, j),
                        f"'{target}' is a {task_of[target]} model; it cannot stand in for the "
                        f"{task_of[source]} model '{source}'",
                    )

    def _known(self, path: Path_, name: str, names: dict[str, int]) -> None:
        if name not in names:
            self.add(path, f"no model named '{name}'{did_you_mean(name, names)}")

    def _guard_model(self, path: Path_, ref: str, names: dict, registry: Registry, task: str) -> None:
        if ref in names:  # served here
            return
        if is_local_folder(ref):  # whether it is one is for the runtime's preflight to check
            problem = path_problem(ref)
            if problem is not None:
                self.add(path, problem)
                return
            self.local_folders.append((format_path(path), ref))
            return
        try:
            entry = registry.get(ref)
        except RegistryError:
            self.add(
                path,
                f"'{ref}' is neither a model of this spec nor a registry id"
                f"{did_you_mean(ref, [*names, *registry.ids])}",
            )
            return
        if entry.task != task:
            self.add(path, f"'{ref}' is a {entry.task} model, not a {task} model")


def is_local_folder(ref: str) -> bool:
    """Whether a guard model reference names a local folder, told by its shape alone (a ``/``, or
    a leading ``~`` or ``.``): model names and registry ids have neither. Never looks at the disk."""
    return "/" in ref or ref.startswith(("~", "."))


def _default_task(entry: ModelEntry) -> str:
    return entry.task if entry.task in ("embed", "rerank") else "chat"


def _weights(m: ModelSpec, entry: ModelEntry | None, engine: str, base: Path) -> tuple[str | None, str]:
    if m.source is not None:
        kind = m.source.kind
        value = getattr(m.source, kind)
        if kind in ("path", "gguf"):
            # ~ expands; a relative path is relative to the spec file, as users read it.
            value = (base / Path(value).expanduser()).resolve(strict=False)
        return str(value), kind
    if entry is None:
        return None, "hf"
    if engine == "ollama":
        return entry.ollama_tag, "ollama"
    return entry.hf_repo, "hf"
