"""`python -m twllm` runs the command line."""

from twllm.cli.app import run

run()
