"""The deployment spec: the typed schema of prod.yaml. One pydantic field per setting.

Each field's docstring is its documentation; the JSON Schema (`twllm schema`) is generated from
these models. Shape and bounds live here; rules that need the model registry live in resolve.py;
facts about the host (GPUs, ports, binaries) are checked by the plan and the runtime's preflight,
never here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from twllm.spec.secret_refs import DatabaseUrl, EnvSecret

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")]


def path_problem(value: str | Path) -> str | None:
    """Why a path of the spec cannot be used, or None: a leading ``~user`` this machine cannot
    expand (``~`` expands as the spec stage reads paths; the file itself is the preflight's)."""
    text = str(value)
    if not text.startswith("~"):
        return None
    try:
        Path(text).expanduser()
    except RuntimeError:
        head = text.split("/", 1)[0]
        return f"cannot expand {head}: " + (f"no user '{head[1:]}' on this machine" if head[1:] else "no home folder")
    return None


def _usable_path(value: Any) -> Any:
    problem = path_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


SpecPath = Annotated[Path, AfterValidator(_usable_path)]
"""A local path: relative to the spec file; ``~`` and ``~user`` expand."""
SpecPathText = Annotated[str, AfterValidator(_usable_path)]
Port = Annotated[int, Field(ge=1, le=65535)]
ArgValue = bool | int | float | str | list[str]
GuardStage = Literal["pii", "prompt_guard", "llama_guard", "zh_tw"]
PiiEntity = Literal[
    "tw_national_id",
    "tw_resident_id",
    "tw_business_id",
    "tw_phone",
    "email",
    "credit_card",
    "tw_nhi_card",
    "bank_account",
    "tw_address",
]
GuardCategory = Annotated[str, StringConstraints(pattern=r"^S([1-9]|1[0-4])$")]
RoutingStrategy = Literal["simple-shuffle", "least-busy", "latency", "latency-based-routing", "usage-based-routing-v2"]
"""The issue's short names and LiteLLM's (``latency`` is LiteLLM's ``latency-based-routing``)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class TlsSpec(_Model):
    """The gateway's certificate and private key."""

    cert: SpecPathText
    """PEM certificate chain (relative paths are relative to the spec file)."""
    key: SpecPathText
    """PEM private key of the certificate."""


class GatewaySpec(_Model):
    """The LiteLLM proxy that clients talk to."""

    host: str = "127.0.0.1"
    """Address the gateway listens on. 0.0.0.0 exposes it to the network."""
    port: Port = 4000
    """TCP port of the OpenAI-compatible endpoint."""
    workers: int | None = Field(None, ge=1, le=64)
    """Gateway worker processes, each about 400 MB of memory. Default: one per CPU core that
    `twllm deploy` may use, at most 8 (`twllm plan` shows the number); in Kubernetes one per
    pod (the autoscaler adds pods instead)."""
    master_key: EnvSecret
    """Admin key of the gateway, as ${VAR}. It must start with 'sk-'."""
    request_timeout_s: float = Field(600.0, gt=0, le=3600)
    """Seconds before a request to an engine is abandoned (LiteLLM's default is 6000)."""
    num_retries: int = Field(1, ge=0, le=10)
    """Retries of a failed request on another deployment of the same model."""
    routing_strategy: RoutingStrategy = "least-busy"
    """How the gateway picks among the replicas of one model: least-busy (the replica with the
    fewest requests in flight in this gateway worker), simple-shuffle (at random, weighted by a
    replica's rpm/tpm), latency (the replica with the lowest recent latency per token; LiteLLM's
    latency-based-routing, also accepted under that name) or usage-based-routing-v2.
    least-busy is the default because benchmarks/routing.py measured it (benchmarks/RESULTS.md,
    "Routing across replicas"): with one replica at a quarter of the other's max_num_seqs its p95
    was half simple-shuffle's (1.0 s vs 2.0 s), and on identical replicas the lowest of the three
    (0.59 s vs 0.93 s shuffle); latency won only while one replica could carry the whole load, and
    on identical replicas it herded requests onto one of them (p95 1.0 s, 40 % less throughput).
    Idle replicas take turns (``twllm.gateway.spread``; LiteLLM's own would always pick the first)."""
    cooldown_s: float = Field(30.0, ge=0, le=3600)
    """Seconds a deployment is skipped after it fails allowed_fails times in a minute. Replicas of a
    model with several vLLM replicas are kept in or out of rotation by their health probe instead
    (twllm.gateway.readiness): out until the probe answers, at most about 2 s after a failure."""
    allowed_fails: int = Field(3, ge=0, le=1000)
    """Failures per minute before a deployment is cooled down."""
    health_check_interval_s: int = Field(30, ge=5, le=3600)
    """Seconds between background health checks of every deployment."""
    aliases: dict[Name, Name] = {}
    """Other names clients may call a model by: alias -> model, e.g. {gpt-4o-mini: taide-8b}.
    An alias is its model under a second name (same engines, price, guard and fallbacks): a key
    allowed either name may call both, /v1/models lists both, and the ledger records the model
    as `model` and the name the client asked for as `requested_model`."""
    fallbacks: dict[str, list[str]] = {}
    """Model (or alias) -> models tried in order when every replica of it is down or fails with
    a 5xx or 429 (after num_retries); also when a prompt exceeds its context and
    context_window_fallbacks is empty. A tenant key is never answered by a model outside its
    allow-list: such fallbacks are skipped for it."""
    context_window_fallbacks: dict[str, list[str]] = {}
    """Model (or alias) -> models (with a longer context) tried in order when a prompt is longer
    than its context window. Once any is given, a model without an entry answers an overlong
    prompt with 400 context_length_exceeded instead of trying `fallbacks`."""
    start_timeout_s: float = Field(180.0, gt=0, le=3600)
    """Seconds the gateway may take to answer its first request at deploy."""
    max_request_bytes: int = Field(10 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    """Largest request body accepted (bytes); a larger one is refused with 413 before it is read."""
    tls: TlsSpec | None = None
    """Serve HTTPS with this certificate and key (PEM files) instead of plain HTTP."""
    cors_origins: list[str] = []
    """Browser origins allowed to call the gateway (e.g. https://app.example.tw); none by default."""
    fast_path: bool = True
    """Forward plain requests to vLLM engines directly (chat, completions and embeddings with a
    tenant key, OpenAI's fields only, no guard, no fallbacks): the same checks, ledger row and
    errors at a fraction of LiteLLM's CPU. false: every request takes LiteLLM's path."""

    @model_validator(mode="after")
    def _key_prefix(self) -> GatewaySpec:
        if not self.master_key.reveal().startswith("sk-"):
            raise ValueError(
                f"master_key: the value of {self.master_key.var} must start with 'sk-' "
                "(LiteLLM refuses other master keys)"
            )
        return self


class DatabaseSpec(_Model):
    """Where keys and spend are kept."""

    url: DatabaseUrl | None = None
    """PostgreSQL URL, as ${VAR} when it holds a password. Omit it for an embedded
    PostgreSQL inside the state directory."""
    port: Port = 15432
    """Port of the embedded PostgreSQL (bound to 127.0.0.1); unused with `url`."""
    ledger_retention_days: int | None = Field(None, ge=1, le=36500)
    """Days of per-request spend rows kept (whole months are rolled up into daily totals and
    dropped, once a day). Omit it to keep every row."""


class LlamaGuardSpec(_Model):
    """Llama Guard safety classification."""

    model: str = "llama-guard-3-1b"
    """Registry id of the guard model (run in the gateway), or the name of a model in
    `models` (served by an engine of this deployment)."""
    on_error: Literal["block", "allow"] = "block"
    """What happens when the guard fails or times out."""
    excluded_categories: list[GuardCategory] = []
    """Categories (S1-S14) not enforced."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where an in-gateway guard model runs."""
    timeout_s: float = Field(10.0, gt=0, le=300)
    """Seconds before one check counts as failed."""


class PromptGuardSpec(_Model):
    """Prompt-injection screening with a Prompt Guard style classifier."""

    model: str = "llama-prompt-guard-2-86m"
    """Registry id of the classifier."""
    threshold: float = Field(0.5, gt=0, lt=1)
    """Malicious-class probability at or above which input is blocked."""
    on_error: Literal["block", "allow"] = "block"
    """What happens when the classifier fails."""


class PiiSpec(_Model):
    """Detection of Taiwan personal data."""

    action: Literal["mask", "block", "log"] = "mask"
    """Default action for every entity."""
    entities: list[PiiEntity] = [
        "tw_national_id",
        "tw_resident_id",
        "tw_phone",
        "email",
        "credit_card",
    ]
    """Entities looked for."""
    actions: dict[PiiEntity, Literal["mask", "block", "log"]] = {}
    """Per-entity action overriding `action`."""


class ZhTwSpec(_Model):
    """Normalisation of Simplified Chinese output to Taiwan Traditional."""

    system_prompt: str | None = None
    """System prompt added to chat requests that bring none (every chat model; a model's own
    `system_prompt` wins)."""
    structured: Literal["values", "off"] = "values"
    """Answers to requests with `response_format` json_object or json_schema (Responses:
    `text.format`): `values` normalises free-text string values only — keys, and values the
    schema fixes (enum, const, pattern, format), never change, so the answer still parses and
    validates; `off` leaves such answers as the model wrote them. Tool calls are never
    normalised. Default `values`: structured answers mostly carry text for people (summaries,
    replies) that a zh-TW deployment wants in Taiwan Traditional, and what a program matches
    on is kept; choose `off` when clients compare free-text values with strings of their own
    (labels named only in the prompt of a json_object request)."""


def _check_stages(input: Sequence[str] | None, output: Sequence[str] | None) -> None:
    for where, stages in (("input", input), ("output", output)):
        if stages is not None and len(set(stages)) != len(stages):
            raise ValueError(f"{where}: a stage is listed twice")
    if output is not None and "prompt_guard" in output:
        raise ValueError("output: prompt_guard screens input only")
    if input is not None and "zh_tw" in input:
        raise ValueError("input: zh_tw normalises output only")


class GuardPolicySpec(_Model):
    """A guard policy for one model or one tenant: what it sets replaces the gateway-wide
    setting, everything else is inherited."""

    input: list[GuardStage] | None = None
    """Stages run on the request, in order (replaces guard.input)."""
    output: list[GuardStage] | None = None
    """Stages run on the response, in order (replaces guard.output)."""
    llama_guard: LlamaGuardSpec | None = None
    prompt_guard: PromptGuardSpec | None = None
    pii: PiiSpec | None = None

    @model_validator(mode="after")
    def _stages(self) -> GuardPolicySpec:
        _check_stages(self.input, self.output)
        return self


class GuardSpec(_Model):
    """Screening of inputs and outputs, for the whole gateway."""

    input: list[GuardStage] = []
    """Stages run on every request, in order."""
    output: list[GuardStage] = []
    """Stages run on every response, in order."""
    llama_guard: LlamaGuardSpec = LlamaGuardSpec()
    prompt_guard: PromptGuardSpec = PromptGuardSpec()
    pii: PiiSpec = PiiSpec()
    zh_tw: ZhTwSpec = ZhTwSpec()
    stream_window: int = Field(200, ge=0, le=100_000)
    """Streamed answers with a llama_guard output stage are released in pieces of about this
    many characters, each after the answer so far was checked; 0 holds the whole answer until
    it is checked. Smaller pieces: earlier first token, more checks."""
    policies: dict[Name, GuardPolicySpec] = {}
    """Named policies a tenant or an API key can be given (`twllm tenants create
    --guard-policy NAME`); applied on top of the gateway-wide and the model's settings."""

    @model_validator(mode="after")
    def _stages(self) -> GuardSpec:
        _check_stages(self.input, self.output)
        return self


class OllamaSpec(_Model):
    """The one Ollama server that serves every model with engine: ollama."""

    port: Port = 11434
    """Port of the Ollama server (bound to 127.0.0.1)."""
    num_parallel: int = Field(1, ge=1, le=64)
    """Requests served at once per model (OLLAMA_NUM_PARALLEL)."""
    keep_alive: str = Field("-1", pattern=r"^-?\d+(ms|s|m|h)?$")
    """How long a model stays loaded (OLLAMA_KEEP_ALIVE); negative keeps it forever."""
    max_loaded_models: int | None = Field(None, ge=1, le=64)
    """Models kept in memory at once (OLLAMA_MAX_LOADED_MODELS)."""
    context_length: int | None = Field(None, ge=256)
    """Default context length (OLLAMA_CONTEXT_LENGTH)."""


class EnginesSpec(_Model):
    """How engine processes are started."""

    host: str = "127.0.0.1"
    """Address engines listen on; only the gateway needs to reach them."""
    port_base: Port = 8100
    """First port handed to vLLM processes; later ones count up from it."""
    vllm_python: SpecPath | None = None
    """Python of an existing environment with vLLM installed; when omitted, the one
    `twllm engines install` made for the model's device."""
    start_timeout_s: float = Field(900.0, gt=0, le=7200)
    """Seconds an engine may take to load its model (downloads included)."""


class MetricsSpec(_Model):
    """The gateway's Prometheus metrics (LiteLLM's series and twllm's own)."""

    enabled: bool = True
    """Serve /metrics in Prometheus text format."""
    port: Port | None = None
    """A separate listener on ``gateway.host`` that serves only /metrics, without a key (for a
    scraper on a private network). When omitted, /metrics is on the gateway's port and needs the
    master key as a bearer token."""


class MonitoringSpec(_Model):
    """Metrics, and the Prometheus that scrapes them (`twllm render monitoring` writes its config)."""

    metrics: MetricsSpec = MetricsSpec()
    prometheus: Literal["off", "embedded"] = "off"
    """embedded: run the host's `prometheus` binary as one more supervised component."""
    prometheus_port: Port = 9090
    """Where the embedded Prometheus listens (127.0.0.1)."""
    scrape_interval_s: int = Field(15, ge=1, le=3600)
    """How often Prometheus scrapes the gateway and every vLLM engine."""
    retention_days: int = Field(15, ge=1, le=3650)
    """How long the embedded Prometheus keeps its samples."""


K8sName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
Quantity = Annotated[str, StringConstraints(pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")]


class TolerationSpec(_Model):
    """A Kubernetes toleration (core/v1 Toleration) given to GPU engine pods."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class GpuNodesSpec(_Model):
    """Where GPU engine pods may run."""

    resource: str = "nvidia.com/gpu"
    """The extended resource a GPU is requested as (NVIDIA's device plugin / GPU operator)."""
    node_selector: dict[str, str] = {"nvidia.com/gpu.present": "true"}
    """Labels a GPU node carries (the GPU operator's feature discovery sets this one)."""
    tolerations: list[TolerationSpec] = [TolerationSpec(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
    """Taints of GPU nodes that engine pods tolerate."""


class ModelCacheSpec(_Model):
    """The volume engines keep downloaded weights on (a PersistentVolumeClaim shared by them)."""

    size: Quantity = "200Gi"
    storage_class: str | None = None
    """None: the cluster's default StorageClass."""
    access_mode: Literal["ReadWriteMany", "ReadWriteOnce"] = "ReadWriteMany"
    """ReadWriteMany lets every engine pod on every node share one download."""


class KedaSpec(_Model):
    """Scale each vLLM model's pods on its queue length with KEDA (a ScaledObject per model)."""

    enabled: bool = False
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"
    """The Prometheus KEDA queries for ``vllm:num_requests_waiting``."""
    queue_per_replica: int = Field(5, ge=1, le=10_000)
    """Waiting requests per pod above which KEDA adds a pod."""
    max_replicas: int = Field(4, ge=1, le=1000)
    """Most pods per model (the spec's ``replicas`` is the least)."""


class GatewayScalingSpec(_Model):
    """The gateway Deployment: its replicas, autoscaling and each pod's resources."""

    replicas: int = Field(2, ge=1, le=1000)
    """Pods when the cluster is quiet (and the HorizontalPodAutoscaler's minimum)."""
    max_replicas: int = Field(10, ge=1, le=1000)
    """The HorizontalPodAutoscaler's maximum."""
    cpu_target_percent: int = Field(70, ge=1, le=100)
    """Average CPU use (of the request) the autoscaler keeps the pods at."""
    cpu: Quantity = "1"
    """CPU requested per pod (per ``gateway.workers`` worker, roughly one core)."""
    memory: Quantity = "2Gi"

    @model_validator(mode="after")
    def _bounds(self) -> GatewayScalingSpec:
        if self.max_replicas < self.replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below replicas ({self.replicas})")
        return self


class KubernetesSpec(_Model):
    """How `twllm render k8s` writes the deployment for a cluster (ignored by `twllm deploy`)."""

    namespace: K8sName = "twllm"
    """The namespace every object goes into (`--namespace` overrides it)."""
    gateway_image: str | None = None
    """The gateway's image (built from the repository's Dockerfile); None: twllm-gateway:<version>.
    `--image` overrides it."""
    vllm_image: str = "vllm/vllm-openai:v0.33.0"
    """vLLM's official OpenAI server image (the release twllm's GPU engine pin tests)."""
    ollama_image: str = "ollama/ollama:0.13.5"
    gateway: GatewayScalingSpec = GatewayScalingSpec()
    gpu_nodes: GpuNodesSpec = GpuNodesSpec()
    model_cache: ModelCacheSpec = ModelCacheSpec()
    keda: KedaSpec = KedaSpec()
    service_monitor: bool = False
    """Write a ServiceMonitor (Prometheus operator) for the gateway and the engines."""
    monitoring_namespace: K8sName = "monitoring"
    """Where the cluster's Prometheus runs: the NetworkPolicy lets it scrape the engines."""
    secret_name: K8sName | None = None
    """The Secret holding the master key, the engine key, the database URL and HF_TOKEN (created by
    the operator, never rendered); None: <name>-secrets."""


class HardwareSpec(_Model):
    """The GPUs of the machine, used when they cannot be detected (and for planning elsewhere)."""

    gpus: int = Field(0, ge=0, le=1024)
    """Number of GPUs."""
    gpu_memory_gib: float | None = Field(None, gt=0, le=4096)
    """Memory of one GPU in GiB, for the check that weights fit."""


class SourceSpec(_Model):
    """Where a model's weights come from, when it is not (only) a registry entry. Give one."""

    hf: str | None = Field(None, pattern=r"^[\w.-]+/[\w.-]+$")
    """Hugging Face repository id, e.g. taide/Llama-3.1-TAIDE-LX-8B-Chat."""
    path: SpecPath | None = None
    """A local folder with the model (config, tokenizer, weights)."""
    gguf: SpecPath | None = None
    """A local GGUF file (Ollama)."""
    ollama: str | None = Field(None, pattern=r"^[\w./-]+(:[\w.-]+)?$")
    """An Ollama library tag, e.g. phi4-mini or llama3.2:3b."""

    @model_validator(mode="after")
    def _exactly_one(self) -> SourceSpec:
        given = [k for k in ("hf", "path", "gguf", "ollama") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of hf, path, gguf, ollama" + (f" (got {', '.join(given)})" if given else "")
            )
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("hf", "path", "gguf", "ollama") if getattr(self, k) is not None)


class PriceSpec(_Model):
    """Price charged per million tokens."""

    input_per_1m: float = Field(0.0, ge=0)
    """Price per million prompt tokens."""
    output_per_1m: float = Field(0.0, ge=0)
    """Price per million completion tokens."""
    currency: str = Field("TWD", pattern=r"^[A-Z]{3}$")
    """ISO 4217 currency code."""


class ModelSpec(_Model):
    """One model as clients see it, and how it is served."""

    name: Name
    """The name clients ask for (`model` in the OpenAI API)."""
    model: str | None = None
    """Registry id (see `twllm models list`); its defaults are inherited."""
    source: SourceSpec | None = None
    """Explicit weights; overrides the registry's repository."""
    engine: Literal["vllm", "ollama"] | None = None
    """Serving engine; vllm unless the source is a GGUF file or an Ollama tag."""
    device: Literal["gpu", "cpu"] | None = None
    """gpu for vllm and cpu for ollama unless given."""
    task: Literal["chat", "embed", "rerank"] | None = None
    """chat (chat and text completions), embed, or rerank (a cross-encoder served at /v1/rerank
    and /score); from the registry when omitted."""
    gpus: int | None = Field(None, ge=1, le=64)
    """GPUs per replica; defaults to tensor_parallel × pipeline_parallel."""
    tensor_parallel: int | None = Field(None, ge=1, le=64)
    """vLLM tensor-parallel size (GPUs one copy of the weights is split across)."""
    pipeline_parallel: int | None = Field(None, ge=1, le=64)
    """vLLM pipeline-parallel size."""
    replicas: int = Field(1, ge=1, le=64)
    """Independent copies behind one name; the gateway balances across them."""
    nodes: int = Field(1, ge=1, le=64)
    """Nodes one replica spans in Kubernetes (vLLM over Ray: tensor parallel within a node,
    pipeline parallel across nodes; pipeline_parallel must be a multiple of it). `twllm deploy`
    runs the same tensor × pipeline split on one host's GPUs."""
    max_model_len: int | None = Field(None, ge=16)
    """Context length served; at most the model's own."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Weight and activation type."""
    quantization: Literal["awq", "gptq", "fp8", "bitsandbytes", "gguf", "compressed-tensors"] | None = None
    """Quantisation method of the weights."""
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    """Share of each GPU's memory vLLM may take (vLLM's default 0.9)."""
    engine_args: dict[str, ArgValue] = {}
    """Extra engine flags without leading dashes, e.g. {enable-chunked-prefill: true}."""
    price: PriceSpec = PriceSpec()
    """What tenants are charged."""
    rpm: int | None = Field(None, ge=1)
    """Requests per minute this model accepts across all tenants."""
    tpm: int | None = Field(None, ge=1)
    """Tokens per minute this model accepts across all tenants."""
    fallbacks: list[Name] = []
    """Models tried in order when this one fails."""
    port: Port | None = None
    """Fixed port for the first replica's engine; later replicas count up."""
    guard: GuardPolicySpec | None = None
    """This model's guard settings, replacing the gateway-wide ones they name."""
    zh_tw: bool | None = None
    """Normalise this model's answers to Taiwan Traditional Chinese (adds or removes the zh_tw
    output stage); unset: as guard.output says."""
    system_prompt: str | None = None
    """System prompt added to chat requests that bring none (overrides guard.zh_tw.system_prompt)."""

    @model_validator(mode="after")
    def _engine_rules(self) -> ModelSpec:
        if self.model is None and self.source is None:
            raise ValueError("give `model` (a registry id) or `source`")
        engine = self.resolved_engine
        if engine == "ollama":
            for field in ("tensor_parallel", "pipeline_parallel", "gpus", "gpu_memory_utilization", "quantization"):
                if getattr(self, field) is not None:
                    raise ValueError(f"{field}: not available with engine: ollama (vLLM only)")
            if self.replicas != 1:
                raise ValueError("replicas: ollama serves each model once; raise ollama.num_parallel instead")
            if self.nodes != 1:
                raise ValueError("nodes: not available with engine: ollama (vLLM only)")
            if self.source is not None and self.source.kind == "hf":
                raise ValueError("source.hf: ollama needs source.ollama or source.gguf")
        else:
            if self.source is not None and self.source.kind in ("ollama", "gguf"):
                raise ValueError(f"source.{self.source.kind}: needs engine: ollama")
            if self.device == "cpu":
                for field in ("tensor_parallel", "pipeline_parallel", "gpus", "gpu_memory_utilization"):
                    if getattr(self, field) is not None:
                        raise ValueError(f"{field}: not available with device: cpu")
            tp, pp = self.tensor_parallel or 1, self.pipeline_parallel or 1
            if self.nodes > 1:
                if self.device == "cpu":
                    raise ValueError("nodes: a model spans nodes on GPUs only")
                if pp % self.nodes:
                    raise ValueError(
                        f"nodes: {self.nodes} needs pipeline_parallel to be a multiple of it "
                        f"(pipeline stages are split across nodes), not {pp}"
                    )
            if self.gpus is not None and (self.tensor_parallel or self.pipeline_parallel) and self.gpus != tp * pp:
                raise ValueError(f"gpus: {self.gpus} does not equal tensor_parallel × pipeline_parallel = {tp * pp}")
        if self.name in self.fallbacks:
            raise ValueError("fallbacks: a model cannot fall back to itself")
        return self

    @property
    def resolved_engine(self) -> str:
        if self.engine is not None:
            return self.engine
        if self.source is not None and self.source.kind in ("ollama", "gguf"):
            return "ollama"
        return "vllm"

    @property
    def resolved_device(self) -> str:
        if self.device is not None:
            return self.device
        return "cpu" if self.resolved_engine == "ollama" else "gpu"

    @property
    def gpus_per_replica(self) -> int:
        if self.resolved_engine != "vllm" or self.resolved_device != "gpu":
            return 0
        if self.gpus is not None:
            return self.gpus
        return (self.tensor_parallel or 1) * (self.pipeline_parallel or 1)


class Spec(_Model):
    """A twllm deployment: one gateway in front of one or more models."""

    name: Name
    """Name of the deployment."""
    state_dir: SpecPath | None = None
    """Where pids, logs and the embedded database live; a per-user folder when omitted."""
    gateway: GatewaySpec
    database: DatabaseSpec = DatabaseSpec()
    guard: GuardSpec = GuardSpec()
    ollama: OllamaSpec = OllamaSpec()
    engines: EnginesSpec = EnginesSpec()
    hardware: HardwareSpec = HardwareSpec()
    monitoring: MonitoringSpec = MonitoringSpec()
    kubernetes: KubernetesSpec = KubernetesSpec()
    models: list[ModelSpec] = Field(min_length=1)
    """The models served. At least one."""
