"""Plan: a validated spec made concrete — which process serves what, where, with which argv.

`make_plan` is pure: it takes the loaded spec, the GPU inventory and the state directory, and
returns a frozen Plan (twllm.plan.model) that can be printed as JSON and diffed. Nothing here
reads the environment, touches the disk or starts anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twllm import settings
from twllm.errors import PlanError
from twllm.plan.model import DatabasePlan, EngineProcess, GatewayPlan, Plan, Route
from twllm.plan.monitoring import monitoring_plan
from twllm.plan.placement import GpuInventory, place_replicas
from twllm.plan.vllm_flags import field_flags_argv
from twllm.spec.guard_layers import served_guard_models
from twllm.spec.resolve import LoadedSpec, ResolvedModel

ENGINE_KEY_ENV = settings.ENGINE_KEY_ENV
"""Environment variable holding the key engines require and the gateway sends; the runtime
generates it per deployment."""

LITELLM_ROUTING = {"latency": "latency-based-routing"}
"""The spec's short names for LiteLLM's routing strategies (the others are LiteLLM's own)."""

CPU_KV_CACHE_DEFAULT = "1G"
MAX_DEFAULT_WORKERS = 8
"""Gateway workers without `gateway.workers`: one per usable core, at most this many (each
worker holds ~400 MB and its own database pool; past 8 an engine, not the gateway, limits)."""


def default_workers() -> int:
    """One gateway worker per CPU core this process may use, at most ``MAX_DEFAULT_WORKERS``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_WORKERS))


"""vLLM's CPU build fails its start-up memory check without an explicit KV-cache size
(``--kv-cache-memory-bytes``)."""


def _spec_path(loaded: LoadedSpec, value: str) -> str:
    """A path from the spec: ~ expands; relative to the spec file's folder."""
    file = loaded.source.file
    base = Path(loaded.path).parent if loaded.path else Path(file).parent if not file.startswith("<") else Path.cwd()
    return str((base / Path(value).expanduser()).resolve(strict=False))


def make_plan(loaded: LoadedSpec, inventory: GpuInventory, state_dir: Path) -> Plan:
    """Decide every process, port and route of the deployment."""
    spec = loaded.spec
    placements = place_replicas(loaded.models, inventory)
    ports = _PortAllocator(spec.engines.port_base, reserved={spec.gateway.port: "gateway"})
    if spec.database.url is None:
        ports.reserve("database", spec.database.port)
    for model in loaded.models:
        if model.engine == "vllm" and model.spec.port is not None:
            for replica in range(model.spec.replicas):
                ports.reserve(f"vllm-{model.name}-{replica}", model.spec.port + replica)
    if any(m.engine == "ollama" for m in loaded.models):
        ports.reserve("ollama", spec.ollama.port)
    mon = spec.monitoring
    if mon.metrics.enabled and mon.metrics.port is not None:
        ports.reserve("gateway metrics", mon.metrics.port)
    if mon.prometheus == "embedded":
        ports.reserve("prometheus", mon.prometheus_port)
    engines: list[EngineProcess] = []
    routes: list[Route] = []
    notes: list[str] = []

    for model in loaded.models:
        if model.engine != "vllm":
            continue
        for replica in range(model.spec.replicas):
            engine_id = f"vllm-{model.name}-{replica}"
            port = ports.take(engine_id)
            gpus = placements.get((model.name, replica), ())
            engines.append(_vllm_process(engine_id, model, spec.engines.host, port, gpus, spec.engines.start_timeout_s))
            routes.append(
                _route(
                    model,
                    engine_id,
                    f"{engine_id}",
                    f"hosted_vllm/{model.name}",
                    f"http://{_connect_host(spec.engines.host)}:{port}/v1",
                    ENGINE_KEY_ENV,
                )
            )

    ollama_models = [m for m in loaded.models if m.engine == "ollama"]
    if ollama_models:
        port = ports.take("ollama")
        engines.append(_ollama_process(ollama_models, spec, port, state_dir))
        for model in ollama_models:
            tag = _ollama_name(model)
            provider = f"ollama/{tag}" if model.task == "embed" else f"ollama_chat/{tag}"
            routes.append(_route(model, "ollama", f"ollama-{model.name}", provider, f"http://127.0.0.1:{port}", None))

    for model in loaded.models:
        if model.entry is None:
            notes.append(f"{model.name}: not in the registry; no weight-memory check, no defaults inherited")
        elif model.entry.gated and model.weights_kind == "hf":
            notes.append(
                f"{model.name}: {model.entry.hf_repo} is gated; set HF_TOKEN for an account that accepted its licence"
            )

    # Taken after every engine's, so turning metrics on or off moves no engine.
    supervisor_port = ports.take("supervisor metrics") if mon.metrics.enabled else None
    gw = spec.gateway
    fallbacks = dict(gw.fallbacks)
    for model in loaded.models:
        if model.spec.fallbacks:
            fallbacks[model.name] = list(model.spec.fallbacks)
    fallbacks = _alias_fallbacks(fallbacks, gw.aliases)
    context_fallbacks = _alias_fallbacks(dict(gw.context_window_fallbacks), gw.aliases)
    db = spec.database
    guard_only = served_guard_models(spec)  # answered on their engines, not through the gateway
    plan = Plan(
        name=spec.name,
        spec_file=str(loaded.path) if loaded.path else None,
        state_dir=str(state_dir),
        gpus_total=inventory.count,
        gateway=GatewayPlan(
            host=gw.host,
            port=gw.port,
            workers=gw.workers or default_workers(),
            url=f"{'https' if gw.tls else 'http'}://{_connect_host(gw.host)}:{gw.port}/v1",
            master_key_env=gw.master_key.var or "",
            request_timeout_s=gw.request_timeout_s,
            num_retries=gw.num_retries,
            routing_strategy=LITELLM_ROUTING.get(gw.routing_strategy, gw.routing_strategy),
            cooldown_s=gw.cooldown_s,
            allowed_fails=gw.allowed_fails,
            health_check_interval_s=gw.health_check_interval_s,
            fallbacks=dict(sorted(fallbacks.items())),
            start_timeout_s=gw.start_timeout_s,
            aliases=dict(sorted(gw.aliases.items())),
            context_window_fallbacks=dict(sorted(context_fallbacks.items())),
            probe_model=next((m.name for m in loaded.models if m.task == "chat" and m.name not in guard_only), None),
            probe_embed_model=next((m.name for m in loaded.models if m.task == "embed"), None),
            max_request_bytes=gw.max_request_bytes,
            tls_cert=_spec_path(loaded, gw.tls.cert) if gw.tls else None,
            tls_key=_spec_path(loaded, gw.tls.key) if gw.tls else None,
            cors_origins=tuple(gw.cors_origins),
            fast_path=gw.fast_path,
        ),
        database=DatabasePlan(
            embedded=db.url is None,
            data_dir=str(state_dir / "postgres") if db.url is None else None,
            port=db.port if db.url is None else None,
            url_env=db.url.var if db.url is not None else None,
            url=db.url.reveal() if db.url is not None and db.url.var is None else None,
            retention_days=db.ledger_retention_days,
        ),
        engines=tuple(engines),
        routes=tuple(routes),
        notes=tuple(notes),
        vllm_python=str(spec.engines.vllm_python.expanduser()) if spec.engines.vllm_python else None,
    )
    return plan.model_copy(
        update={"monitoring": monitoring_plan(mon, plan.gateway, plan.engines, state_dir, supervisor_port)}
    )


def _alias_fallbacks(fallbacks: dict[str, list[str]], aliases: dict[str, str]) -> dict[str, list[str]]:
    """An alias falls back as its model does, unless it has fallbacks of its own (LiteLLM looks
    fallbacks up by the name the client asked for, not by the model an alias resolves to)."""
    inherited = {alias: list(fallbacks[model]) for alias, model in aliases.items() if model in fallbacks}
    return {**inherited, **fallbacks}


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _route(
    model: ResolvedModel, engine_id: str, deployment_id: str, provider: str, api_base: str, key_env: str | None
) -> Route:
    price = model.spec.price
    max_len = model.spec.max_model_len or model.context_length
    return Route(
        model_name=model.name,
        deployment_id=deployment_id,
        provider_model=provider,
        api_base=api_base,
        engine_id=engine_id,
        task=model.task,
        input_cost_per_token=price.input_per_1m / 1_000_000,
        output_cost_per_token=price.output_per_1m / 1_000_000,
        currency=price.currency,
        max_input_tokens=max_len,
        rpm=_share(model.spec.rpm, model.spec.replicas),
        tpm=_share(model.spec.tpm, model.spec.replicas),
        api_key_env=key_env,
    )


def _share(limit: int | None, replicas: int) -> int | None:
    """A model-wide limit split across its replicas (LiteLLM limits are per deployment)."""
    return None if limit is None else max(1, limit // replicas)


ENGINE_KEEP_ALIVE_S = 75
"""How long a vLLM engine keeps an idle connection open (vLLM's own default is 5 s). The gateway's
LiteLLM keeps idle engine connections for 15 s (its AIOHTTP_KEEPALIVE_TIMEOUT) and reuses them: with
the engine closing first, a request now and then went out on a connection the engine was closing,
failed (InternalServerError 500, with nothing in the engine's log) and, in a CI chaos run, put the
only serving replica in cooldown. The side that keeps a connection longer must be the server."""


def _vllm_process(
    engine_id: str, model: ResolvedModel, host: str, port: int, gpus: tuple[int, ...], start_timeout_s: float
) -> EngineProcess:
    argv: list[str] = [
        "vllm",
        "serve",
        model.weights,
        "--served-model-name",
        model.name,
        "--host",
        host,
        "--port",
        str(port),
    ]
    argv += field_flags_argv(model.spec)  # tensor_parallel, max_model_len, dtype …: twllm/plan/vllm_flags.py
    args = dict(model.engine_args)
    if model.task in ("embed", "rerank"):  # a reranker is a cross-encoder: a pooling model too
        args.setdefault("runner", "pooling")
    elif model.device == "gpu":
        args.setdefault("enable-prefix-caching", True)
    if model.device == "cpu":
        args.setdefault("kv-cache-memory-bytes", CPU_KV_CACHE_DEFAULT)
    argv += engine_flags(args)

    env = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": str(ENGINE_KEEP_ALIVE_S)}
    if model.device == "gpu":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    else:
        env["VLLM_TARGET_DEVICE"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    if model.weights_kind == "path":
        env["HF_HUB_OFFLINE"] = "1"
    return EngineProcess(
        id=engine_id,
        engine="vllm",
        device=model.device,
        models=(model.name,),
        argv=tuple(argv),
        env=dict(sorted(env.items())),
        secret_env={"VLLM_API_KEY": ENGINE_KEY_ENV},
        host=host,
        port=port,
        gpus=tuple(gpus),
        ready_url=f"http://{_connect_host(host)}:{port}/v1/models",
        start_timeout_s=start_timeout_s,
    )


def engine_flags(args: dict[str, Any]) -> list[str]:
    """{'enable-x': True, 'y': 3, 'z': False} -> ['--enable-x', '--y', '3', '--no-z'] (sorted)."""
    out: list[str] = []
    for name in sorted(args):
        value = args[name]
        if value is True:
            out.append(f"--{name}")
        elif value is False:
            out.append(f"--no-{name}")
        elif isinstance(value, list):
            out += [f"--{name}", *[str(v) for v in value]]
        else:
            out += [f"--{name}", str(value)]
    return out


def _ollama_name(model: ResolvedModel) -> str:
    """The name Ollama serves the model under: its tag, or twllm-<name> for a local GGUF."""
    return f"twllm-{model.name}" if model.weights_kind == "gguf" else model.weights


def _ollama_process(models: list[ResolvedModel], spec: Any, port: int, state_dir: Path) -> EngineProcess:
    o = spec.ollama
    env = {
        "OLLAMA_HOST": f"127.0.0.1:{port}",
        "OLLAMA_MODELS": str(state_dir / "ollama" / "models"),
        "OLLAMA_NUM_PARALLEL": str(o.num_parallel),
        "OLLAMA_KEEP_ALIVE": o.keep_alive,
    }
    if o.max_loaded_models is not None:
        env["OLLAMA_MAX_LOADED_MODELS"] = str(o.max_loaded_models)
    if o.context_length is not None:
        env["OLLAMA_CONTEXT_LENGTH"] = str(o.context_length)
    provision = tuple(
        {"name": _ollama_name(m), "gguf": m.weights}
        if m.weights_kind == "gguf"
        else {"name": m.weights, "pull": m.weights}
        for m in models
    )
    return EngineProcess(
        id="ollama",
        engine="ollama",
        device="cpu",
        models=tuple(m.name for m in models),
        argv=("ollama", "serve"),
        env=dict(sorted(env.items())),
        secret_env={},
        host="127.0.0.1",
        port=port,
        gpus=(),
        ready_url=f"http://127.0.0.1:{port}/api/tags",
        provision=provision,
        start_timeout_s=spec.engines.start_timeout_s,
    )


class _PortAllocator:
    """Deterministic ports: fixed ones first-come, the rest counting up from a base, no clashes."""

    def __init__(self, base: int, reserved: dict[int, str]) -> None:
        self.next = base
        self.used = dict(reserved)

    def reserve(self, owner: str, port: int) -> None:
        if port in self.used:
            raise PlanError(
                f"port {port} of {owner} is already used by {self.used[port]}",
                hint="give one of them another port, or leave `port` out",
            )
        if port > 65535:
            raise PlanError(f"port {port} of {owner} is out of range (replicas count up from `port`)")
        self.used[port] = owner

    def take(self, owner: str) -> int:
        for port, holder in self.used.items():
            if holder == owner:
                return port
        while self.next in self.used:
            self.next += 1
        if self.next > 65535:
            raise PlanError("ran out of ports above engines.port_base")
        self.used[self.next] = owner
        return self.next
