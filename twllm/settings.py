"""Every environment variable twllm reads, with its default and meaning, read in one place."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# --- names ---------------------------------------------------------------------------------------
# Every module that reads or sets one of these imports the constant from here; a unit test
# (tests/unit/test_settings.py) fails on a TWLLM_* name spelled anywhere else in twllm/.

STATE_DIR_ENV = "TWLLM_STATE_DIR"
GPUS_ENV = "TWLLM_GPUS"
DEBUG_ENV = "TWLLM_DEBUG"
MASTER_KEY_ENV = "TWLLM_MASTER_KEY"
ENGINE_KEY_ENV = "TWLLM_ENGINE_API_KEY"
GATEWAY_SETTINGS_ENV = "TWLLM_GATEWAY_SETTINGS"
DATABASE_URL_ENV = "TWLLM_DATABASE_URL"
SPOOL_DIR_ENV = "TWLLM_SPOOL_DIR"
ENGINES_DIR_ENV = "TWLLM_ENGINES_DIR"
MODELS_DIR_ENV = "TWLLM_MODELS_DIR"
OLLAMA_BIN_ENV = "TWLLM_OLLAMA_BIN"
GATEWAY_LEAN_ENV = "TWLLM_GATEWAY_LEAN"
GATEWAY_HTTP_ENV = "TWLLM_GATEWAY_HTTP"
BENCH_PREFIX = "TWLLM_BENCH_"
BENCH_API_KEY_ENV = BENCH_PREFIX + "API_KEY"
BENCH_MODELS_ENV = BENCH_PREFIX + "MODELS"
BENCH_EMBEDDINGS_MODEL_ENV = BENCH_PREFIX + "EMBEDDINGS_MODEL"
BENCH_MAX_TOKENS_ENV = BENCH_PREFIX + "MAX_TOKENS"
BENCH_STREAM_ENV = BENCH_PREFIX + "STREAM"
BENCH_IGNORE_EOS_ENV = BENCH_PREFIX + "IGNORE_EOS"
BENCH_PROMPT_SET_ENV = BENCH_PREFIX + "PROMPT_SET"
BENCH_API_KEY_ENV_ENV = BENCH_PREFIX + "API_KEY_ENV"
BENCH_SAMPLES_FILE_ENV = BENCH_PREFIX + "SAMPLES_FILE"
PROMETHEUS_MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
XDG_STATE_HOME_ENV = "XDG_STATE_HOME"
XDG_DATA_HOME_ENV = "XDG_DATA_HOME"
PREFIX = "TWLLM_"
"""Every twllm variable starts so; a child process that must not inherit them drops this prefix."""

# --- the table -----------------------------------------------------------------------------------

TABLE: tuple[tuple[str, str], ...] = (
    (STATE_DIR_ENV, "State directory when neither --state-dir nor the spec's state_dir is given."),
    (GPUS_ENV, "Number of GPUs to plan for when neither --gpus nor NVML gives one."),
    (DEBUG_ENV, "Set to 1 to show tracebacks (same as --debug)."),
    (MASTER_KEY_ENV, "The gateway's admin key, by convention referenced from the spec."),
    (ENGINE_KEY_ENV, "The key between the gateway and its engines; set by the supervisor, never by hand."),
    (GATEWAY_SETTINGS_ENV, "Path of gateway.json; set by the supervisor for the gateway's hooks."),
    (DATABASE_URL_ENV, "The deployment's PostgreSQL, for the gateway's hooks; set by the supervisor."),
    (
        SPOOL_DIR_ENV,
        "Where the gateway journals ledger rows until PostgreSQL has them; set by the supervisor (<state_dir>/spool).",
    ),
    (
        ENGINES_DIR_ENV,
        "Where `twllm engines install` puts engine environments (default $XDG_DATA_HOME/twllm/engines).",
    ),
    (
        MODELS_DIR_ENV,
        "Where locally built models live (the demo chat model, copies of packaged models); default ~/.cache/twllm/models.",
    ),
    (OLLAMA_BIN_ENV, "The ollama executable (default: `ollama` on PATH)."),
    (
        GATEWAY_LEAN_ENV,
        "Diagnostic: which of LiteLLM's unneeded per-request work the gateway switches off "
        "(middleware,otel,gauges; none; default all), for benchmarks/gateway_cpu.py --ablation.",
    ),
    (GATEWAY_HTTP_ENV, "Diagnostic: uvicorn's HTTP parser for the gateway (default auto: httptools; h11)."),
    (BENCH_API_KEY_ENV, "The API key `twllm bench` and the load test send (default name of --api-key-env)."),
    (BENCH_MODELS_ENV, "Load test: chat models to load, comma separated (its --models)."),
    (BENCH_EMBEDDINGS_MODEL_ENV, "Load test: an embeddings model to load as well (its --embeddings-model)."),
    (BENCH_MAX_TOKENS_ENV, "Load test: max_tokens of every chat completion (its --max-tokens)."),
    (BENCH_STREAM_ENV, "Load test: on for streamed chat completions, off for plain (its --stream)."),
    (BENCH_IGNORE_EOS_ENV, "Load test: on to ask vLLM for exactly max_tokens (its --ignore-eos)."),
    (BENCH_PROMPT_SET_ENV, "Load test: zh-tw or a YAML/JSON file of prompts (its --prompt-set)."),
    (BENCH_API_KEY_ENV_ENV, "Load test: the name of the variable holding the API key (its --api-key-env)."),
    (BENCH_SAMPLES_FILE_ENV, "Load test: where to write every request's measurements (its --samples-file)."),
    (
        PROMETHEUS_MULTIPROC_DIR_ENV,
        "prometheus_client's multiprocess folder, where every gateway worker keeps its series for one "
        "/metrics scrape; set by the supervisor (<state_dir>/gateway-metrics), emptied at each gateway start.",
    ),
    (XDG_STATE_HOME_ENV, "Base of the default per-user state directory (~/.local/state)."),
    (XDG_DATA_HOME_ENV, "Base of the default engines directory (~/.local/share)."),
)
"""Every environment variable twllm reads or sets: (name, meaning)."""

VARIABLES: dict[str, str] = dict(TABLE)


@dataclass(frozen=True)
class Settings:
    """twllm's view of the environment."""

    state_dir: Path | None
    gpus: int | None
    debug: bool
    state_home: Path
    engines_dir: Path
    models_dir: Path
    ollama_bin: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        gpus = env.get(GPUS_ENV)
        home = env.get(XDG_STATE_HOME_ENV) or str(Path.home() / ".local" / "state")
        data = env.get(XDG_DATA_HOME_ENV) or str(Path.home() / ".local" / "share")
        return cls(
            engines_dir=Path(env.get(ENGINES_DIR_ENV) or Path(data) / "twllm" / "engines").expanduser(),
            models_dir=Path(env.get(MODELS_DIR_ENV) or Path.home() / ".cache" / "twllm" / "models").expanduser(),
            ollama_bin=env.get(OLLAMA_BIN_ENV) or "ollama",
            state_dir=Path(env[STATE_DIR_ENV]) if env.get(STATE_DIR_ENV) else None,
            gpus=int(gpus) if gpus and gpus.isdigit() else None,
            debug=env.get(DEBUG_ENV, "") not in ("", "0", "false"),
            state_home=Path(home),
        )

    def default_state_dir(self, deployment: str) -> Path:
        """Per-user state directory of a deployment."""
        return self.state_dir or self.state_home / "twllm" / deployment
