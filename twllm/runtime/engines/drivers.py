"""Which driver runs an engine named in the plan: the one place that lists the engines."""

from __future__ import annotations

from twllm.runtime.engines.base import EngineDriver
from twllm.runtime.engines.ollama import OllamaDriver
from twllm.runtime.engines.vllm import VllmDriver

DRIVERS: dict[str, type[EngineDriver]] = {"vllm": VllmDriver, "ollama": OllamaDriver}


def driver_for(engine: str) -> EngineDriver:
    """The driver of an engine named in the plan ('vllm' or 'ollama')."""
    try:
        return DRIVERS[engine]()
    except KeyError:
        raise ValueError(f"unknown engine {engine!r}") from None
