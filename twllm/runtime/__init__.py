"""Stage 4, the runtime: the only code that starts processes, writes the state directory and signals.

supervisor (keeps a plan's components up), components (database, engines, gateway as one kind of
thing), engines (drivers and their environments), database, state, logs, control (deploy, status,
stop as the CLI calls them)."""
