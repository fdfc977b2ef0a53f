"""Spec, plan, placement and (later) the runtime of a twllm deployment."""
