"""The `twllm` command line: thin commands over the library packages."""
