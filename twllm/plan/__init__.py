"""Stage 2, the plan: pure decisions about which process serves what, where, with which argv and env.
No I/O and no processes; the Plan it makes is frozen data that the runtime executes."""
