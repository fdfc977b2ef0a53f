"""Commands on a spec before anything runs: validate, plan, render, schema, models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from typer.core import TyperArgument, TyperCommand

from twllm.cli.output import table as _table
from twllm.model_registry import load_registry
from twllm.plan.build import make_plan
from twllm.plan.model import Plan
from twllm.render.k8s import K8sOptions, render_k8s, write_k8s
from twllm.render.litellm_config import render as render_files
from twllm.render.monitoring import render_monitoring
from twllm.runtime.hardware import inventory
from twllm.settings import STATE_DIR_ENV, Settings
from twllm.spec.json_schema import spec_json_schema
from twllm.spec.resolve import LoadedSpec, load_spec

stdout = Console(highlight=False, soft_wrap=True)

CONFIG = typer.Option(..., "--config", "-c", help="The deployment spec (YAML).", show_default=False)
JSON = typer.Option(False, "--json", help="Write one JSON document to stdout.")
GPUS = typer.Option(
    None, "--gpus", min=0, help="Plan for this many GPUs instead of those detected (NVML) or the spec's hardware.gpus."
)
STATE_DIR = typer.Option(
    None,
    "--state-dir",
    help=f"State directory (default: the spec's state_dir, ${STATE_DIR_ENV}, or a per-user folder).",
)

models_app = typer.Typer(help="The model registry: what twllm knows how to serve.", no_args_is_help=True)


def _emit_json(document: object) -> None:
    typer.echo(json.dumps(document, indent=2, ensure_ascii=False))


def _state_dir(loaded: LoadedSpec, flag: Path | None) -> Path:
    if flag is not None:
        return flag
    if loaded.spec.state_dir is not None:
        return loaded.spec.state_dir
    return Settings.from_env().default_state_dir(loaded.spec.name)


def build_plan(config: Path, gpus: int | None, state_dir: Path | None) -> tuple[LoadedSpec, Plan]:
    """Load, validate and plan a spec the way every command does."""
    loaded = load_spec(config)
    hw = loaded.spec.hardware
    inv = inventory(gpus, hw.gpus, hw.gpu_memory_gib, Settings.from_env().gpus)
    return loaded, make_plan(loaded, inv, _state_dir(loaded, state_dir))


def validate(config: Path = CONFIG, json_out: bool = JSON) -> None:
    """Check a spec: syntax, fields, bounds, and models against the registry."""
    loaded = load_spec(config)
    spec = loaded.spec
    if json_out:
        _emit_json(
            {
                "valid": True,
                "file": str(config),
                "name": spec.name,
                "models": [
                    {
                        "name": m.name,
                        "engine": m.engine,
                        "device": m.device,
                        "task": m.task,
                        "replicas": m.spec.replicas,
                    }
                    for m in loaded.models
                ],
            }
        )
        return
    stdout.print(f"[green]✓[/] {config} is valid: deployment '{spec.name}', {len(spec.models)} model(s)")


def plan(
    config: Path = CONFIG, json_out: bool = JSON, gpus: int | None = GPUS, state_dir: Path | None = STATE_DIR
) -> None:
    """Show every process, port, GPU and route the spec turns into (changes nothing)."""
    _, the_plan = build_plan(config, gpus, state_dir)
    if json_out:
        _emit_json(the_plan.to_dict())
        return
    stdout.print(f"{the_plan.name}: gateway {the_plan.gateway.url} ({the_plan.gateway.workers} worker(s))")
    _table(
        ("component", "engine", "device", "serves", "port", "GPUs"),
        [
            (e.id, e.engine, e.device, ", ".join(e.models), str(e.port), ",".join(map(str, e.gpus)) or "-")
            for e in the_plan.engines
        ],
    )
    db = the_plan.database
    stdout.print(
        f"database: {'embedded in ' + str(db.data_dir) if db.embedded else 'external'}; "
        f"GPUs planned: {sum(len(e.gpus) for e in the_plan.engines)} of {the_plan.gpus_total}"
    )
    for note in the_plan.notes:
        stdout.print(f"[yellow]note:[/] {note}")


RENDER_FORMS = ("monitoring", "k8s")


class _RenderCommand(TyperCommand):
    """`render`'s usage line leaves out its hidden form argument (`twllm render monitoring …`)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if not (isinstance(param, TyperArgument) and param.hidden):
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


