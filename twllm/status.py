"""state.json's types: the supervisor's view of a deployment, read by the CLI and the gateway.

The supervisor (twllm.runtime.supervisor) writes it through ``DeploymentState.to_json``; ``twllm
status``, ``deploy`` and ``stop`` and the gateway's console read it with ``from_json``. This module
imports nothing of twllm, so every process may read the file without reaching into the runtime.
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ComponentStatus(StrEnum):
    """A component's status in state.json (written as the plain string)."""

    WAITING = "waiting"
    """Not started yet: an earlier kind (database, engines, gateway) is not ready."""
    PROVISIONING = "provisioning"
    """Started; pulling or creating what it serves (Ollama's models) before readiness is polled."""
    STARTING = "starting"
    """Started; polled until it answers."""
    READY = "ready"
    RESTARTING = "restarting"
    """Exited or stopped answering after it was ready; restarts after a backoff."""
    FAILED = "failed"
    STOPPED = "stopped"


class DeploymentStatus(StrEnum):
    """The whole deployment's status in state.json (written as the plain string)."""

    STARTING = "starting"
    READY = "ready"
    DEGRADED = "degraded"
    """Was ready; some component is not ready now (restarting)."""
    RELOADING = "reloading"
    """Applying a redeploy."""
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"


class ComponentState(BaseModel):
    """What the supervisor knows of one component."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: str
    """database | engine | gateway."""
    status: ComponentStatus = ComponentStatus.WAITING
    pid: int | None = None
    port: int | None = None
    restarts: int = 0
    started_at: float | None = None
    ready_at: float | None = None
    detail: str = ""
    """A short human line: progress, or why it failed."""
    fingerprint: str = ""


class DeploymentState(BaseModel):
    """state.json: the supervisor's view, read by status, logs, stop and deploy (this class writes
    and reads it)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    status: DeploymentStatus = DeploymentStatus.STARTING
    supervisor_pid: int | None = None
    gateway_url: str | None = None
    generation: int = 0
    """Increases by one with every deploy the supervisor has applied."""
    updated_at: float = Field(default_factory=time.time)
    error: str | None = None
    failed_component: str | None = None
    secret_digest: str = ""
    components: list[ComponentState] = Field(default_factory=list)

    def component(self, name: str) -> ComponentState | None:
        return next((c for c in self.components if c.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, statuses as their strings (`twllm status --json`)."""
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> DeploymentState:
        """ValueError (pydantic's ValidationError) when it is not a state this twllm wrote."""
        return cls.model_validate_json(text)
