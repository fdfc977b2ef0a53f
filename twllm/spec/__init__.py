"""Stage 1, the spec: what the user asked for. prod.yaml read with line numbers, checked field by field
(schema), and resolved against the model registry (resolve). Pure: reads the one file it is given."""
