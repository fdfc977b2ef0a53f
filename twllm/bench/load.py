"""What one load-test request does and measures, without locust: bodies, prompts, stream timing.

The locust user (``twllm/bench/locustfile.py``) is a thin shell around these functions, so the
timing logic is tested without a server. Metric names follow vLLM's benchmarks:

  E2EL  end-to-end request latency: request sent → last byte read
  TTFT  time to first token: request sent → first chunk carrying output text (streaming only)
  ITL   inter-token latency: the gap between two consecutive output chunks (streaming only)
  TPOT  time per output token after the first: (E2EL − TTFT) / (output tokens − 1)

Output tokens come from the server's ``usage`` (``stream_options.include_usage`` when streaming),
never from counting chunks, so a chunk that carries several tokens is counted right.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from twllm.settings import (
    BENCH_API_KEY_ENV,
    BENCH_API_KEY_ENV_ENV,
    BENCH_EMBEDDINGS_MODEL_ENV,
    BENCH_IGNORE_EOS_ENV,
    BENCH_MAX_TOKENS_ENV,
    BENCH_MODELS_ENV,
    BENCH_PROMPT_SET_ENV,
    BENCH_SAMPLES_FILE_ENV,
    BENCH_STREAM_ENV,
)

# --- options -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One setting of the load test: a locust command-line flag, also read from an environment variable."""

    flag: str
    env: str
    default: str
    help: str


OPTIONS: tuple[Option, ...] = (
    Option("--models", BENCH_MODELS_ENV, "", "Chat models to load, comma separated (client-facing names)."),
    Option(
        "--embeddings-model",
        BENCH_EMBEDDINGS_MODEL_ENV,
        "",
        "An embeddings model to load as well (one request in the rotation with the chat models).",
    ),
    Option("--max-tokens", BENCH_MAX_TOKENS_ENV, "64", "max_tokens of every chat completion."),
    Option("--stream", BENCH_STREAM_ENV, "on", "on: streamed chat completions (TTFT, ITL measured); off: plain."),
    Option(
        "--ignore-eos",
        BENCH_IGNORE_EOS_ENV,
        "on",
        "on: ask vLLM to generate exactly max_tokens (its ignore_eos parameter), as vLLM's own benchmarks do.",
    ),
    Option(
        "--prompt-set",
        BENCH_PROMPT_SET_ENV,
        "zh-tw",
        "zh-tw (built in) or a YAML/JSON file with a `prompts` list of {id, category, prompt} or strings.",
    ),
    Option(
        "--api-key-env",
        BENCH_API_KEY_ENV_ENV,
        BENCH_API_KEY_ENV,
        "Name of the environment variable holding the API key (the key itself is never logged).",
    ),
    Option(
        "--samples-file",
        BENCH_SAMPLES_FILE_ENV,
        "",
        "Write every request's measurements here (JSON lines) when the run ends.",
    ),
)

DEFAULT_API_KEY_ENV = BENCH_API_KEY_ENV


def on(value: str | bool) -> bool:
    """A switch's value: on/true/1/yes → True."""
    if isinstance(value, bool):
        return value
    return value.strip().lower() in ("on", "true", "1", "yes")


@dataclass(frozen=True)
class LoadSettings:
    """The load one run sends, resolved from the options."""

    models: tuple[str, ...]
    embeddings_model: str | None = None
    max_tokens: int = 64
    stream: bool = True
    ignore_eos: bool = True
    prompts: tuple[str, ...] = ()
    api_key_env: str = DEFAULT_API_KEY_ENV

    def __post_init__(self) -> None:
        if not self.models and not self.embeddings_model:
            raise ValueError("no model to load: give --models and/or --embeddings-model")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")

    @classmethod
    def from_options(cls, values: Mapping[str, Any]) -> LoadSettings:
        """From locust's parsed options (attribute names: models, max_tokens, ...)."""
        return cls(
            models=tuple(m.strip() for m in str(values.get("models") or "").split(",") if m.strip()),
            embeddings_model=str(values.get("embeddings_model") or "").strip() or None,
            max_tokens=int(values.get("max_tokens") or 64),
            stream=on(values.get("stream", "on")),
            ignore_eos=on(values.get("ignore_eos", "on")),
            prompts=load_prompts(str(values.get("prompt_set") or "zh-tw")),
            api_key_env=str(values.get("api_key_env") or DEFAULT_API_KEY_ENV),
        )

    def work(self) -> list[tuple[str, str]]:
        """The rotation each user walks through: (kind, model) with kind chat | embed."""
        items = [("chat", m) for m in self.models]
        if self.embeddings_model:
            items.append(("embed", self.embeddings_model))
        return items


# --- prompts -------------------------------------------------------------------------------------