def render(
    what: str | None = typer.Argument(None, hidden=True, metavar="[monitoring|k8s]", show_default=False),
    config: Path = CONFIG,
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the files into."),
    gpus: int | None = GPUS,
    state_dir: Path | None = STATE_DIR,
    namespace: str | None = typer.Option(
        None, "--namespace", help="k8s: the namespace (default: the spec's kubernetes.namespace)."
    ),
    image: str | None = typer.Option(None, "--image", help="k8s: the gateway image (default: twllm-gateway:VERSION)."),
) -> None:
    """Write the LiteLLM proxy config, the gateway settings and the plan into a folder."""
    if what is not None and what not in RENDER_FORMS:
        raise typer.BadParameter(
            f"{what!r} is not something to render (only: {', '.join(RENDER_FORMS)})", param_hint="WHAT"
        )
    if what != "k8s" and (namespace is not None or image is not None):
        raise typer.BadParameter("--namespace and --image are for `twllm render k8s`")
    if what == "k8s":
        # `twllm render k8s`: manifests for a cluster (README, "From one machine to a cluster").
        result = render_k8s(load_spec(config), options=K8sOptions(namespace=namespace, image=image))
        for path in write_k8s(result, out):
            stdout.print(str(path))
        for note in result.notes:
            stdout.print(f"[yellow]note:[/] {note}")
        stdout.print(
            f"next: create the Secret {result.secret_name} ({', '.join(result.secret_keys)}; HF_TOKEN optional), "
            f"then kubectl apply -k {out}",
            markup=False,
        )
        return
    loaded, the_plan = build_plan(config, gpus, state_dir)
    # `twllm render monitoring`: prometheus.yml and the Grafana dashboard (README, "Monitoring").
    paths = render_monitoring(the_plan, out) if what == "monitoring" else render_files(the_plan, loaded.spec, out)
    for path in paths:
        stdout.print(str(path))


def schema() -> None:
    """Print the JSON Schema of the deployment spec (for editors)."""
    _emit_json(spec_json_schema())


@models_app.command("list")
def models_list(
    json_out: bool = JSON,
    task: str | None = typer.Option(None, "--task", help="Only chat, embed, rerank, guard or classify models."),
) -> None:
    """List the registry's models."""
    entries = [e for e in load_registry().entries if task is None or e.task == task]
    if json_out:
        _emit_json([e.model_dump(mode="json") for e in entries])
        return
    columns = ("id", "task", "params", "context", "bf16 GiB", "ollama", "licence")
    rows = [
        (
            e.id,
            e.task,
            f"{e.params_b:g}B",
            str(e.context_length),
            f"{e.weight_gib('bfloat16'):.1f}",
            e.ollama_tag or "-",
            e.license + (" (gated)" if e.gated else ""),
        )
        for e in entries
    ]
    _table(columns, rows)


@models_app.command("show")
def models_show(
    model_id: str = typer.Argument(..., metavar="ID", help="Registry id (see `twllm models list`)."),
    json_out: bool = JSON,
) -> None:
    """Show one registry entry."""
    entry = load_registry().get(model_id)
    data = entry.model_dump(mode="json")
    data["weight_gib"] = entry.weight_memory_table()
    if json_out:
        _emit_json(data)
        return
    for key, value in data.items():
        stdout.print(f"[bold]{key}[/]: ", end="")
        stdout.print(str(value), markup=False)


def register(app: typer.Typer) -> None:
    """Add validate, plan, render, schema and the models group to the root command."""
    for command in (validate, plan, render, schema):
        app.command(cls=_RenderCommand if command is render else None)(command)
    app.add_typer(models_app, name="models")
