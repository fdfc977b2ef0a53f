"""Components' health for the console: the supervisor's state.json, read through ``twllm.status``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twllm.status import DeploymentState

STATE_FILE = "state.json"


def read_health(state_dir: str | Path | None) -> dict[str, Any]:
    """The deployment's status and each component's; ``available`` False (with a reason) when
    there is no state folder configured or no readable state.json in it."""
    if state_dir is None:
        return {"available": False, "reason": "gateway.json names no state folder (state_dir)"}
    path = Path(state_dir) / STATE_FILE
    try:
        state = DeploymentState.from_json(path.read_bytes())
    except FileNotFoundError:
        return {"available": False, "reason": f"no {STATE_FILE} yet (is the supervisor running?)"}
    except (OSError, ValueError) as exc:
        return {"available": False, "reason": f"{STATE_FILE} cannot be read: {type(exc).__name__}"}
    return {
        "available": True,
        "name": state.name,
        "status": str(state.status),
        "generation": state.generation,
        "updated_at": state.updated_at,
        "error": state.error,
        "components": [
            {
                "name": c.name,
                "kind": c.kind,
                "status": str(c.status),
                "restarts": c.restarts,
                "ready_at": c.ready_at,
                "detail": c.detail,
            }
            for c in state.components
        ],
    }
