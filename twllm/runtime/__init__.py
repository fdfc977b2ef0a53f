"""Stage 4, the runtime: the only code that starts a deployment's processes, signals them and keeps its state.

supervisor (keeps a plan's components up), components (database, engines, gateway as one kind of
thing), engines (drivers and their environments), database, gateway (how the proxy is launched),
state, logs, hardware (the host's GPUs), ports, database_url, and control (deploy, status, stop as
the CLI calls them)."""
