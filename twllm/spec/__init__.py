"""Stage 1, the spec: what the user asked for, read from one YAML file, checked and resolved.

prod.yaml is read with line numbers (source), checked field by field (schema) and resolved against
the model registry (resolve); guard_layers says how guard settings layer. Pure: it reads the one file
it is given (and the environment, for ``${VAR}``) and starts nothing."""
