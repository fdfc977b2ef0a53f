"""Stage 2, the plan: pure decisions about which process serves what, where, with which argv and env.

Deciding does no I/O and starts nothing (build, placement, vllm_flags); the Plan it makes (model)
is frozen data, written to and read from plan.json, that the runtime executes."""
