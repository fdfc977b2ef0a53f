"""Locust users that load an OpenAI-compatible endpoint (twllm's gateway, LiteLLM, vLLM) with chat and embeddings.

    python -m locust -f twllm/bench/locustfile.py --headless -u 16 -r 16 -t 60s --csv out/run \\
        --host http://127.0.0.1:4000/v1 --models demo-chat --max-tokens 64 --stream on

``--host`` is the OpenAI base URL (with ``/v1``). The API key is read from the environment
variable named by ``--api-key-env`` (default ``TWLLM_BENCH_API_KEY``) and never logged. Every
option also reads an environment variable (``twllm.bench.load.OPTIONS``).

Each user walks the models in turn, one request at a time, without pauses (a closed loop: the
user count is the concurrency). Locust's own entry ``POST chat <model>`` is the whole request
(E2EL: locust's FastHttpUser alone would stop the clock at the headers of a stream); the
streaming metrics are reported as their own entries with ``events.request.fire``: request type
``TTFT``, ``ITL`` (one per gap between output chunks) and ``TPOT``, name the model, so they
land in locust's CSVs too. ``--samples-file`` gets every request's exact measurements (locust's
percentiles round response times above 100 ms to two significant digits).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
from locust import FastHttpUser, constant, events, task
from locust.argument_parser import LocustArgumentParser
from locust.contrib.fasthttp import FastResponse
from locust.env import Environment
from locust.exception import StopUser
from locust.stats import CSV_STATS_INTERVAL_SEC

from twllm.bench.load import OPTIONS, LoadSettings, Sample, chat_body, embeddings_body, read_stream, redact

_samples: list[Sample] = []
_run: dict[str, float] = {}
_settings: LoadSettings | None = None


@events.init_command_line_parser.add_listener
def _options(parser: LocustArgumentParser) -> None:
    for option in OPTIONS:
        parser.add_argument(option.flag, type=str, env_var=option.env, default=option.default, help=option.help)


@events.test_start.add_listener
def _started(environment: Environment, **_: object) -> None:
    global _settings
    _settings = LoadSettings.from_options(vars(environment.parsed_options))
    _samples.clear()
    _run.clear()
    _run["started"] = time.time()


@events.test_stop.add_listener
def _stopped(environment: Environment, **_: object) -> None:
    _run["stopped"] = time.time()
    path = getattr(environment.parsed_options, "samples_file", "") if environment.parsed_options else ""
    if path:
        write_samples(Path(path), _samples, _run, _settings)


@events.quitting.add_listener
def _final_csv(environment: Environment, **_: object) -> None:
    # locust rewrites <prefix>_stats.csv once a second and does not write it again at the end, so
    # the last second of requests would be missing: let its writer run once more, users stopped.
    if getattr(environment.parsed_options, "csv_prefix", None):
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)


def stream_lines(resp: FastResponse) -> Iterator[bytes]:
    """The body of a streamed response line by line, each as soon as it arrives.

    FastResponse.iter_content (and locust's iter_lines on top of it) reads fixed-size blocks and
    waits until a block is full, which would hold back every token of a short stream."""
    raw = resp._response
    assert raw is not None  # set on every answered request; only 200 answers are read here
    while True:
        line = raw.readline(b"\n")
        if not line:
            return
        yield line


def write_samples(path: Path, samples: list[Sample], run: dict[str, float], settings: LoadSettings | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "kind": "run",
        "started": run.get("started"),
        "stopped": run.get("stopped", time.time()),
        "max_tokens": settings.max_tokens if settings else None,
        "stream": settings.stream if settings else None,
    }
    with path.open("w", encoding="utf-8") as out:
        out.write(json.dumps(header) + "\n")
        for sample in samples:
            out.write(sample.to_json() + "\n")


class OpenAIUser(FastHttpUser):
    """One client: sends the next request as soon as the last one is answered."""

    wait_time = constant(0)
    network_timeout = 600.0
    connection_timeout = 30.0

    def on_start(self) -> None:
        assert _settings is not None, "test_start did not run"
        self.settings = _settings
        self.secret = os.environ.get(self.settings.api_key_env, "")
        self.headers = {"Authorization": f"Bearer {self.secret}"} if self.secret else {}
        work = self.settings.work()
        start = random.randrange(len(work))
        self.rotation = itertools.cycle(work[start:] + work[:start])
        self.prompts = self.settings.prompts
        self.base = (self.host or "").rstrip("/")
        if not self.base:
            raise StopUser()

    @task
    def next_request(self) -> None:
        kind, model = next(self.rotation)
        prompt = random.choice(self.prompts)
        if kind == "embed":
            self.embed(model, prompt)
        else:
            self.chat(model, prompt)

    def chat(self, model: str, prompt: str) -> None:
        body = chat_body(self.settings, model, prompt)
        wall = time.time()
        started = time.perf_counter()
        with self.client.post(
            f"{self.base}/chat/completions",
            json=body,
            headers=self.headers,
            name=f"chat {model}",
            stream=self.settings.stream,
            catch_response=True,
        ) as resp:
            sample = Sample("chat", model, wall, ok=False, e2el_ms=0.0, status=resp.status_code or None)
            error = None
            if resp.status_code != 200:
                error = f"HTTP {resp.status_code}: {redact((resp.text or '')[:300], self.secret)}"
            elif self.settings.stream:
                result = read_stream(stream_lines(resp), started)
                sample.ttft_ms, sample.itl_ms = result.ttft_ms, result.itl_ms
                sample.output_tokens, sample.prompt_tokens = result.output_tokens, result.prompt_tokens
                if result.error or not result.done:
                    error = redact(result.error or "the stream ended without [DONE]", self.secret)
            else:
                try:
                    usage = resp.json().get("usage") or {}
                    sample.output_tokens = int(usage.get("completion_tokens") or 0)
                    sample.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                except ValueError:
                    error = "the answer is not JSON"
            sample.e2el_ms = (time.perf_counter() - started) * 1000
            sample.ok, sample.error = error is None, error
            # The whole request, also when streamed (FastHttpUser stopped the clock at the headers).
            resp.request_meta["response_time"] = sample.e2el_ms
            resp.request_meta["response_length"] = sample.output_tokens
            if error:
                resp.failure(error)
            else:
                resp.success()
        _samples.append(sample)
        if sample.ok and sample.ttft_ms is not None:
            self.metric("TTFT", model, sample.ttft_ms, 1)
            for gap in sample.itl_ms:
                self.metric("ITL", model, gap, 1)
            if sample.tpot_ms is not None:
                self.metric("TPOT", model, sample.tpot_ms, 1)

    def embed(self, model: str, prompt: str) -> None:
        wall = time.time()
        started = time.perf_counter()
        with self.client.post(
            f"{self.base}/embeddings",
            json=embeddings_body(model, prompt),
            headers=self.headers,
            name=f"embeddings {model}",
            catch_response=True,
        ) as resp:
            error = None
            if resp.status_code != 200:
                error = f"HTTP {resp.status_code}: {redact((resp.text or '')[:300], self.secret)}"
            else:
                try:
                    if not resp.json().get("data"):
                        error = "no embedding in the answer"
                except ValueError:
                    error = "the answer is not JSON"
            elapsed = (time.perf_counter() - started) * 1000
            if error:
                resp.failure(error)
            else:
                resp.success()
        _samples.append(
            Sample(
                "embed", model, wall, ok=error is None, e2el_ms=elapsed, status=resp.status_code or None, error=error
            )
        )

    def metric(self, kind: str, model: str, value_ms: float, length: int) -> None:
        events.request.fire(
            request_type=kind, name=model, response_time=value_ms, response_length=length, exception=None, context={}
        )
