"""Every environment variable twllm reads, with its default and meaning, read in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

VARIABLES: dict[str, str] = {
    "TWLLM_STATE_DIR": "State directory when neither --state-dir nor the spec's state_dir is given.",
    "TWLLM_GPUS": "Number of GPUs to plan for when neither --gpus nor NVML gives one.",
    "TWLLM_DEBUG": "Set to 1 to show tracebacks (same as --debug).",
    "TWLLM_MASTER_KEY": "The gateway's admin key, by convention referenced from the spec.",
    "TWLLM_GATEWAY_SETTINGS": "Path of gateway.json; set by the supervisor for the gateway's hooks.",
    "XDG_STATE_HOME": "Base of the default per-user state directory (~/.local/state).",
}


@dataclass(frozen=True)
class Settings:
    """twllm's view of the environment."""

    state_dir: Path | None
    gpus: int | None
    debug: bool
    state_home: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        gpus = env.get("TWLLM_GPUS")
        home = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return cls(
            state_dir=Path(env["TWLLM_STATE_DIR"]) if env.get("TWLLM_STATE_DIR") else None,
            gpus=int(gpus) if gpus and gpus.isdigit() else None,
            debug=env.get("TWLLM_DEBUG", "") not in ("", "0", "false"),
            state_home=Path(home),
        )

    def default_state_dir(self, deployment: str) -> Path:
        """Per-user state directory of a deployment."""
        return self.state_dir or self.state_home / "twllm" / deployment
