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
    response_format: str | None = typer.Option(
        None,
        "--response-format",
        help="Check TEXT as the answer to a request with this response_format: json_object, or a "
        "file holding the JSON Schema of a json_schema request.",
    ),
) -> None:
    """Run the configured guard stages on TEXT and print the verdict, categories and resulting text.

    The policy is resolved as the gateway resolves it (gateway-wide, then the model's, then the
    tenant's), and a guard model served by one of the deployment's engines is asked there.
    With --stage output and a zh_tw stage, every rewrite it makes is listed span by span (offsets
    in the text the stage received), and so are the spans it keeps as written (URLs, paths, code,
    tags; JSON keys and fixed values).
    Exits 0 whenever the check ran: the verdict (allow, mask, block) is the output, not an error.
    """
    from twllm.guard.pipeline import GuardPipeline
    from twllm.guard.policy import GuardPolicies
    from twllm.spec.guard_layers import served_guard_models
    from twllm.zh_tw.structured import JsonFormat

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
    structure: JsonFormat | None = None
    if response_format == "json_object":
        structure = JsonFormat()
    elif response_format is not None:
        try:
            schema = json.loads(Path(response_format).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise typer.BadParameter(
                f"neither json_object nor a readable JSON Schema file: {exc}", param_hint="--response-format"
            ) from None
        if not isinstance(schema, dict):
            raise typer.BadParameter("the JSON Schema must be an object", param_hint="--response-format")
        structure = JsonFormat(schema)
    if text == "-":
        text = sys.stdin.read()
    policies = GuardPolicies.from_spec(loaded.spec)
    if served_guard_models(loaded.spec):
        # A guard model served by this deployment: ask the running engine, as the gateway does.
        policies.remote = _running_remote(config)
    pipeline = GuardPipeline(policies.resolve(model, policy), remote=policies.remote)
    result = pipeline.run(text, stage=stage, structure=structure)  # type: ignore[arg-type]
    audit = _zh_tw_audit(pipeline, text, structure) if stage == "output" and not result.blocked else None
    if json_out:
        data = result.to_dict()
        if audit is not None:
            data["zh_tw"] = audit
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    typer.echo(f"verdict: {result.verdict}")
    typer.echo(f"categories: {', '.join(result.categories) or '-'}")
    if result.message:
        typer.echo(f"message: {result.message}")
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    if audit is not None:
        if audit.get("skipped"):
            typer.echo(f"zh_tw: {audit['skipped']}")
        if "received" in audit:  # offsets below are in what the earlier stages left
            typer.echo(f"zh_tw received: {audit['received']}")
        typer.echo(f"zh_tw changes: {len(audit['changes'])}")
        for change in audit["changes"]:
            typer.echo(f"  {change['start']}-{change['end']}\t{change['before']} → {change['after']}")
        typer.echo(f"zh_tw kept as written: {len(audit['protected'])}")
        for span in audit["protected"]:
            typer.echo(f"  {span['start']}-{span['end']}\t{span['kind']}\t{span['text']}")
    typer.echo(f"text: {result.text}")


def _zh_tw_audit(pipeline, text: str, structure) -> dict | None:
    """What the zh_tw output stage rewrites in ``text`` and what it keeps as written, span by
    span, at offsets in the text that stage receives (after the stages before it, e.g. a PII
    mask); None when the stage is not configured."""
    from twllm.zh_tw.normalize import changes, protected_spans
    from twllm.zh_tw.structured import json_changes

    names = pipeline.stages("output")
    if "zh_tw" not in names:
        return None
    before = [n for n in names[: names.index("zh_tw")] if n == "pii"]
    received = pipeline.run(text, "output", only=before).text if before else text
    audit: dict = {"received": received} if received != text else {}
    if structure is not None and pipeline.spec.zh_tw.structured == "off":
        audit.update(skipped="a JSON answer, and guard.zh_tw.structured is off", changes=[], protected=[])
        return audit
    if structure is None:
        found, kept = changes(received), protected_spans(received)
    else:
        found, kept = json_changes(received, structure)
    audit["changes"] = [{"start": c.start, "end": c.end, "before": c.before, "after": c.after} for c in found]
    audit["protected"] = [{"start": s, "end": e, "kind": k, "text": received[s:e]} for s, e, k in kept]
    return audit


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
