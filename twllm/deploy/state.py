"""The state directory of a deployment: where the plan, pids, ports, logs and secrets live.

    <state_dir>/
      plan.json                 the plan being run
      rendered/                 litellm_config.yaml, gateway.json (what the gateway reads)
      state.json                written by the supervisor: every component's pid, port, health
      supervisor.pid / .log     the background supervisor
      logs/<component>.log      one rotated log per component (.log.1, .log.2 ...)
      secrets/engine_key        generated key engines require (mode 0600)
      postgres/  ollama/        data of the embedded database and Ollama's models
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ComponentState:
    """What the supervisor knows of one component."""

    name: str
    kind: str
    """database | engine | gateway."""
    status: str = "waiting"
    """waiting | starting | provisioning | ready | restarting | failed | stopped."""
    pid: int | None = None
    port: int | None = None
    restarts: int = 0
    started_at: float | None = None
    ready_at: float | None = None
    detail: str = ""
    """A short human line: progress, or why it failed."""
    fingerprint: str = ""


@dataclass
class DeploymentState:
    """state.json: the supervisor's view, read by status, logs, stop and deploy."""

    name: str
    status: str = "starting"
    """starting | ready | reloading | failed | stopping | stopped."""
    supervisor_pid: int | None = None
    gateway_url: str | None = None
    generation: int = 0
    """Increases by one with every deploy the supervisor has applied."""
    updated_at: float = field(default_factory=time.time)
    error: str | None = None
    failed_component: str | None = None
    secret_digest: str = ""
    components: list[ComponentState] = field(default_factory=list)

    def component(self, name: str) -> ComponentState | None:
        return next((c for c in self.components if c.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DeploymentState":
        comps = [ComponentState(**c) for c in data.get("components", [])]
        return cls(**{**data, "components": comps})


class StateDir:
    """Paths inside one deployment's state directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()

    plan = property(lambda self: self.root / "plan.json")
    rendered = property(lambda self: self.root / "rendered")
    state_file = property(lambda self: self.root / "state.json")
    supervisor_pid = property(lambda self: self.root / "supervisor.pid")
    supervisor_log = property(lambda self: self.root / "supervisor.log")
    logs = property(lambda self: self.root / "logs")
    secrets_dir = property(lambda self: self.root / "secrets")
    reload_request = property(lambda self: self.root / "reload.json")

    def log_of(self, component: str) -> Path:
        return self.logs / f"{component}.log"

    def ensure(self) -> None:
        for path in (self.root, self.rendered, self.logs):
            path.mkdir(parents=True, exist_ok=True)
        self.secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def engine_key(self) -> str:
        """The key engines require, generated once per state directory (file mode 0600)."""
        path = self.secrets_dir / "engine_key"
        if path.exists():
            return path.read_text().strip()
        self.secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = "sk-engine-" + secrets.token_urlsafe(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key)
        return key

    def read_state(self) -> DeploymentState | None:
        try:
            return DeploymentState.from_dict(json.loads(self.state_file.read_text()))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None

    def write_state(self, state: DeploymentState) -> None:
        state.updated_at = time.time()
        write_atomic(self.state_file, json.dumps(state.to_dict(), indent=2))

    def read_plan(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.plan.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def guard_policies(self) -> list[str] | None:
        """The guard policies the rendered gateway settings define (None: nothing rendered yet)."""
        try:
            settings = json.loads((self.rendered / "gateway.json").read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return sorted(((settings.get("guard") or {}).get("policies") or {}))

    def supervisor_alive(self) -> int | None:
        """The supervisor's pid when it is running, else None."""
        try:
            pid = int(self.supervisor_pid.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid_alive(pid) else None


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie counts as gone
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True
