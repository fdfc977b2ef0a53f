"""`twllm guard check`: run the spec's guard pipeline on one text, to try a policy before it goes live."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from twllm.deploy.resolve import load_spec
from twllm.errors import did_you_mean

guard_app = typer.Typer(help="The Safety Guard: PII masking, Llama Guard and Prompt Guard checks.",
                        no_args_is_help=True)


@guard_app.callback()
def _guard() -> None:
    """The Safety Guard: PII masking, Llama Guard and Prompt Guard checks."""


@guard_app.command()
def check(
    text: str = typer.Argument(..., metavar="TEXT|-", help="The text to check; '-' reads it from stdin."),
    config: Path = typer.Option(..., "--config", "-c", help="The deployment spec (YAML).", show_default=False),
    stage: str = typer.Option("input", "--stage", help="Run the spec's input or output stages."),
    model: Optional[str] = typer.Option(None, "--model", help="Check as for this model of the spec."),
    json_out: bool = typer.Option(False, "--json", help="Write one JSON document to stdout."),
) -> None:
    """Run the configured guard stages on TEXT and print the verdict, categories and resulting text.

    Exits 0 whenever the check ran: the verdict (allow, mask, block) is the output, not an error.
    """
    from twllm.guard.pipeline import GuardPipeline

    if stage not in ("input", "output"):
        raise typer.BadParameter(f"'{stage}' is neither input nor output", param_hint="--stage")
    loaded = load_spec(config)
    names = [m.name for m in loaded.spec.models]
    if model is not None and model not in names:
        raise typer.BadParameter(f"no model '{model}' in {config}{did_you_mean(model, names)}; "
                                 f"the spec has: {', '.join(names)}", param_hint="--model")
    if text == "-":
        text = sys.stdin.read()
    result = GuardPipeline.from_spec(loaded.spec.guard).run(text, stage=stage)  # type: ignore[arg-type]
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
        return
    typer.echo(f"verdict: {result.verdict}")
    typer.echo(f"categories: {', '.join(result.categories) or '-'}")
    if result.message:
        typer.echo(f"message: {result.message}")
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"text: {result.text}")
