"""`twllm guard check`: run the spec's guard pipeline on one text, to try a policy before it goes live."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from twllm.errors import did_you_mean
from twllm.spec.resolve import load_spec

guard_app = typer.Typer(
    help="The Safety Guard: PII masking, Llama Guard and Prompt Guard checks.", no_args_is_help=True
)


@guard_app.callback()
def _guard() -> None:
    """The Safety Guard: PII masking, Llama Guard and Prompt Guard checks."""


@guard_app.command()
def check(
    text: str = typer.Argument(..., metavar="TEXT|-", help="The text to check; '-' reads it from stdin."),
    config: Path = typer.Option(..., "--config", "-c", help="The deployment spec (YAML).", show_default=False),
    stage: str = typer.Option("input", "--stage", help="Run the spec's input or output stages."),
    model: str | None = typer.Option(
        None, "--model", help="Check as for this model of the spec (its own guard settings)."
    ),
    policy: str | None = typer.Option(
        None, "--policy", help="Check as for a tenant or key with this policy of guard.policies."
    ),
    json_out: bool = typer.Option(False, "--json", help="Write one JSON document to stdout."),
) -> None:
    """Run the configured guard stages on TEXT and print the verdict, categories and resulting text.

    The policy is resolved as the gateway resolves it (gateway-wide, then the model's, then the
    tenant's), and a guard model served by one of the deployment's engines is asked there.
    Exits 0 whenever the check ran: the verdict (allow, mask, block) is the output, not an error.
    """
    from twllm.guard.pipeline import GuardPipeline
    from twllm.guard.policy import GuardPolicies
    from twllm.spec.guard_layers import served_guard_models

    if stage not in ("input", "output"):
        raise typer.BadParameter(f"'{stage}' is neither input nor output", param_hint="--stage")
    loaded = load_spec(config)
    names = [m.name for m in loaded.spec.models]
    if model is not None and model not in names:
        raise typer.BadParameter(
            f"no model '{model}' in {config}{did_you_mean(model, names)}; the spec has: {', '.join(names)}",
            param_hint="--model",
        )
    known = sorted(loaded.spec.guard.policies)
    if policy is not None and policy not in known:
        raise typer.BadParameter(
            f"no guard policy '{policy}' in {config}{did_you_mean(policy, known)}; "
            f"defined: {', '.join(known) or 'none'}",
            param_hint="--policy",
        )
    if text == "-":
        text = sys.stdin.read()
    policies = GuardPolicies.from_spec(loaded.spec)
    if served_guard_models(loaded.spec):
        # A guard model served by this deployment: ask the running engine, as the gateway does.
        policies.remote = _running_remote(config)
    pipeline = GuardPipeline(policies.resolve(model, policy), remote=policies.remote)
    result = pipeline.run(text, stage=stage)  # type: ignore[arg-type]
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


def _running_remote(config: Path) -> dict:
    """Where the running deployment's engines serve guard models (from its rendered settings)."""
    from twllm.cli.runtime_cmds import find_state_dir
    from twllm.gateway.settings import GatewaySettings
    from twllm.guard.policy import GuardPolicies

    sd = find_state_dir(None, config)
    try:
        settings = GatewaySettings.load(sd.rendered / "gateway.json")
    except (OSError, ValueError):
        return {}  # not deployed: the check fails, and the failure policy says what that means
    remote = GuardPolicies.from_settings(settings.guard).remote
    key_file = sd.secrets_dir / "engine_key"
    for target in remote.values():
        if target.api_key_env and target.api_key_env not in os.environ and key_file.exists():
            os.environ[target.api_key_env] = key_file.read_text().strip()  # this process only
    return remote
