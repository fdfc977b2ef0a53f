"""Run the locust users headless in a child process and collect what they measured.

``run_locust`` starts ``python -m locust -f twllm/bench/locustfile.py --headless ...`` with this
interpreter, hands it the API key through the environment (never the command line), and returns
the per-model summary read from the samples file plus locust's own counts from its CSVs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from twllm.bench import report
from twllm.bench.load import DEFAULT_API_KEY_ENV, LoadSettings
from twllm.errors import RuntimeFailure
from twllm.settings import BENCH_PREFIX

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+s)?$")
STOP_TIMEOUT_S = 120
"""When the time is up, users finish the request they are in (so every request sent is counted)."""


@dataclass(frozen=True)
class Load:
    """How hard and how long: locust's -u, -r, -t."""

    users: int = 8
    spawn_rate: float = 0.0
    """Users started per second; 0: all at once."""
    duration: str = "30s"

    def __post_init__(self) -> None:
        if self.users < 1:
            raise ValueError(f"--users must be at least 1, got {self.users}")
        if not self.duration or not DURATION.match(self.duration):
            raise ValueError(f"--duration {self.duration!r}: use locust's form, e.g. 30s, 2m, 1m30s")


@dataclass
class RunResult:
    csv_prefix: Path
    samples_file: Path
    summaries: list[report.ModelSummary]
    locust_counts: dict[str, dict[str, int]]
    returncode: int
    log: Path


def locust_argv(
    endpoint: str,
    settings: LoadSettings,
    load: Load,
    csv_prefix: Path,
    samples_file: Path,
    python: str = sys.executable,
) -> list[str]:
    """The locust command line (no secret in it: the key travels in ``settings.api_key_env``)."""
    argv = [
        python,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--only-summary",
        "--host",
        endpoint.rstrip("/"),
        "-u",
        str(load.users),
        "-r",
        str(load.spawn_rate or load.users),
        "-t",
        load.duration,
        "--stop-timeout",
        str(STOP_TIMEOUT_S),
        "--csv",
        str(csv_prefix),
        "--loglevel",
        "WARNING",
        "--models",
        ",".join(settings.models),
        "--max-tokens",
        str(settings.max_tokens),
        "--stream",
        "on" if settings.stream else "off",
        "--ignore-eos",
        "on" if settings.ignore_eos else "off",
        "--api-key-env",
        settings.api_key_env,
        "--samples-file",
        str(samples_file),
    ]
    if settings.embeddings_model:
        argv += ["--embeddings-model", settings.embeddings_model]
    return argv


def run_locust(
    endpoint: str,
    settings: LoadSettings,
    load: Load,
    out: Path,
    name: str = "run",
    api_key: str | None = None,
    prompt_set: str = "zh-tw",
) -> RunResult:
    """One headless locust run against ``endpoint``; files go to ``out`` as ``<name>_*``.

    ``api_key`` (if given) is put into the child's ``settings.api_key_env``; otherwise the child
    inherits that variable from this process."""
    out.mkdir(parents=True, exist_ok=True)
    csv_prefix, samples_file, log = out / name, out / f"{name}_samples.jsonl", out / f"{name}_locust.log"
    argv = locust_argv(endpoint, settings, load, csv_prefix, samples_file) + ["--prompt-set", prompt_set]
    env = {k: v for k, v in os.environ.items() if not k.startswith(BENCH_PREFIX)}
    env["PYTHONUNBUFFERED"] = "1"
    key = api_key if api_key is not None else os.environ.get(settings.api_key_env or DEFAULT_API_KEY_ENV)
    if key:
        env[settings.api_key_env] = key
    samples_file.unlink(missing_ok=True)
    with log.open("wb") as handle:
        proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT)
    # locust exits 1 when any request failed; that is a finding, not a broken run.
    if not samples_file.exists() or not Path(f"{csv_prefix}_stats.csv").exists():
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
        raise RuntimeFailure(
            f"locust did not complete (exit {proc.returncode}); its log {log} ends:\n  " + "\n  ".join(tail)
        )
    return RunResult(
        csv_prefix,
        samples_file,
        report.summarize_file(samples_file),
        report.locust_counts(csv_prefix),
        proc.returncode,
        log,
    )
