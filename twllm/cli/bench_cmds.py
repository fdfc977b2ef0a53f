"""`twllm bench`: a headless locust load test against an endpoint, or the four-way comparison (--compare).

    twllm bench --endpoint http://127.0.0.1:4000/v1 --model demo-chat --users 16 --duration 60s
    twllm bench --compare --config examples/local.yaml --users 8 --duration 30s --rounds 3

The first loads one endpoint with the key in $TWLLM_BENCH_API_KEY (or --api-key-env); the second
deploys the spec (or uses its running deployment) and loads the engine directly, a bare LiteLLM
proxy, the twllm gateway and the gateway with guards, in interleaved rounds. Both write locust's
CSVs, every request's measurements (JSON lines), summary.json/txt and a PNG chart to --out.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from twllm.cli.output import stderr
from twllm.settings import BENCH_API_KEY_ENV

if TYPE_CHECKING:  # at run time imported inside the commands, which keeps the CLI quick to start
    from twllm.bench.load import LoadSettings
    from twllm.bench.runner import Load

MODEL = typer.Option(
    None,
    "--model",
    "-m",
    help="Chat model to load (repeat for several). With --compare: the spec's model to compare (default: its first chat model).",
)
ENDPOINT = typer.Option(
    None, "--endpoint", help="OpenAI base URL to load, e.g. http://127.0.0.1:4000/v1 (not with --compare)."
)
USERS = typer.Option(
    8, "--users", "-u", min=1, help="Concurrent users (each sends its next request when the last is answered)."
)
SPAWN_RATE = typer.Option(0.0, "--spawn-rate", "-r", min=0.0, help="Users started per second (0: all at once).")
DURATION = typer.Option("30s", "--duration", "-t", help="How long each run loads (locust's form: 30s, 2m, 1m30s).")
MAX_TOKENS = typer.Option(64, "--max-tokens", min=1, help="max_tokens of every chat completion.")
STREAM = typer.Option(
    True, "--stream/--no-stream", help="Streamed chat completions (TTFT and ITL measured) or plain ones."
)
IGNORE_EOS = typer.Option(
    True,
    "--ignore-eos/--no-ignore-eos",
    help="Ask vLLM for exactly max_tokens tokens (ignore_eos), as vLLM's own benchmarks do.",
)
EMBEDDINGS = typer.Option(
    None, "--embeddings-model", help="Also load this embeddings model (one request in each user's rotation)."
)
PROMPTS = typer.Option(
    "zh-tw",
    "--prompt-set",
    help="zh-tw (the built-in Traditional Chinese prompts) or a YAML/JSON file with a `prompts` list.",
)
OUT = typer.Option(None, "--out", "-o", help="Folder for CSVs, samples, summary and chart (default: ./bench-<time>).")
API_KEY_ENV = typer.Option(
    BENCH_API_KEY_ENV, "--api-key-env", help="Environment variable holding the API key (never printed)."
)
COMPARE = typer.Option(
    False,
    "--compare",
    help="Compare direct engine, bare LiteLLM, twllm gateway and gateway with guards (needs --config).",
)
CONFIG = typer.Option(
    None, "--config", "-c", help="With --compare: the deployment spec (deployed for the run unless already running)."
)
STATE_DIR = typer.Option(
    None, "--state-dir", help="With --compare: the deployment's state directory (default as for `twllm deploy`)."
)
ROUNDS = typer.Option(
    3, "--rounds", min=1, help="With --compare: rounds; each runs every target once, in rotated order."
)
TARGETS = typer.Option(
    "direct,litellm,twllm,twllm+guard", "--targets", help="With --compare: which targets, comma separated."
)
KEEP = typer.Option(False, "--keep", help="With --compare: leave a deployment started for the run running.")
JSON_OUT = typer.Option(False, "--json", help="Write one JSON document (the summary) to stdout.")


def register(app: typer.Typer) -> None:
    """Add `bench` to ``app`` (once)."""
    if any(getattr(c, "name", None) == "bench" for c in app.registered_commands):
        return
    app.command("bench")(bench)


def _say(line: str) -> None:
    stderr.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {line}", highlight=False)


def bench(
    model: list[str] | None = MODEL,
    endpoint: str | None = ENDPOINT,
    users: int = USERS,
    spawn_rate: float = SPAWN_RATE,
    duration: str = DURATION,
    max_tokens: int = MAX_TOKENS,
    stream: bool = STREAM,
    ignore_eos: bool = IGNORE_EOS,
    embeddings_model: str | None = EMBEDDINGS,
    prompt_set: str = PROMPTS,
    out: Path | None = OUT,
    api_key_env: str = API_KEY_ENV,
    compare: bool = COMPARE,
    config: Path | None = CONFIG,
    state_dir: Path | None = STATE_DIR,
    rounds: int = ROUNDS,
    targets: str = TARGETS,
    keep: bool = KEEP,
    json_out: bool = JSON_OUT,
) -> None:
    """Load-test an OpenAI-compatible endpoint with locust (TTFT, ITL, E2EL, output tokens/s, errors per model)."""
    from twllm.bench.load import LoadSettings, load_prompts
    from twllm.bench.runner import Load

    out = out or Path(f"bench-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        load_prompts(prompt_set)
        load = Load(users=users, spawn_rate=spawn_rate, duration=duration)
        if compare:
            settings = LoadSettings(
                models=("-",), max_tokens=max_tokens, stream=stream, ignore_eos=ignore_eos, api_key_env=api_key_env
            )
        else:
            settings = LoadSettings(
                models=tuple(model or ()),
                embeddings_model=embeddings_model,
                max_tokens=max_tokens,
                stream=stream,
                ignore_eos=ignore_eos,
                api_key_env=api_key_env,
            )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if compare:
        if config is None:
            raise typer.BadParameter("--compare needs --config SPEC.yaml")
        if endpoint:
            raise typer.BadParameter("--endpoint is not used with --compare: the targets come from the spec")
        _compare(config, state_dir, model, settings, load, rounds, targets, keep, out, prompt_set, json_out)
        return
    if not endpoint:
        raise typer.BadParameter("give --endpoint URL (or --compare --config SPEC.yaml)")
    _single(endpoint, settings, load, out, prompt_set, json_out)


def _single(endpoint: str, settings: LoadSettings, load: Load, out: Path, prompt_set: str, json_out: bool) -> None:
    from twllm.bench import report
    from twllm.bench.runner import run_locust

    _say(
        f"loading {endpoint} with {load.users} users for {load.duration}: "
        f"{', '.join(settings.models + ((settings.embeddings_model,) if settings.embeddings_model else ()))}"
    )
    result = run_locust(endpoint, settings, load, out, name="load", prompt_set=prompt_set)
    text = report.table(result.summaries)
    chart = report.chart(
        result.summaries,
        out / "summary.png",
        title=f"twllm bench: {load.users} users, {load.duration}, max_tokens {settings.max_tokens}",
    )
    document = {
        "endpoint": endpoint,
        "users": load.users,
        "duration": load.duration,
        "max_tokens": settings.max_tokens,
        "stream": settings.stream,
        "models": [s.to_dict() for s in result.summaries],
        "locust_counts": result.locust_counts,
        "files": {
            "csv_prefix": str(result.csv_prefix),
            "samples": str(result.samples_file),
            "chart": str(chart),
            "log": str(result.log),
        },
    }
    _write_and_show(out, "summary", document, text, json_out)
    _say(f"files in {out}: load_stats.csv (locust), load_samples.jsonl, summary.json, summary.txt, summary.png")


def _write_and_show(out: Path, stem: str, document: dict, text: str, json_out: bool) -> None:
    """Write ``stem``.json and ``stem``.txt to ``out``; print the one asked for."""
    as_json = json.dumps(document, indent=2, ensure_ascii=False)
    (out / f"{stem}.json").write_text(as_json + "\n")
    (out / f"{stem}.txt").write_text(text + "\n", encoding="utf-8")
    typer.echo(as_json if json_out else text)


def _compare(
    config: Path,
    state_dir: Path | None,
    model: list[str] | None,
    settings: LoadSettings,
    load: Load,
    rounds: int,
    targets: str,
    keep: bool,
    out: Path,
    prompt_set: str,
    json_out: bool,
) -> None:
    from twllm.bench import compare as cmp
    from twllm.cli.commands import build_plan

    loaded, plan = build_plan(config, None, state_dir)
    chosen = tuple(t.strip() for t in targets.split(",") if t.strip())
    if model and len(model) > 1:
        raise typer.BadParameter("--compare loads one model: give --model once")
    try:
        result = cmp.compare(
            loaded,
            plan,
            settings,
            load,
            rounds,
            out,
            _say,
            model=model[0] if model else None,
            targets=chosen,
            keep=keep,
            prompt_set=prompt_set,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    text = cmp.table(result)
    document = {**result.to_dict(), "command": " ".join(["twllm", *sys.argv[1:]]) if sys.argv else None}
    cmp.chart(result, out / "compare.png")
    _write_and_show(out, "compare", document, text, json_out)
    _say(f"files in {out}: compare.txt, compare.json, compare.png, round*/ (locust CSVs and samples per target)")
