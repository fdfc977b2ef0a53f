"""Every environment variable twllm reads, with its default and meaning, read in one place."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

VARIABLES: dict[str, str] = {
    "TWLLM_STATE_DIR": "State directory when neither --state-dir nor the spec's state_dir is given.",
    "TWLLM_GPUS": "Number of GPUs to plan for when neither --gpus nor NVML gives one.",
    "TWLLM_DEBUG": "Set to 1 to show tracebacks (same as --debug).",
    "TWLLM_MASTER_KEY": "The gateway's admin key, by convention referenced from the spec.",
    "TWLLM_GATEWAY_SETTINGS": "Path of gateway.json; set by the supervisor for the gateway's hooks.",
    "TWLLM_DATABASE_URL": "The deployment's PostgreSQL, for the gateway's hooks; set by the supervisor.",
    "TWLLM_SPOOL_DIR": "Where the gateway journals ledger rows until PostgreSQL has them; set by the supervisor (<state_dir>/spool).",
    "TWLLM_ENGINES_DIR": "Where `twllm engines install` puts engine environments (default $XDG_DATA_HOME/twllm/engines).",
    "TWLLM_MODELS_DIR": "Where locally built models live (the demo chat model, copies of packaged models); default ~/.cache/twllm/models.",
    "TWLLM_OLLAMA_BIN": "The ollama executable (default: `ollama` on PATH).",
    "XDG_STATE_HOME": "Base of the default per-user state directory (~/.local/state).",
    "XDG_DATA_HOME": "Base of the default engines directory (~/.local/share).",
}


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
        gpus = env.get("TWLLM_GPUS")
        home = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        data = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        return cls(
            engines_dir=Path(env.get("TWLLM_ENGINES_DIR") or Path(data) / "twllm" / "engines").expanduser(),
            models_dir=Path(env.get("TWLLM_MODELS_DIR") or Path.home() / ".cache" / "twllm" / "models").expanduser(),
            ollama_bin=env.get("TWLLM_OLLAMA_BIN") or "ollama",
            state_dir=Path(env["TWLLM_STATE_DIR"]) if env.get("TWLLM_STATE_DIR") else None,
            gpus=int(gpus) if gpus and gpus.isdigit() else None,
            debug=env.get("TWLLM_DEBUG", "") not in ("", "0", "false"),
            state_home=Path(home),
        )

    def default_state_dir(self, deployment: str) -> Path:
        """Per-user state directory of a deployment."""
        return self.state_dir or self.state_home / "twllm" / deployment
