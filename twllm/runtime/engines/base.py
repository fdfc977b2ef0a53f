"""The one small interface every engine (and the embedded database) offers the supervisor.

The plan says *what* runs (argv in engine-neutral form, env, port, ready URL); a driver knows
*how*: which executable really runs it, how to tell it is ready, and what must be provisioned
(e.g. Ollama models pulled) before it counts as ready. Generic runtime code never asks which
engine it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from twllm.plan.model import EngineProcess

Progress = Callable[[str], None]
"""Receives one short human-readable line of progress (e.g. 'pulling phi4-mini: 42%')."""


@dataclass(frozen=True)
class Launch:
    """A concrete command: what the supervisor passes to subprocess.Popen."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    """Added to (and overriding) the supervisor's environment."""
    cwd: Path | None = None


@dataclass(frozen=True)
class RuntimeContext:
    """What drivers may know about the deployment at run time."""

    state_dir: Path
    secrets: Mapping[str, str]
    """Secret values by deployment variable name (e.g. TWLLM_ENGINE_API_KEY); never logged."""
    vllm_python: Path | None = None
    """The Python of the environment that has vLLM, when the spec or `twllm engines` gives one."""


class EngineDriver(Protocol):
    """How one kind of engine is started, probed and provisioned."""

    def launch(self, proc: EngineProcess, ctx: RuntimeContext) -> Launch:
        """The real command for ``proc`` (raise twllm.errors.RuntimeFailure if it cannot run here)."""
        ...

    def ready(self, proc: EngineProcess, ctx: RuntimeContext) -> bool:
        """One quick probe (a few seconds at most): True once ``proc`` serves all its models.
        Never raises for connection errors; returns False."""
        ...

    def provision(self, proc: EngineProcess, ctx: RuntimeContext, progress: Progress) -> None:
        """Called once the server answers, before ``ready`` is polled: fetch or create models.
        A no-op for engines that load their model at start."""
        ...
