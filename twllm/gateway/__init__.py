"""The gateway process: LiteLLM's proxy behind twllm's shield (routes, limits, OpenAI's errors)."""