FALLBACK_PROMPTS: tuple[str, ...] = (
    "請用繁體中文簡單介紹台北的三個景點。",
    "台灣的健保制度有什麼特色？請條列說明。",
    "幫我寫一封向客戶說明出貨延遲的道歉信，語氣要正式。",
    "請解釋什麼是機器學習，讓國中生也聽得懂。",
    "把這句話翻譯成英文：今天下午的會議改到明天早上十點。",
    "列出五個在台灣常見的早餐選項，並說明它們的特色。",
    "請比較捷運和公車在台北通勤的優缺點。",
    "寫一首關於阿里山日出的短詩。",
)
"""Used when twllm/zh_tw/prompts.yaml is not there (it is the built-in set when it is)."""


def builtin_prompts_file() -> Path:
    return Path(__file__).resolve().parent.parent / "zh_tw" / "prompts.yaml"


def load_prompts(prompt_set: str) -> tuple[str, ...]:
    """The prompt texts of ``prompt_set``: ``zh-tw`` (built in) or a YAML/JSON file."""
    if prompt_set in ("zh-tw", "zh_tw", "builtin", ""):
        path = builtin_prompts_file()
        if not path.exists():
            return FALLBACK_PROMPTS
    else:
        path = Path(prompt_set).expanduser()
        if not path.exists():
            raise ValueError(f"prompt set {prompt_set!r}: no such file (use zh-tw for the built-in set)")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML too
    items = data.get("prompts") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a `prompts` list")
    texts = tuple(str(_prompt_text(item, path)) for item in items)
    texts = tuple(t for t in texts if t.strip())
    if not texts:
        raise ValueError(f"{path}: the prompt list is empty")
    return texts


def _prompt_text(item: Any, path: Path) -> str:
    if not isinstance(item, dict):
        return str(item)
    for key in ("prompt", "text"):  # twllm/zh_tw/prompts.yaml says prompt; text is accepted too
        if key in item:
            return str(item[key])
    raise ValueError(f"{path}: prompt {item.get('id', item)!r} has neither `prompt` nor `text`")


# --- request bodies ------------------------------------------------------------------------------


def chat_body(settings: LoadSettings, model: str, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": settings.max_tokens,
        "temperature": 0,
    }
    if settings.ignore_eos:
        body["ignore_eos"] = True
    if settings.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def embeddings_body(model: str, prompt: str) -> dict[str, Any]:
    return {"model": model, "input": prompt}


# --- measurements --------------------------------------------------------------------------------


@dataclass
class Sample:
    """One request's measurements, as written to the samples file (times in ms)."""

    kind: str
    model: str
    started: float
    """Wall-clock start (seconds since the epoch)."""
    ok: bool
    e2el_ms: float
    status: int | None = None
    ttft_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None

    @property
    def tpot_ms(self) -> float | None:
        if self.ttft_ms is None or self.output_tokens < 2:
            return None
        return (self.e2el_ms - self.ttft_ms) / (self.output_tokens - 1)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "tpot_ms": self.tpot_ms}, ensure_ascii=False)


@dataclass
class StreamResult:
    ttft_ms: float | None
    itl_ms: list[float]
    output_tokens: int
    prompt_tokens: int
    text: str
    done: bool
    """The stream ended with ``data: [DONE]``."""
    error: str | None = None


def read_stream(
    chunks: Iterable[bytes | str], started: float, clock: Callable[[], float] = time.perf_counter
) -> StreamResult:
    """Read an OpenAI server-sent-event stream; ``started`` is ``clock()`` when the request was sent.

    A token arrives with each ``data:`` event whose delta carries text; TTFT is the first such
    arrival, ITL the gaps between arrivals. An ``error`` event ends the stream as a failure."""
    buffer = b""
    arrivals: list[float] = []
    text_parts: list[str] = []
    usage: dict[str, Any] = {}
    done = False
    error = None
    for chunk in chunks:
        now = clock()
        buffer += chunk.encode() if isinstance(chunk, str) else chunk
        while b"\n" in buffer:
            raw, buffer = buffer.split(b"\n", 1)
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                done = True
                continue
            try:
                event = json.loads(payload)
            except ValueError:
                error = f"unparsable stream event: {payload[:120]!r}"
                continue
            if "error" in event:
                error = str(event["error"])[:300]
                continue
            if event.get("usage"):
                usage = event["usage"]
            piece = "".join((c.get("delta") or {}).get("content") or "" for c in event.get("choices") or ())
            if piece:
                arrivals.append(now)
                text_parts.append(piece)
    ttft = (arrivals[0] - started) * 1000 if arrivals else None
    itl = [(b - a) * 1000 for a, b in zip(arrivals, arrivals[1:])]
    tokens = int(usage.get("completion_tokens") or len(arrivals))
    return StreamResult(ttft, itl, tokens, int(usage.get("prompt_tokens") or 0), "".join(text_parts), done, error)


def redact(text: str, secret: str | None) -> str:
    """``text`` with ``secret`` (and its 12-character prefix, which some servers echo) blanked out."""
    if secret:
        text = text.replace(secret, "***")
        if len(secret) > 12:
            text = text.replace(secret[:12], "***")
    return text
