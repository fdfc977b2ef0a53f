"""Engine drivers (vLLM, Ollama) behind one interface, and their installed environments."""

from twllm.deploy.engines.base import EngineDriver, Launch, RuntimeContext, driver_for

__all__ = ["EngineDriver", "Launch", "RuntimeContext", "driver_for"]
