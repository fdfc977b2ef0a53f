"""`twllm eval zh-tw`: how Taiwan-Traditional each model's answers are, before and after normalisation."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import typer

from twllm.cli.output import stderr, table
from twllm.errors import RuntimeFailure
from twllm.settings import MASTER_KEY_ENV

eval_app = typer.Typer(help="Measure the deployment's answers: zh-tw.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add the eval group to ``app`` (once)."""
    if not any(group.name == "eval" for group in app.registered_groups):
        app.add_typer(eval_app, name="eval")


@eval_app.callback()
def _eval() -> None:
    """Measure the deployment's answers."""


@eval_app.command("zh-tw")
def zh_tw(
    endpoint: str = typer.Option(
        ...,
        "--endpoint",
        help="OpenAI-compatible base URL: the gateway or an engine, with or without /v1.",
        show_default=False,
    ),
    models: list[str] = typer.Option(..., "--model", help="Model to ask; repeat for several.", show_default=False),
    prompts_file: Path | None = typer.Option(
        None,
        "--prompts",
        help="YAML file of prompts (prompts: [{id, category, prompt}]); default: the 105 built-in zh-TW prompts.",
    ),
    out: Path = typer.Option(
        Path("zh-tw-eval"), "--out", help="Folder for zh_tw_eval.csv, zh_tw_summary.csv and zh_tw_eval.png."
    ),
    api_key_env: str = typer.Option(
        MASTER_KEY_ENV, "--api-key-env", help="Environment variable holding the API key (never printed or written)."
    ),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="max_tokens of each request."),
    concurrency: int = typer.Option(4, "--concurrency", min=1, max=64, help="Requests in flight at once."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Send only the first N prompts."),
    timeout: float = typer.Option(120.0, "--timeout", min=1, help="Seconds to wait for one answer."),
    json_out: bool = typer.Option(False, "--json", help="Write the per-model figures as one JSON document to stdout."),
) -> None:
    """Send zh-TW prompts to each model and report, per model, the share of answers with
    Simplified-only characters and with mainland terms, as received and after twllm's
    normalisation, and latency p50/p90. Writes two CSV files and a chart to --out.
    """
    from twllm.zh_tw.evaluate import Endpoint, load_prompts, run_eval
    from twllm.zh_tw.report import draw_chart, milliseconds, percent, summarize, write_csvs

    prompts = load_prompts(prompts_file)[:limit]
    models = list(dict.fromkeys(models))
    with Endpoint(endpoint, os.environ.get(api_key_env) or None, timeout_s=timeout) as client:
        client.check_models(models)
        stderr.print(f"asking {len(models)} model(s) {len(prompts)} prompts each at {client.url}")
        answers = run_eval(client, models, prompts, max_tokens=max_tokens, concurrency=concurrency, progress=_progress)
    summaries = summarize(answers)
    eval_csv, summary_csv = write_csvs(answers, summaries, out)
    chart = draw_chart(summaries, out / "zh_tw_eval.png")
    if json_out:
        document = [
            {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(s).items()}
            for s in summaries
        ]
        typer.echo(
            json.dumps(
                {"models": document, "files": [str(eval_csv), str(summary_csv), str(chart)]},
                indent=2,
                ensure_ascii=False,
            )
        )
    else:
        table(
            (
                "model",
                "answers",
                "errors",
                "simplified before",
                "after",
                "mainland terms before",
                "after",
                "p50 ms",
                "p90 ms",
            ),
            [
                (
                    s.model,
                    str(s.answers),
                    str(s.errors),
                    percent(s.simplified_before),
                    percent(s.simplified_after),
                    percent(s.mainland_before),
                    percent(s.mainland_after),
                    milliseconds(s.latency_p50_ms),
                    milliseconds(s.latency_p90_ms),
                )
                for s in summaries
            ],
        )
        stderr.print(f"wrote {eval_csv}, {summary_csv} and {chart}")
    silent = [s.model for s in summaries if s.answers == 0]
    if silent:
        first = next(a.error for a in answers if a.model == silent[0] and a.error)
        raise RuntimeFailure(
            f"no answer from {', '.join(silent)}; first error: {first}", hint=f"every request's error is in {eval_csv}"
        )


def _progress(model: str, done: int, total: int) -> None:
    if done == total or done % 10 == 0:
        stderr.print(f"  {model}: {done}/{total}")
