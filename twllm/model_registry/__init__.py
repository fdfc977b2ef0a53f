"""Model registry: the catalog of models twllm can deploy, and lookup by id or HF repo."""

from .entry import ModelEntry
from .registry import Registry, load_registry

__all__ = ["ModelEntry", "Registry", "load_registry"]
