"""Stage 3, the artefacts: the files rendered from a Plan (LiteLLM's config, the gateway's settings)."""
