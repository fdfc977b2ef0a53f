"""Plan → LiteLLM proxy config and the gateway settings our hooks read."""
