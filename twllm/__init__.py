"""twllm: a configuration-driven deployment of a multi-model LLM API service for Taiwan."""

__version__ = "0.1.0"
