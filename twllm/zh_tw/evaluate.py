"""Measures how Taiwan-Traditional a model's answers are: prompts in, scored answers out.

Sends each prompt as one OpenAI chat completion to an OpenAI-compatible endpoint (the gateway,
or an engine directly) and scores the answer as received ("before") and after normalize()
("after"): does it contain Simplified-only characters, and which mainland terms. report.py
turns the scored answers into CSV files, a chart and per-model figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

import httpx
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError

from twllm.errors import EXIT_INVALID, EXIT_NOT_READY, TwllmError, did_you_mean
from twllm.zh_tw.mainland import mainland_terms
from twllm.zh_tw.normalize import is_simplified, normalize

BUILTIN_PROMPTS = "prompts.yaml"
CATEGORIES = ("customer_service", "medical_documentation", "ecommerce", "public_services", "daily_life")


class PromptsFileError(TwllmError):
    """The prompts file cannot be read or does not have the expected shape (exit 2)."""

    exit_code = EXIT_INVALID


class EndpointUnreachable(TwllmError):
    """Nothing answers at the endpoint (exit 3, like a component that never became ready)."""

    exit_code = EXIT_NOT_READY


class EndpointRefused(TwllmError):
    """The endpoint answers but refuses the request as given: unknown model, rejected key (exit 2)."""

    exit_code = EXIT_INVALID


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    prompt: str


@dataclass(frozen=True)
class Answer:
    """One prompt sent to one model, scored. ``error`` is set (and ``text`` empty) on failure."""

    model: str
    prompt: Prompt
    text: str
    latency_s: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @cached_property
    def normalized(self) -> str:
        return normalize(self.text)

    @property
    def simplified_before(self) -> bool:
        return is_simplified(self.text)

    @property
    def simplified_after(self) -> bool:
        return is_simplified(self.normalized)

    @property
    def mainland_before(self) -> list[str]:
        return mainland_terms(self.text)

    @property
    def mainland_after(self) -> list[str]:
        return mainland_terms(self.normalized)


# --- prompts ------------------------------------------------------------------------------------


def load_prompts(path: Path | None = None) -> list[Prompt]:
    """The built-in prompts, or those of ``path`` (a YAML file: ``prompts: [{id, category, prompt}]``)."""
    if path is None:
        name = f"twllm/zh_tw/{BUILTIN_PROMPTS}"
        text = resources.files("twllm.zh_tw").joinpath(BUILTIN_PROMPTS).read_text(encoding="utf-8")
    else:
        name = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PromptsFileError(f"cannot read the prompts file {path}: {exc}") from exc
    return parse_prompts(text, name)


def parse_prompts(text: str, name: str) -> list[Prompt]:
    """Prompts from YAML text; errors name the file and line."""
    try:
        document = YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{name}:{mark.line + 1}" if mark is not None else name
        raise PromptsFileError(f"{where}: not valid YAML: {exc.problem or exc.context}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("prompts"), list):
        raise PromptsFileError(
            f"{name}:1: expected a mapping with a 'prompts' list",
            hint="prompts:\n  - {id: p1, category: daily_life, prompt: 今天天氣如何？}",
        )
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for index, item in enumerate(document["prompts"]):
        line = document["prompts"].lc.item(index)[0] + 1
        where = f"{name}:{line}: prompts[{index}]"
        if not isinstance(item, dict):
            raise PromptsFileError(f"{where}: expected a mapping with id, category and prompt")
        unknown = set(item) - {"id", "category", "prompt"}
        if unknown:
            key = sorted(unknown)[0]
            raise PromptsFileError(f"{where}: unknown key '{key}'{did_you_mean(key, ['id', 'category', 'prompt'])}")
        for key in ("id", "category", "prompt"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise PromptsFileError(f"{where}.{key}: required, a non-empty string")
        if item["id"] in seen:
            raise PromptsFileError(f"{where}.id: '{item['id']}' is used twice")
        seen.add(item["id"])
        prompts.append(Prompt(str(item["id"]), str(item["category"]), str(item["prompt"])))
    if not prompts:
        raise PromptsFileError(f"{name}: the 'prompts' list is empty")
    return prompts


# --- the endpoint -------------------------------------------------------------------------------


def api_base(endpoint: str) -> str:
    """``http://host:port`` or ``http://host:port/v1`` → the ``/v1`` base URL."""
    base = endpoint.rstrip("/")
    return base if base.endswith("/v1") else f"{base}/v1"


class Endpoint:
    """An OpenAI-compatible endpoint; the key only ever goes into the Authorization header."""

    def __init__(self, endpoint: str, api_key: str | None, *, timeout_s: float = 120.0) -> None:
        self.url = api_base(endpoint)
        self._key = api_key
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s, trust_env=False)

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._client.close()

    def scrub(self, text: str) -> str:
        """``text`` without the API key (error bodies sometimes echo the request)."""
        return text.replace(self._key, "***") if self._key else text

    def check_models(self, models: Iterable[str]) -> None:
        """Fail clearly when nothing answers, the key is refused, or a model is not served."""
        try:
            reply = self._client.get("/models")
        except httpx.HTTPError as exc:
            raise EndpointUnreachable(
                f"cannot reach {self.url}/models: {self.scrub(str(exc)) or type(exc).__name__}",
                hint="is the gateway (or engine) running? check --endpoint",
            ) from exc
        if reply.status_code in (401, 403):
            raise EndpointRefused(
                f"{self.url}/models refused the API key (HTTP {reply.status_code})",
                hint="set the key's environment variable, or name another with --api-key-env",
            )
        if reply.status_code != 200:
            raise EndpointRefused(
                f"{self.url}/models answered HTTP {reply.status_code}: {self.scrub(reply.text[:200])}"
            )
        try:
            served = [entry["id"] for entry in reply.json()["data"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise EndpointRefused(f"{self.url}/models did not answer an OpenAI model list") from exc
        for model in models:
            if model not in served:
                raise EndpointRefused(
                    f"model '{model}' is not served at {self.url}{did_you_mean(model, served)}",
                    hint=f"served: {', '.join(sorted(served)) or '(none)'}",
                )

    def ask(self, model: str, prompt: Prompt, max_tokens: int) -> Answer:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt.prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        started = time.perf_counter()
        try:
            reply = self._client.post("/chat/completions", json=body)
            elapsed = time.perf_counter() - started
            if reply.status_code != 200:
                return Answer(model, prompt, "", elapsed, f"HTTP {reply.status_code}: {self.scrub(reply.text[:300])}")
            text = reply.json()["choices"][0]["message"].get("content") or ""
        except httpx.HTTPError as exc:
            return Answer(
                model, prompt, "", time.perf_counter() - started, f"{type(exc).__name__}: {self.scrub(str(exc))}"
            )
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            return Answer(model, prompt, "", time.perf_counter() - started, f"malformed answer: {exc!r}")
        return Answer(model, prompt, text, elapsed)


def run_eval(
    endpoint: Endpoint,
    models: list[str],
    prompts: list[Prompt],
    *,
    max_tokens: int,
    concurrency: int,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[Answer]:
    """Every prompt to every model, ``concurrency`` requests at a time; answers in prompt order."""
    answers: list[Answer] = []
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for model in models:
            futures = [pool.submit(endpoint.ask, model, prompt, max_tokens) for prompt in prompts]
            for done, future in enumerate(futures, 1):
                answers.append(future.result())
                if progress:
                    progress(model, done, len(prompts))
    return answers
